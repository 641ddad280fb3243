"""Loop-of-experts twins of the fused expert ops and modules (the pattern used by torch-rechub, DeepCTR-Torch,
FuxiCTR: one small GEMM per expert in a Python loop, stack, softmax gate, mix per task).

They are the references of the tests and the `expert_impl="loop"` path of every module and model in
`mbrec_fast.nn` / `mbrec_fast.models` (the same parameters run through a Python loop). Plain autograd code in the
input dtype: slow and simple on purpose.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._experts_torch import activate

__all__ = ["expert_ref", "gated_experts_ref", "routed_experts_ref", "routed_linear_ref", "gated_heads_ref",
           "LoopGatedExperts"]


def expert_ref(xe: Tensor, w: Tensor, b: Optional[Tensor], lnw=None, lnb=None, eps: float = 1e-5,
               activation: str = "relu") -> Tensor:
    """One expert: ``act(LayerNorm(xe @ w + b))`` (LayerNorm when lnw or lnb is given)."""
    h = xe @ w
    if b is not None:
        h = h + b
    if lnw is not None or lnb is not None:
        h = F.layer_norm(h, (h.shape[-1],), lnw, lnb, eps)
    return activate(h, activation)


def gated_experts_ref(x, weight, bias=None, *, gates=None, gate_weight=None, gate_bias=None, gate_mask=None,
                      ln_weight=None, ln_bias=None, ln_eps=1e-5, activation="relu") -> Tensor:
    """Same contract as `mbrec_fast.gated_experts`, computed expert by expert."""
    E = weight.shape[0]
    outs = []
    for e in range(E):
        xe = x if x.dim() == 2 else x[e]
        outs.append(expert_ref(xe, weight[e], None if bias is None else bias[e],
                            None if ln_weight is None else ln_weight[e], None if ln_bias is None else ln_bias[e],
                            ln_eps, activation))
    stacked = torch.stack(outs, dim=1)  # [B, E, H]
    if gates is None:
        logits = torch.einsum("bd,gde->gbe", x, gate_weight)
        if gate_bias is not None:
            logits = logits + gate_bias.unsqueeze(1)
        if gate_mask is not None:
            logits = logits.masked_fill(~gate_mask.unsqueeze(1), float("-inf"))
        gates = torch.softmax(logits, -1)
    return torch.einsum("gbe,beh->gbh", gates, stacked)


def routed_experts_ref(x, weight, bias, route, route_weight=None, *, ln_weight=None, ln_bias=None, ln_eps=1e-5,
                       activation="relu") -> Tensor:
    """Same contract as `mbrec_fast.routed_experts`: every expert on its masked samples, summed per slot."""
    if route.dim() == 1:
        route = route.unsqueeze(1)
    if route_weight is not None and route_weight.dim() == 1:
        route_weight = route_weight.unsqueeze(1)
    out = x.new_zeros(x.shape[0], weight.shape[2])
    for e in range(weight.shape[0]):
        hit = route == e  # [B, k]
        rows = hit.any(1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        h = expert_ref(x[rows], weight[e], None if bias is None else bias[e],
                    None if ln_weight is None else ln_weight[e], None if ln_bias is None else ln_bias[e],
                    ln_eps, activation)
        w = hit[rows].to(x.dtype) if route_weight is None else (hit[rows] * route_weight[rows])
        out = out.index_add(0, rows, h * w.sum(1, keepdim=True))
    return out


def routed_linear_ref(x: Tensor, weight: Tensor, bias: Tensor, route: Tensor, relu: bool) -> Tensor:
    """``out[j] = act(x[j] @ weight[route[j]] + bias[route[j]])`` for route [B] (top-1, no LayerNorm, relu or
    none): rows grouped by expert, one addmm each (NMTR's towers on CPU, where it is as fast as the fused op)."""
    out = x.new_empty(x.shape[0], weight.shape[2])
    for e in range(weight.shape[0]):
        sel = torch.nonzero(route == e).flatten()
        if sel.numel():
            out = out.index_copy(0, sel, torch.addmm(bias[e], x.index_select(0, sel), weight[e]))
    return torch.relu(out) if relu else out


def gated_heads_ref(trunks: Tensor, gates: Tensor, weight: Tensor, bias: Tensor, ln_weight: Tensor,
                    ln_bias: Tensor) -> Tensor:
    """``sum_e gates[..., e] * LayerNorm(trunks[..., e, :] @ weight[e] + bias[e])`` for trunks [B, L, E, d] and
    gates [B, L, E] (SyNCRec's expert heads and mixture), one expert at a time."""
    B, L, E, d = trunks.shape
    mixed = trunks.new_zeros(B, L, d)
    for e in range(E):
        head = F.layer_norm(trunks[:, :, e] @ weight[e] + bias[e], (d,)) * ln_weight[e] + ln_bias[e]
        mixed = mixed + gates[..., e:e + 1] * head
    return mixed


class LoopGatedExperts(nn.Module):
    """The loop-style MMoE layer people write today: a list of `nn.Sequential` experts and one gate per task.

    forward(x) -> [T, B, H] with ``out[t] = sum_e softmax(gate_t(x))_e * expert_e(x)``. Used as the baseline in
    benchmarks and as the input of `mbrec_fast.nn.from_loop`.
    """

    def __init__(self, input_dim: int, expert_hidden: Sequence[int], num_experts: int, num_tasks: int,
                 activation: str = "relu", layer_norm: bool = False):
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "none": nn.Identity}
        self.experts = nn.ModuleList()
        for _ in range(num_experts):
            layers, d = [], input_dim
            for h in expert_hidden:
                layers.append(nn.Linear(d, h))
                if layer_norm:
                    layers.append(nn.LayerNorm(h))
                layers.append(acts[activation]())
                d = h
            self.experts.append(nn.Sequential(*layers))
        self.gates = nn.ModuleList([nn.Linear(input_dim, num_experts) for _ in range(num_tasks)])

    def forward(self, x: Tensor) -> Tensor:
        expert_out = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        return torch.stack([torch.bmm(torch.softmax(g(x), -1).unsqueeze(1), expert_out).squeeze(1)
                            for g in self.gates])
