"""`ExpertBank`, one layer of E experts that the multi-domain models (MMoE, PLE, STAR, M3oE, M3REC, AdaTT, M2M, the
per-head baselines) build on, `RoutedMLP` (one MLP per route id: towers per (domain, task)), and the fused-vs-loop
switch `expert_impl` that every expert module and model takes.

``expert_impl="fused"`` runs the fused ops (`mbrec_fast.gated_experts` / `mbrec_fast.routed_experts`: one GEMM for
all experts, fused LayerNorm / activation / mix); ``expert_impl="loop"`` runs the same parameters through the
loop-of-experts twins in `mbrec_fast.reference.experts` (the reference and the benchmark baseline).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..experts import gated_experts, routed_experts
from ..reference.experts import expert_ref, gated_experts_ref, routed_experts_ref

__all__ = ["EXPERT_IMPLS", "check_expert_impl", "resolve_expert_impl", "warn_deprecated", "set_expert_impl",
           "ExpertBank", "RoutedMLP"]

EXPERT_IMPLS = ("fused", "loop")


def check_expert_impl(expert_impl: str) -> str:
    """`expert_impl` itself, after checking it is "fused" or "loop"."""
    if expert_impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be 'fused' or 'loop', got {expert_impl!r}")
    return expert_impl


def warn_deprecated(old: str, new: str) -> None:
    """DeprecationWarning for a renamed name of the switch."""
    warnings.warn(f"{old} is deprecated, use {new}", DeprecationWarning, stacklevel=3)


def resolve_expert_impl(expert_impl, legacy: dict, old_name: str = "impl"):
    """The switch value, taking a deprecated spelling (`old_name`, popped from the keyword dict `legacy`) when given:
    `impl=` (multi-domain models, `build_model`, `ExpertBank`, `RoutedMLP`, `mix_expert_heads`) became
    `expert_impl=`."""
    if old_name in legacy:
        warn_deprecated(f"{old_name}=", "expert_impl=")
        expert_impl = legacy.pop(old_name)
    return expert_impl


def set_expert_impl(module: nn.Module, expert_impl: str) -> None:
    """Switches every `ExpertBank` inside `module` to `expert_impl` ("fused" or "loop")."""
    check_expert_impl(expert_impl)
    for m in module.modules():
        if isinstance(m, ExpertBank):
            m.expert_impl = expert_impl


class ExpertBank(nn.Module):
    """E experts `act(LayerNorm(x W_e + b_e))`, D -> H, stored as weight [E, D, H] (a one-expert bank is a plain layer):
    the one layer of experts every expert module builds on (`nn.experts.ExpertStack` stacks them).

    `gated` mixes them with softmax gates (learned, `gate_weight [G, D, E]`) or given weights (`gates [G, B, E]`)
    into G outputs [G, B, H]; `routed` sends each sample to one expert (`route [B]`). `expert_impl="fused"` calls
    the fused ops, `expert_impl="loop"` the loop-of-experts reference on the same parameters.
    """

    def __init__(self, n_experts: int, d_in: int, d_out: int, *, layer_norm: bool = True, activation: str = "relu",
                 expert_impl: str = "fused", bias: bool = True, ln_eps: float = 1e-5, **deprecated):
        super().__init__()
        expert_impl = resolve_expert_impl(expert_impl, deprecated)
        if deprecated:
            raise TypeError(f"unexpected keyword arguments {sorted(deprecated)}")
        check_expert_impl(expert_impl)
        self.n_experts, self.d_in, self.d_out, self.activation = n_experts, d_in, d_out, activation
        self.expert_impl, self.ln_eps = expert_impl, float(ln_eps)
        self.weight = nn.Parameter(torch.empty(n_experts, d_in, d_out))
        if bias:
            self.bias = nn.Parameter(torch.empty(n_experts, d_out))
        else:
            self.register_parameter("bias", None)
        if layer_norm:
            self.ln_weight = nn.Parameter(torch.ones(n_experts, d_out))
            self.ln_bias = nn.Parameter(torch.zeros(n_experts, d_out))
        else:
            self.register_parameter("ln_weight", None)
            self.register_parameter("ln_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert: weight, then bias, from U(-1/sqrt(d_in), 1/sqrt(d_in))."""
        bound = 1 / math.sqrt(self.d_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def impl(self) -> str:
        """Deprecated name of `expert_impl`."""
        return self.expert_impl

    @impl.setter
    def impl(self, value: str) -> None:
        self.expert_impl = check_expert_impl(value)

    def _expert(self, x: Tensor, e: int, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return expert_ref(x, weight[e], None if bias is None else bias[e],
                          None if self.ln_weight is None else self.ln_weight[e],
                          None if self.ln_bias is None else self.ln_bias[e], self.ln_eps, self.activation)

    def op_kwargs(self) -> dict:
        """The bank's bias, LayerNorm and activation as keyword arguments of the fused ops."""
        return dict(bias=self.bias, ln_weight=self.ln_weight, ln_bias=self.ln_bias, ln_eps=self.ln_eps,
                    activation=self.activation)

    def experts_out(self, x: Tensor) -> Tensor:
        """Every expert's output [B, E, H] (x [B, D] shared or [E, B, D] per expert)."""
        if self.expert_impl == "loop":
            return torch.stack([self._expert(x if x.dim() == 2 else x[e], e, self.weight, self.bias)
                                for e in range(self.n_experts)], 1)
        B = x.shape[-2]
        eye = torch.eye(self.n_experts, dtype=torch.float32, device=x.device).unsqueeze(1).expand(-1, B, -1)
        return self.gated(x, gates=eye.contiguous()).transpose(0, 1)

    def gated(self, x: Tensor, gate_weight: Optional[Tensor] = None, gate_bias: Optional[Tensor] = None,
              gates: Optional[Tensor] = None, gate_mask: Optional[Tensor] = None) -> Tensor:
        """Gated mixes [G, B, H]: learned gates (logits x @ gate_weight[g] + gate_bias[g], x 2-D) or given `gates`."""
        op = gated_experts_ref if self.expert_impl == "loop" else gated_experts
        return op(x, self.weight, self.bias, gates=gates, gate_weight=gate_weight, gate_bias=gate_bias,
                  gate_mask=gate_mask, ln_weight=self.ln_weight, ln_bias=self.ln_bias, ln_eps=self.ln_eps,
                  activation=self.activation)

    def routed(self, x: Tensor, route: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
        """Each sample through its own expert: x [B, D], route [B] -> [B, H]. `weight`/`bias` override the bank's
        (STAR passes W_shared * W_d)."""
        w = self.weight if weight is None else weight
        b = self.bias if bias is None else bias
        if self.n_experts == 1:  # every row has the one expert: a plain layer (the op's routing is pure overhead here)
            return self._expert(x, 0, w, b)
        if self.expert_impl == "loop":
            return routed_experts_ref(x, w, b, route, ln_weight=self.ln_weight, ln_bias=self.ln_bias,
                                      ln_eps=self.ln_eps, activation=self.activation)
        return routed_experts(x, w, b, route.view(-1, 1), None, ln_weight=self.ln_weight, ln_bias=self.ln_bias,
                              ln_eps=self.ln_eps, activation=self.activation)


class RoutedMLP(nn.Module):
    """One MLP per route id (towers per (domain, task), per-head MLPs): routed banks, ReLU between, linear last."""

    def __init__(self, n_routes: int, dims: Sequence[int], *, expert_impl: str = "fused", layer_norm: bool = False,
                 **deprecated):
        super().__init__()
        expert_impl = resolve_expert_impl(expert_impl, deprecated)
        if deprecated:
            raise TypeError(f"unexpected keyword arguments {sorted(deprecated)}")
        self.layers = nn.ModuleList(
            ExpertBank(n_routes, dims[i], dims[i + 1], layer_norm=layer_norm and i < len(dims) - 2,
                       activation="relu" if i < len(dims) - 2 else "none", expert_impl=expert_impl)
            for i in range(len(dims) - 1))

    def forward(self, x: Tensor, route: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer.routed(x, route)
        return x
