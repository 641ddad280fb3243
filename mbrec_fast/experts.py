"""Fused gated (MMoE/PLE/M3oE) and routed (STAR/MEMBER/SyNCRec) expert layers: the public functional API.

`gated_experts` replaces the usual "Python loop over experts, stack, softmax gate, bmm per task" with one op;
`routed_experts` sends each sample through its own expert(s) with a grouped GEMM over the samples sorted by
expert. Both have a full backward (inputs, expert weights/biases, LayerNorm params, gate weights or precomputed
gates, route weights), accept fp32/fp16/bf16 (fp32 accumulation) and work under `torch.compile(fullgraph=True)`.
Each expert is ``Linear(D -> H) [-> LayerNorm(H)] -> activation``. Modules built on these live in `mbrec_fast.nn`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_tensor
from . import _experts_ops  # noqa: F401  (registers torch.ops.mbrec_fast.{gated,routed}_experts_{fwd,bwd})
from ._experts_torch import ACTIVATIONS

__all__ = ["gated_experts", "routed_experts", "ACTIVATIONS"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_param(t: Optional[Tensor], name: str, shape: tuple, x: Tensor) -> None:
    if t is None:
        return
    check_tensor(t, name, ndim=len(shape), dtypes=(x.dtype,), device=x.device)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_experts(x: Tensor, weight: Tensor, bias: Optional[Tensor], ln_weight, ln_bias, per_expert_ok: bool):
    check_tensor(x, "x", dtypes=_FLOATS)
    check_tensor(weight, "weight", ndim=3, dtypes=(x.dtype,), device=x.device)
    E, D, H = weight.shape
    if E == 0:
        raise ValueError("weight has 0 experts (weight.shape[0] == 0): E must be >= 1")
    if D == 0 or H == 0:
        raise ValueError(f"weight must have nonzero input/output dims, got shape {tuple(weight.shape)}")
    if x.dim() == 2 or (per_expert_ok and x.dim() == 3):
        if x.shape[-1] != D:
            raise ValueError(f"x.shape[-1] = {x.shape[-1]} must equal weight.shape[1] = {D} (input dim)")
        if x.dim() == 3 and x.shape[0] != E:
            raise ValueError(f"per-expert x [E, B, D] must have x.shape[0] = {E} = weight.shape[0], got {x.shape[0]}")
    else:
        want = "[B, D] or [E, B, D]" if per_expert_ok else "[B, D]"
        raise ValueError(f"x must be {want}, got shape {tuple(x.shape)}")
    _check_param(bias, "bias", (E, H), x)
    _check_param(ln_weight, "ln_weight", (E, H), x)
    _check_param(ln_bias, "ln_bias", (E, H), x)
    return E, D, H


def gated_experts(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, gates: Optional[Tensor] = None,
                  gate_weight: Optional[Tensor] = None, gate_bias: Optional[Tensor] = None,
                  gate_mask: Optional[Tensor] = None, ln_weight: Optional[Tensor] = None,
                  ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-5, activation: str = "relu") -> Tensor:
    """Dense gated mixture of experts: ``out[t, b] = sum_e G_t[b, e] * act(LN_e(x[b] @ weight[e] + bias[e]))``.

    Args:
        x: [B, D] input shared by all experts, or [E, B, D] one input per expert (the last layer of multi-layer
            experts, or PLE levels >= 2 where experts read different inputs; then pass ``gates``).
        weight: [E, D, H] expert weights (note: D x H, i.e. ``nn.Linear.weight.T``). bias: [E, H] or None.
        gates: [T, B, E] precomputed mixing weights, used as given (no softmax), with gradient (M3oE's α/β mixes).
        gate_weight: [T, D, E] and gate_bias [T, E]: gates computed in the op as ``softmax(x @ gate_weight[t] +
            gate_bias[t])``; needs x [B, D]. Exactly one of ``gates`` / ``gate_weight`` must be given.
        gate_mask: bool [T, E], only with ``gate_weight``: task t's softmax runs over the experts where the mask is
            True (PLE/CGC: shared + own experts); others get weight 0. Each row needs at least one True.
        ln_weight, ln_bias: [E, H] per-expert LayerNorm over H applied before the activation (either enables LN).
        activation: "none", "relu", "gelu" (exact erf) or "silu".

    Returns:
        [T, B, H] in x.dtype. The op stores the fp32 pre-activation [B, E, H] for the backward.
    """
    E, D, H = _check_experts(x, weight, bias, ln_weight, ln_bias, per_expert_ok=True)
    _check_activation(activation)
    B = x.shape[-2]
    if (gates is None) == (gate_weight is None):
        raise ValueError("pass exactly one of gates= (precomputed [T, B, E]) or gate_weight= ([T, D, E])")
    if gates is not None:
        check_tensor(gates, "gates", ndim=3, dtypes=(x.dtype,), device=x.device)
        if gates.shape[0] == 0:
            raise ValueError("gates has T = 0 tasks (gates.shape[0] == 0): T must be >= 1")
        if tuple(gates.shape) != (gates.shape[0], B, E):
            raise ValueError(f"gates must have shape [T, B={B}, E={E}], got {tuple(gates.shape)}")
        if gate_bias is not None or gate_mask is not None:
            raise ValueError("gate_bias / gate_mask only apply with gate_weight=, not with precomputed gates=")
    else:
        if x.dim() != 2:
            raise ValueError("gate_weight= needs a shared x [B, D]; for per-expert x [E, B, D] pass gates=")
        check_tensor(gate_weight, "gate_weight", ndim=3, dtypes=(x.dtype,), device=x.device)
        T = gate_weight.shape[0]
        if T == 0:
            raise ValueError("gate_weight has T = 0 tasks (gate_weight.shape[0] == 0): T must be >= 1")
        if tuple(gate_weight.shape) != (T, D, E):
            raise ValueError(f"gate_weight must have shape [T, D={D}, E={E}], got {tuple(gate_weight.shape)}")
        _check_param(gate_bias, "gate_bias", (T, E), x)
        if gate_mask is not None:
            check_tensor(gate_mask, "gate_mask", ndim=2, dtypes=(torch.bool,), device=x.device)
            if tuple(gate_mask.shape) != (T, E):
                raise ValueError(f"gate_mask must have shape [T={T}, E={E}], got {tuple(gate_mask.shape)}")
            if not torch.compiler.is_compiling() and not bool(gate_mask.any(1).all()):
                raise ValueError("gate_mask has a task with no allowed expert (a row of all False)")
    out, _, _ = torch.ops.mbrec_fast.gated_experts_fwd(
        x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias, float(ln_eps), activation)
    return out


def routed_experts(x: Tensor, weight: Tensor, bias: Optional[Tensor], route: Tensor,
                   route_weight: Optional[Tensor] = None, *, ln_weight: Optional[Tensor] = None,
                   ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-5, activation: str = "relu") -> Tensor:
    """Routed experts: ``out[b] = sum_j route_weight[b, j] * act(LN_e(x[b] @ weight[e] + bias[e]))``, e = route[b, j].

    Args:
        x: [B, D]. weight: [E, D, H]. bias: [E, H] or None.
        route: int [B] (top-1: one expert per sample, e.g. STAR domain towers, MEMBER visited/unvisited) or
            [B, k] (top-k). Ids must lie in [0, E). Experts with no samples are fine.
        route_weight: [B] or [B, k] mixing weights (e.g. renormalized top-k router probabilities), with gradient;
            None means weight 1 for every slot.
        ln_weight, ln_bias, ln_eps, activation: as in `gated_experts`.

    Returns:
        [B, H] in x.dtype. Samples are sorted by expert (stable argsort) and each expert runs one GEMM on its
        contiguous row group; no padded copy of x is made.
    """
    E, D, H = _check_experts(x, weight, bias, ln_weight, ln_bias, per_expert_ok=False)
    _check_activation(activation)
    B = x.shape[0]
    check_tensor(route, "route", dtypes=(torch.int64, torch.int32), device=x.device)
    if route.dim() == 1:
        route = route.unsqueeze(1)
    if route.dim() != 2 or route.shape[0] != B:
        raise ValueError(f"route must be [B={B}] or [B={B}, k], got shape {tuple(route.shape)}")
    if route.shape[1] == 0:
        raise ValueError("route has k = 0 slots per sample: k must be >= 1")
    if route.shape[1] > E:
        raise ValueError(f"route has k = {route.shape[1]} slots but only E = {E} experts")
    route = route.to(torch.int64).contiguous()
    if route_weight is not None:
        check_tensor(route_weight, "route_weight", dtypes=(x.dtype,), device=x.device)
        if route_weight.dim() == 1:
            route_weight = route_weight.unsqueeze(1)
        if tuple(route_weight.shape) != tuple(route.shape):
            raise ValueError(f"route_weight must have the shape of route {tuple(route.shape)}, "
                             f"got {tuple(route_weight.shape)}")
    out = torch.ops.mbrec_fast.routed_experts_fwd(
        x, weight, bias, route, route_weight, ln_weight, ln_bias, float(ln_eps), activation)[0]
    return out
