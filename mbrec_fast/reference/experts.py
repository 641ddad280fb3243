"""Loop-of-experts reference for `gated_experts` / `routed_experts` (the pattern used by torch-rechub,
DeepCTR-Torch, FuxiCTR: one small GEMM per expert in a Python loop, stack, softmax gate, bmm per task).

Plain autograd code in the input dtype: slow and simple on purpose.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["gated_experts_ref", "routed_experts_ref", "LoopGatedExperts"]


def _expert(xe: Tensor, w: Tensor, b: Optional[Tensor], lnw, lnb, eps: float, activation: str) -> Tensor:
    h = xe @ w
    if b is not None:
        h = h + b
    if lnw is not None or lnb is not None:
        h = F.layer_norm(h, (h.shape[-1],), lnw, lnb, eps)
    if activation == "relu":
        return torch.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    return h


def gated_experts_ref(x, weight, bias=None, *, gates=None, gate_weight=None, gate_bias=None, gate_mask=None,
                      ln_weight=None, ln_bias=None, ln_eps=1e-5, activation="relu") -> Tensor:
    """Same contract as `mbrec_fast.gated_experts`, computed expert by expert."""
    E = weight.shape[0]
    outs = []
    for e in range(E):
        xe = x if x.dim() == 2 else x[e]
        outs.append(_expert(xe, weight[e], None if bias is None else bias[e],
                            None if ln_weight is None else ln_weight[e], None if ln_bias is None else ln_bias[e],
                            ln_eps, activation))
    stacked = torch.stack(outs, dim=1)  # [B, E, H]
    if gates is None:
        mixes = []
        for t in range(gate_weight.shape[0]):
            logits = x @ gate_weight[t]
            if gate_bias is not None:
                logits = logits + gate_bias[t]
            if gate_mask is not None:
                logits = logits.masked_fill(~gate_mask[t], float("-inf"))
            mixes.append(torch.softmax(logits, dim=-1))
        gates = torch.stack(mixes)
    return torch.stack([torch.bmm(gates[t].unsqueeze(1), stacked).squeeze(1) for t in range(gates.shape[0])])


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
        h = _expert(x[rows], weight[e], None if bias is None else bias[e],
                    None if ln_weight is None else ln_weight[e], None if ln_bias is None else ln_bias[e],
                    ln_eps, activation)
        w = hit[rows].to(x.dtype) if route_weight is None else (hit[rows] * route_weight[rows])
        out = out.index_add(0, rows, h * w.sum(1, keepdim=True))
    return out


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
