"""Multi-layer expert modules on the fused ops: MMoE (`GatedExperts`), `CGC` / `PLE`, `RoutedExperts` (STAR, MEMBER,
SyNCRec paths) and `DomainTaskExperts` (M3oE), plus `from_loop` to convert loop-style modules, and the CGC / PLE gate
masks and per-input gates that the multi-domain PLE model shares. One-layer banks and the `expert_impl` switch are
in `mbrec_fast.nn.bank`.

Multi-layer experts (``expert_hidden=[h1, ..., hL]``): layers 1..L-1 of all experts run as one batched GEMM that
keeps the per-expert hidden state [E, B, h] (the first from the shared X, then `baddbmm`); the last layer is fused
with the gate in `gated_experts` (per-expert input form). Dropout applies after each hidden layer (not after the
fused last layer). Each expert layer is ``Linear -> [LayerNorm] -> activation``.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._experts_torch import activate
from ..experts import gated_experts, routed_experts, ACTIVATIONS
from .bank import ExpertBank

__all__ = ["ExpertStack", "GatedExperts", "CGC", "PLE", "RoutedExperts", "DomainTaskExperts", "from_loop",
           "cgc_gate_mask", "cgc_expert_inputs", "per_input_gates"]

Hidden = Union[int, Sequence[int]]


def _as_list(expert_hidden: Hidden) -> List[int]:
    dims = [expert_hidden] if isinstance(expert_hidden, int) else list(expert_hidden)
    if not dims or any(int(h) <= 0 for h in dims):
        raise ValueError(f"expert_hidden must be a positive int or a non-empty list of them, got {expert_hidden!r}")
    return [int(h) for h in dims]


def _count(value: int, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class ExpertStack(nn.Module):
    """E parallel MLP experts ``input_dim -> expert_hidden``: one `ExpertBank` ([E, d_in, d_out]) per layer.

    `hidden(x)` runs all layers but the last (returns x itself for one-layer experts); the last layer's
    parameters (`weight[-1]`, ...) are handed to a fused op by the owning module. `weight`, `bias`, `ln_weight`
    and `ln_bias` list the layers' tensors (empty lists for no bias / no LayerNorm).
    """

    def __init__(self, input_dim: int, expert_hidden: Hidden, num_experts: int, activation: str = "relu",
                 layer_norm: bool = False, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts = _count(num_experts, "num_experts")
        self.input_dim = _count(input_dim, "input_dim")
        self.dims = _as_list(expert_hidden)
        self.activation, self.layer_norm, self.dropout = activation, layer_norm, float(dropout)
        self.has_bias = bias
        self.layers = nn.ModuleList()
        d = input_dim
        for h in self.dims:
            self.layers.append(ExpertBank(num_experts, d, h, layer_norm=layer_norm, activation=activation, bias=bias))
            d = h

    @property
    def weight(self) -> List[Tensor]:
        return [bank.weight for bank in self.layers]

    @property
    def bias(self) -> List[Tensor]:
        return [bank.bias for bank in self.layers] if self.has_bias else []

    @property
    def ln_weight(self) -> List[Tensor]:
        return [bank.ln_weight for bank in self.layers] if self.layer_norm else []

    @property
    def ln_bias(self) -> List[Tensor]:
        return [bank.ln_bias for bank in self.layers] if self.layer_norm else []

    @property
    def ln_eps(self) -> float:
        return self.layers[0].ln_eps

    @ln_eps.setter
    def ln_eps(self, eps: float) -> None:
        for bank in self.layers:
            bank.ln_eps = float(eps)

    @property
    def output_dim(self) -> int:
        return self.dims[-1]

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert (each bank's own)."""
        for bank in self.layers:
            bank.reset_parameters()

    def layer(self, i: int) -> dict:
        """Keyword arguments of layer i for the fused ops."""
        return self.layers[i].op_kwargs()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # state dicts saved before the layers became banks name them `weight.{i}`, `bias.{i}`, `ln_weight.{i}`, ...
        for name in ("weight", "bias", "ln_weight", "ln_bias"):
            for i in range(len(self.dims)):
                old = f"{prefix}{name}.{i}"
                if old in state_dict:
                    state_dict[f"{prefix}layers.{i}.{name}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _layer_dense(self, h: Tensor, i: int) -> Tensor:
        """One hidden layer for all experts: [B, d] or [E, B, d] -> [E, B, h]."""
        w = self.weight[i]
        if h.dim() == 2:
            h = h.unsqueeze(0).expand(w.shape[0], -1, -1)
        y = torch.bmm(h, w) if not self.has_bias else torch.baddbmm(self.bias[i].unsqueeze(1), h, w)
        if self.layer_norm:
            y = F.layer_norm(y, (y.shape[-1],), None, None, self.ln_eps) * self.ln_weight[i].unsqueeze(1) \
                + self.ln_bias[i].unsqueeze(1)
        y = activate(y, self.activation)
        return F.dropout(y, self.dropout, self.training)

    def hidden(self, x: Tensor) -> Tensor:
        """All layers but the last: x [B, D] (or [E, B, D]) -> [E, B, h_{L-1}]; x unchanged for one layer."""
        h = x
        for i in range(len(self.dims) - 1):
            h = self._layer_dense(h, i)
        return h


class GatedExperts(nn.Module):
    """MMoE layer: E experts shared by T tasks, one softmax gate per task over the input.

    Args mirror torch-rechub/DeepCTR's MMoE: ``input_dim``, ``expert_hidden`` (int or list, the expert MLP dims),
    ``num_experts``, ``num_tasks``, ``activation``, ``layer_norm``, ``dropout``; ``gate_mask`` (bool [T, E]) limits
    each task's softmax to a subset of experts (used by CGC).

    forward(x [B, D], gates=None) -> [T, B, H]. With ``gates`` ([T, B, E]) the internal gate is bypassed.
    """

    def __init__(self, input_dim: int, expert_hidden: Hidden, num_experts: int, num_tasks: int,
                 activation: str = "relu", layer_norm: bool = False, dropout: float = 0.0,
                 gate_mask: Optional[Tensor] = None, bias: bool = True):
        super().__init__()
        self.num_tasks = _count(num_tasks, "num_tasks")
        self.experts = ExpertStack(input_dim, expert_hidden, num_experts, activation, layer_norm, dropout, bias)
        E = self.experts.num_experts
        self.gate_weight = nn.Parameter(torch.empty(num_tasks, input_dim, E))
        self.gate_bias = nn.Parameter(torch.empty(num_tasks, E))
        bound = 1.0 / math.sqrt(input_dim)
        nn.init.uniform_(self.gate_weight, -bound, bound)
        nn.init.uniform_(self.gate_bias, -bound, bound)
        if gate_mask is not None:
            gate_mask = torch.as_tensor(gate_mask, dtype=torch.bool)
            if tuple(gate_mask.shape) != (num_tasks, E):
                raise ValueError(f"gate_mask must be [num_tasks={num_tasks}, num_experts={E}], "
                                 f"got {tuple(gate_mask.shape)}")
        self.register_buffer("gate_mask", gate_mask, persistent=False)

    @property
    def output_dim(self) -> int:
        return self.experts.output_dim

    def gate_probs(self, x: Tensor) -> Tensor:
        """Gate probabilities [T, B, E] (masked softmax), for inspection and multi-layer experts."""
        logits = torch.einsum("bd,tde->tbe", x, self.gate_weight) + self.gate_bias.unsqueeze(1)
        if self.gate_mask is not None:
            logits = logits.masked_fill(~self.gate_mask.unsqueeze(1), float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(self, x: Tensor, gates: Optional[Tensor] = None) -> Tensor:
        ex = self.experts
        last = len(ex.dims) - 1
        h = ex.hidden(x)
        if gates is None and last == 0:
            return gated_experts(x, ex.weight[last], gate_weight=self.gate_weight, gate_bias=self.gate_bias,
                                 gate_mask=self.gate_mask, **ex.layer(last))
        if gates is None:
            gates = self.gate_probs(x)
        return gated_experts(h, ex.weight[last], gates=gates, **ex.layer(last))


def cgc_gate_mask(n_shared: int, n_specific: int, n_tasks: int, output_shared: bool) -> Tensor:
    """CGC / PLE gate masks, bool [n_tasks (+1), E] over the experts [shared..., task 0's..., task 1's..., ...]:
    task t's gate sees the shared experts and its own; the shared gate (row n_tasks, with `output_shared`) sees all."""
    E = n_shared + n_specific * n_tasks
    mask = torch.zeros(n_tasks + int(output_shared), E, dtype=torch.bool)
    mask[:, :n_shared] = True
    for t in range(n_tasks):
        mask[t, n_shared + t * n_specific:n_shared + (t + 1) * n_specific] = True
    if output_shared:
        mask[n_tasks] = True
    return mask


def cgc_expert_inputs(n_shared: int, n_specific: int, n_tasks: int) -> Tensor:
    """Which per-task input each CGC expert reads at levels >= 2 (long [E]): shared experts read the shared input
    (index n_tasks), task t's experts read task t's."""
    return torch.tensor([n_tasks] * n_shared + [t for t in range(n_tasks) for _ in range(n_specific)],
                        dtype=torch.long)


def per_input_gates(x: Tensor, gate_weight: Tensor, gate_bias: Tensor, gate_mask: Tensor) -> Tensor:
    """Masked softmax gates [G, B, E] where gate g reads its own input x[g] ([G, B, D]; PLE levels >= 2)."""
    logits = torch.einsum("gbd,gde->gbe", x, gate_weight) + gate_bias.unsqueeze(1)
    return torch.softmax(logits.masked_fill(~gate_mask.unsqueeze(1), float("-inf")), -1)


class CGC(nn.Module):
    """Customized Gate Control (PLE's extraction layer): shared experts plus ``n_specific_experts`` per task; task
    t's gate mixes the shared experts and its own. With ``output_shared=True`` (inner PLE levels) one more gate
    over all experts produces the shared output.

    forward(x) with x [B, D] (first level) or [T(+1), B, D] (per-task inputs, shared input last) -> [T(+1), B, H].
    """

    def __init__(self, input_dim: int, expert_hidden: Hidden, n_shared_experts: int, n_specific_experts: int,
                 num_tasks: int, activation: str = "relu", layer_norm: bool = False, dropout: float = 0.0,
                 output_shared: bool = False):
        super().__init__()
        S = _count(n_shared_experts, "n_shared_experts", 0)
        P = _count(n_specific_experts, "n_specific_experts", 0)
        T = _count(num_tasks, "num_tasks")
        if S + P * T == 0:
            raise ValueError("CGC needs at least one expert (n_shared_experts + n_specific_experts * num_tasks > 0)")
        E = S + P * T
        n_out = T + int(output_shared)
        mask = cgc_gate_mask(S, P, T, output_shared)
        if not bool(mask.any(1).all()):
            raise ValueError("with n_shared_experts = 0, n_specific_experts must be >= 1")
        # input index per expert / per gate when inputs are per task: shared experts and gate read input T.
        expert_input = cgc_expert_inputs(S, P, T)
        gate_input = torch.arange(n_out)
        self.num_tasks, self.output_shared = T, output_shared
        self.mix = GatedExperts(input_dim, expert_hidden, E, n_out, activation, layer_norm, dropout, gate_mask=mask)
        self.register_buffer("expert_input", expert_input, persistent=False)
        self.register_buffer("gate_input", gate_input, persistent=False)

    @property
    def output_dim(self) -> int:
        return self.mix.output_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return self.mix(x)
        T = self.num_tasks
        if x.shape[0] != T + 1:
            raise ValueError(f"per-task CGC input must be [num_tasks + 1 = {T + 1}, B, D], got {tuple(x.shape)}")
        m = self.mix
        gx = x.index_select(0, self.gate_input.clamp(max=T))  # gate t reads task t's input; shared gate reads x[T]
        gates = per_input_gates(gx, m.gate_weight, m.gate_bias, m.gate_mask)
        xe = x.index_select(0, self.expert_input)  # [E, B, D]
        ex = m.experts
        last = len(ex.dims) - 1
        h = ex.hidden(xe)
        return gated_experts(h, ex.weight[last], gates=gates, **ex.layer(last))


class PLE(nn.Module):
    """Progressive Layered Extraction: ``num_levels`` CGC levels; inner levels also carry a shared output.

    Args as in torch-rechub's PLE: ``input_dim``, ``expert_hidden`` (per-expert MLP dims, the same at every level),
    ``n_shared_experts``, ``n_specific_experts``, ``num_tasks``, ``num_levels``. forward(x [B, D]) -> [T, B, H].
    """

    def __init__(self, input_dim: int, expert_hidden: Hidden, n_shared_experts: int, n_specific_experts: int,
                 num_tasks: int, num_levels: int = 2, activation: str = "relu", layer_norm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        _count(num_levels, "num_levels")
        dims = _as_list(expert_hidden)
        self.levels = nn.ModuleList()
        d = input_dim
        for level in range(num_levels):
            self.levels.append(CGC(d, dims, n_shared_experts, n_specific_experts, num_tasks, activation, layer_norm,
                                   dropout, output_shared=level < num_levels - 1))
            d = dims[-1]

    @property
    def output_dim(self) -> int:
        return self.levels[-1].output_dim

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for level in self.levels:
            h = level(h)
        return h


class RoutedExperts(nn.Module):
    """Each sample runs through its own expert(s): STAR-style domain towers (route = domain id), MEMBER's
    visited/unvisited heads, SyNCRec's single-domain paths; or a learned top-k router when ``top_k`` is set.

    forward(x [B, D], route=None ([B] or [B, k] ids), route_weight=None ([B, k])) -> [B, H].
    Without ``route`` the module's router picks the top ``top_k`` experts by softmax score, weights renormalized.
    """

    def __init__(self, input_dim: int, expert_hidden: Hidden, num_experts: int, activation: str = "relu",
                 layer_norm: bool = False, dropout: float = 0.0, top_k: Optional[int] = None, bias: bool = True):
        super().__init__()
        self.experts = ExpertStack(input_dim, expert_hidden, num_experts, activation, layer_norm, dropout, bias)
        self.top_k = top_k
        if top_k is not None:
            if not 1 <= top_k <= num_experts:
                raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
            self.router = nn.Linear(input_dim, num_experts)

    @property
    def output_dim(self) -> int:
        return self.experts.output_dim

    def forward(self, x: Tensor, route: Optional[Tensor] = None, route_weight: Optional[Tensor] = None) -> Tensor:
        if route is None:
            if self.top_k is None:
                raise ValueError("route is required (this RoutedExperts has no router: top_k=None)")
            probs = torch.softmax(self.router(x), dim=-1)
            top_p, route = probs.topk(self.top_k, dim=-1)
            route_weight = top_p / top_p.sum(-1, keepdim=True)
        ex = self.experts
        last = len(ex.dims) - 1
        if last == 0:
            return routed_experts(x, ex.weight[0], route=route, route_weight=route_weight, **ex.layer(0))
        # Hidden layers per routed (sample, slot) pair, then the weighted last layer.
        r = route if route.dim() == 2 else route.unsqueeze(1)
        B, k = r.shape
        h = x.repeat_interleave(k, dim=0) if k > 1 else x
        flat = r.reshape(-1)
        for i in range(last):
            h = routed_experts(h, ex.weight[i], route=flat, **ex.layer(i))
            h = F.dropout(h, ex.dropout, self.training)
        rw = None if route_weight is None else route_weight.reshape(-1)
        out = routed_experts(h, ex.weight[last], route=flat, route_weight=rw, **ex.layer(last))
        return out.view(B, k, -1).sum(1) if k > 1 else out


class DomainTaskExperts(nn.Module):
    """M3oE's three expert modules with the two-level fusion, as ONE fused gated-experts call.

    Experts (each Linear -> LayerNorm -> ReLU by default): ``n_shared_experts`` shared, one per domain, one per
    task, all reading x. For a sample of domain d and task t:

    * shared mix: softmax gate of the (d, t) pair over the shared experts;
    * domain mix: ``α_d·D_d + (1-α_d)/(n_domains-1)·Σ_{j≠d} D_j`` (just D_d when n_domains = 1);
    * task mix: ``α_t·T_t + (1-α_t)/(n_tasks-1)·Σ_{j≠t} T_j`` (just T_t when n_tasks = 1);
    * output: ``shared + β_d·domain_mix + β_t·task_mix``, α = sigmoid(alpha logits), β = sigmoid(beta logits).

    All three mixes are folded into one gate tensor [T, B, S + n_domains + n_tasks], so the op runs one GEMM.
    The α/β logits (``alpha_domain``, ``alpha_task``, ``beta_domain``, ``beta_task``) are separate parameters:
    `fusion_parameters()` yields them and `main_parameters()` everything else, for M3oE's two optimizers.

    forward(x [B, D], domain_ids [B] int) -> [n_tasks, B, H] (each sample's own domain).
    """

    def __init__(self, input_dim: int, expert_dim: Hidden, n_domains: int, n_tasks: int, n_shared_experts: int = 1,
                 activation: str = "relu", layer_norm: bool = True, dropout: float = 0.0, alpha_init: float = 0.0,
                 beta_init: float = 0.0):
        super().__init__()
        self.n_domains = _count(n_domains, "n_domains")
        self.n_tasks = _count(n_tasks, "n_tasks")
        self.n_shared = _count(n_shared_experts, "n_shared_experts")
        E = self.n_shared + n_domains + n_tasks
        self.experts = ExpertStack(input_dim, expert_dim, E, activation, layer_norm, dropout)
        self.gate_weight = nn.Parameter(torch.empty(n_domains, n_tasks, input_dim, self.n_shared))
        self.gate_bias = nn.Parameter(torch.zeros(n_domains, n_tasks, self.n_shared))
        nn.init.uniform_(self.gate_weight, -1.0 / math.sqrt(input_dim), 1.0 / math.sqrt(input_dim))
        self.alpha_domain = nn.Parameter(torch.full((n_domains,), float(alpha_init)))
        self.alpha_task = nn.Parameter(torch.full((n_tasks,), float(alpha_init)))
        self.beta_domain = nn.Parameter(torch.full((n_domains,), float(beta_init)))
        self.beta_task = nn.Parameter(torch.full((n_tasks,), float(beta_init)))

    _FUSION = ("alpha_domain", "alpha_task", "beta_domain", "beta_task")

    @property
    def output_dim(self) -> int:
        return self.experts.output_dim

    def fusion_parameters(self) -> Iterable[nn.Parameter]:
        """The α/β fusion logits (trained by M3oE's separate optimizer)."""
        return [getattr(self, n) for n in self._FUSION]

    def main_parameters(self) -> Iterable[nn.Parameter]:
        """Every parameter except the fusion logits."""
        return [p for n, p in self.named_parameters() if n not in self._FUSION]

    @staticmethod
    def _leave_one_mix(alpha: Tensor, n: int) -> Tensor:
        """[n, n] rows: α_i on the diagonal, (1-α_i)/(n-1) elsewhere (identity when n = 1)."""
        if n == 1:
            return torch.ones(1, 1, dtype=alpha.dtype, device=alpha.device)
        eye = torch.eye(n, dtype=alpha.dtype, device=alpha.device)
        a = alpha.unsqueeze(1)
        return eye * a + (1 - eye) * (1 - a) / (n - 1)

    def gates(self, x: Tensor, domain_ids: Tensor) -> Tensor:
        """The fused gate tensor [T, B, S + n_domains + n_tasks]."""
        if domain_ids.dim() != 1 or domain_ids.shape[0] != x.shape[0]:
            raise ValueError(f"domain_ids must be [B={x.shape[0]}], got shape {tuple(domain_ids.shape)}")
        if not torch.compiler.is_compiling() and domain_ids.numel():
            lo, hi = int(domain_ids.min()), int(domain_ids.max())
            if lo < 0 or hi >= self.n_domains:
                raise ValueError(f"domain_ids must lie in [0, {self.n_domains}), found [{lo}, {hi}]")
        B, T, nD = x.shape[0], self.n_tasks, self.n_domains
        # shared: gate of pair (domain_ids[b], t) -> logits for all (d, t), then pick each sample's domain.
        logits = torch.einsum("bi,dtis->bdts", x, self.gate_weight) + self.gate_bias
        logits = logits[torch.arange(B, device=x.device), domain_ids]  # [B, T, S]
        shared = torch.softmax(logits, -1).permute(1, 0, 2)  # [T, B, S]
        a_d = torch.sigmoid(self.alpha_domain).to(x.dtype)
        a_t = torch.sigmoid(self.alpha_task).to(x.dtype)
        b_d = torch.sigmoid(self.beta_domain).to(x.dtype)
        b_t = torch.sigmoid(self.beta_task).to(x.dtype)
        dom = (self._leave_one_mix(a_d, nD) * b_d.unsqueeze(1))[domain_ids]  # [B, nD]
        task = self._leave_one_mix(a_t, T) * b_t.unsqueeze(1)  # [T, T]
        return torch.cat([shared, dom.unsqueeze(0).expand(T, B, nD), task.unsqueeze(1).expand(T, B, T)], dim=-1)

    def forward(self, x: Tensor, domain_ids: Tensor) -> Tensor:
        g = self.gates(x, domain_ids)
        ex = self.experts
        last = len(ex.dims) - 1
        return gated_experts(ex.hidden(x), ex.weight[last], gates=g.contiguous(), **ex.layer(last))


def from_loop(experts: Sequence[nn.Module], gates: Optional[Sequence[nn.Module]] = None,
              gate_mask: Optional[Tensor] = None) -> nn.Module:
    """Converts a loop-style expert layer into the fused module with identical outputs (same dtype/device).

    ``experts``: E `nn.Sequential`s of the same structure, each a chain of ``Linear [LayerNorm] [activation]
    [Dropout]`` blocks (activation: ReLU, GELU(approximate='none'), SiLU, or none).
    ``gates``: T modules, each ``nn.Linear(D, E)`` or ``nn.Sequential(nn.Linear(D, E), nn.Softmax(-1))``, read as
    ``out[t] = Σ_e softmax(gate_t(x))_e · expert_e(x)`` -> returns a `GatedExperts`. Without gates returns a
    `RoutedExperts` (forward(x, route, route_weight)).
    """
    experts = list(experts)
    if not experts:
        raise ValueError("experts is empty: E must be >= 1")
    specs = [_parse_expert(e, i) for i, e in enumerate(experts)]
    first = specs[0]
    for i, s in enumerate(specs[1:], 1):
        if [(l["lin"].in_features, l["lin"].out_features, l["ln"] is not None, l["act"], l["lin"].bias is not None)
                for l in s] != [(l["lin"].in_features, l["lin"].out_features, l["ln"] is not None, l["act"],
                                 l["lin"].bias is not None) for l in first]:
            raise ValueError(f"experts[{i}] does not have the structure of experts[0]")
    acts = {l["act"] for l in first}
    if len(acts) != 1:
        raise ValueError("all expert layers must use the same activation")
    act = acts.pop()
    ln = first[0]["ln"] is not None
    if any((l["ln"] is not None) != ln for l in first):
        raise ValueError("LayerNorm must be on every expert layer or on none")
    ref = first[0]["lin"].weight
    dims = [l["lin"].out_features for l in first]
    D, E = first[0]["lin"].in_features, len(experts)
    # The fused stack has one dropout rate after every hidden layer, none after the last, and one LayerNorm
    # eps: refuse experts it could not reproduce instead of returning a module that computes other numbers.
    for i, s in enumerate(specs):
        if s[-1]["dropout"] > 0:
            raise ValueError(f"experts[{i}]: a Dropout after the last layer is not supported by the fused module")
    rates = {l["dropout"] for s in specs for l in s[:-1]}
    if len(rates) > 1:
        raise ValueError(f"all hidden expert layers must use the same Dropout rate, got {sorted(rates)}")
    if ln:
        eps = {l["ln"].eps for s in specs for l in s}
        if len(eps) > 1:
            raise ValueError(f"all expert LayerNorms must use the same eps, got {sorted(eps)}")
    dropout = max((l["dropout"] for l in first), default=0.0)
    bias = first[0]["lin"].bias is not None
    kw = dict(activation=act, layer_norm=ln, dropout=dropout)
    if gates is None:
        mod = RoutedExperts(D, dims, E, bias=bias, **kw)
        stack = mod.experts
    else:
        gates = list(gates)
        if not gates:
            raise ValueError("gates is empty: T must be >= 1")
        mod = GatedExperts(D, dims, E, len(gates), gate_mask=gate_mask, bias=bias, **kw)
        stack = mod.experts
        gws, gbs = [], []
        for t, g in enumerate(gates):
            lin = _parse_gate(g, t)
            if (lin.in_features, lin.out_features) != (D, E):
                raise ValueError(f"gates[{t}] must map {D} -> {E}, got {lin.in_features} -> {lin.out_features}")
            gws.append(lin.weight.detach().t())
            gbs.append(lin.bias.detach() if lin.bias is not None else torch.zeros(E, dtype=ref.dtype,
                                                                                   device=ref.device))
        mod.gate_weight.data = torch.stack(gws).clone()
        mod.gate_bias.data = torch.stack(gbs).clone()
    mod.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for i in range(len(dims)):
            stack.weight[i].copy_(torch.stack([s[i]["lin"].weight.t() for s in specs]))
            if bias:
                stack.bias[i].copy_(torch.stack([s[i]["lin"].bias for s in specs]))
            if ln:
                eps = {s[i]["ln"].eps for s in specs}
                stack.ln_eps = eps.pop()
                stack.ln_weight[i].copy_(torch.stack([_ln_w(s[i]["ln"], dims[i], ref) for s in specs]))
                stack.ln_bias[i].copy_(torch.stack([_ln_b(s[i]["ln"], dims[i], ref) for s in specs]))
    mod.train(experts[0].training)
    return mod


def _ln_w(ln: nn.LayerNorm, h: int, ref: Tensor) -> Tensor:
    return ln.weight if ln.weight is not None else torch.ones(h, dtype=ref.dtype, device=ref.device)


def _ln_b(ln: nn.LayerNorm, h: int, ref: Tensor) -> Tensor:
    return ln.bias if ln.bias is not None else torch.zeros(h, dtype=ref.dtype, device=ref.device)


def _parse_expert(expert: nn.Module, index: int) -> List[dict]:
    mods = list(expert) if isinstance(expert, nn.Sequential) else [expert]
    layers: List[dict] = []
    for m in mods:
        if isinstance(m, nn.Linear):
            layers.append(dict(lin=m, ln=None, act="none", dropout=0.0))
            continue
        if not layers:
            raise ValueError(f"experts[{index}] must start with nn.Linear, found {type(m).__name__}")
        cur = layers[-1]
        if isinstance(m, nn.LayerNorm) and cur["ln"] is None and cur["act"] == "none":
            if tuple(m.normalized_shape) != (cur["lin"].out_features,):
                raise ValueError(f"experts[{index}]: LayerNorm must normalize over the Linear's output")
            cur["ln"] = m
        elif isinstance(m, (nn.ReLU, nn.GELU, nn.SiLU, nn.Identity)) and cur["act"] == "none":
            if isinstance(m, nn.GELU) and m.approximate != "none":
                raise ValueError(f"experts[{index}]: only exact GELU (approximate='none') is supported")
            cur["act"] = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Identity: "none"}[type(m)]
        elif isinstance(m, nn.Dropout):
            cur["dropout"] = m.p
        else:
            raise ValueError(f"experts[{index}]: unsupported layer {type(m).__name__} (expected Linear, LayerNorm, "
                             "ReLU/GELU/SiLU, Dropout)")
    return layers


def _parse_gate(gate: nn.Module, index: int) -> nn.Linear:
    if isinstance(gate, nn.Linear):
        return gate
    if isinstance(gate, nn.Sequential) and len(gate) == 2 and isinstance(gate[0], nn.Linear) and \
            isinstance(gate[1], nn.Softmax) and gate[1].dim in (-1, 1):
        return gate[0]
    raise ValueError(f"gates[{index}] must be nn.Linear or nn.Sequential(nn.Linear, nn.Softmax(dim=-1))")
