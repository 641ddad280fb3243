"""Multi-domain multi-task CTR models: M3oE, M3REC and the baselines of the M3oE paper.

Every model maps a batch {sparse, dense, domain} to logits [B, T] — one per task, for the domain the
sample was observed in. All expert computation (experts, gated mixes, per-domain / per-(domain, task)
layers and towers) runs through the expert layers of `mbrec_fast.nn` (`ExpertBank`, `RoutedMLP`; a one-expert bank
is a plain layer) on the fused expert ops; `expert_impl="loop"` switches them to the loop-of-experts twins of
`mbrec_fast.reference.experts` over the SAME parameters (the reference and the benchmark baseline).

Baselines are head-based: a base model owns one head per (domain, task) pair. `setting` picks the form
of the M3oE table: "mdmt" (one model, D*T heads), "mtl" (one model per domain, T heads each) and "mdl"
(one model per task, D heads each).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry as _registry
from ..nn import bank as _bank
from ..nn.bank import ExpertBank, RoutedMLP, resolve_expert_impl
from ..nn.experts import cgc_expert_inputs, cgc_gate_mask, per_input_gates

__all__ = ["ExpertBank", "RoutedMLP", "FeatureEmbedding", "MLPPerHead", "SharedBottom", "MMoE", "PLE", "STAR",
           "M3oE", "M3REC", "AdaTT", "M2M", "PerGroup", "build_model", "MODEL_NAMES", "bce_loss", "balanced_bce_loss",
           "ctr_loss"]

# the family's model names and those built per (domain, task) already or MDMT by design: mbrec_fast/registry.py
MODEL_NAMES = _registry.model_names("multidomain")
MDMT_ONLY = tuple(n for n in MODEL_NAMES if _registry.MODELS[n].mdmt_only)
# the hyper-parameters the models share, stated once: every signature below uses these (the CLI reads them
# from the signatures)
EMB_DIM = 16       # embedding size per field
EXPERT_DIM = 64    # hidden size of an expert
N_EXPERTS = 4      # shared experts of MMoE / M2M
N_SHARED = 2       # shared experts of PLE / AdaTT / M3REC (M3oE: by its variant)


# ================================================================================================ features
class FeatureEmbedding(nn.Module):
    """One fused table for all sparse fields (field offsets), concatenated with the dense features."""

    def __init__(self, field_dims: Sequence[int], n_dense: int, emb_dim: int):
        super().__init__()
        self.field_dims, self.n_dense, self.emb_dim = list(field_dims), n_dense, emb_dim
        offsets = torch.tensor([0] + list(field_dims[:-1]), dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(max(sum(field_dims), 1), emb_dim)
        nn.init.normal_(self.table.weight, std=0.05)

    @property
    def out_dim(self) -> int:
        return len(self.field_dims) * self.emb_dim + self.n_dense

    def fields(self, sparse: Tensor) -> Tensor:
        """[B, F, emb]."""
        return self.table(sparse + self.offsets)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return torch.cat([self.fields(sparse).flatten(1), dense], 1)


def bce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """BCE summed over tasks, mean over samples (the objective of the M3oE paper)."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1).mean()


def balanced_bce_loss(logits: Tensor, labels: Tensor, domain: Tensor, n_domains: int) -> Tensor:
    """Domain-balanced BCE (the official M3oE trainer's loss): the mean BCE of each (domain, task) cell of the
    batch, summed over the cells present — every domain weighs alike, whatever its share of the samples."""
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [B, T]
    sums = per.new_zeros(n_domains, per.shape[1]).index_add(0, domain, per)
    counts = torch.bincount(domain, minlength=n_domains).to(per.dtype).unsqueeze(1)
    return (sums / counts.clamp(min=1)).sum()


def ctr_loss(kind: str, logits: Tensor, batch: Dict[str, Tensor], n_domains: int) -> Tensor:
    """`kind` "pooled" (bce_loss: sum over tasks, mean over samples) or "balanced" (balanced_bce_loss)."""
    if kind == "pooled":
        return bce_loss(logits, batch["labels"])
    if kind == "balanced":
        return balanced_bce_loss(logits, batch["labels"], batch["domain"], n_domains)
    raise ValueError(f"loss must be 'pooled' or 'balanced', got {kind!r}")


class _CTRModel(nn.Module):
    """Shared plumbing: embedding, heads indexed by (domain, task)."""

    name = "ctr"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, extra_kwargs=None):
        """`extra_kwargs`: the subclass's catch-all keyword dict; a deprecated `impl=` in it is taken (and removed)."""
        super().__init__()
        expert_impl = _bank.check_expert_impl(resolve_expert_impl(expert_impl, {} if extra_kwargs is None else extra_kwargs))
        self.n_domains, self.n_tasks, self.expert_impl = n_domains, n_tasks, expert_impl
        self.embedding = FeatureEmbedding(field_dims, n_dense, emb_dim)

    def heads(self, domain: Tensor) -> Tensor:
        """Head ids [T, B]: head of (domain_b, t) = domain_b * T + t."""
        t = torch.arange(self.n_tasks, device=domain.device).unsqueeze(1)
        return domain.unsqueeze(0) * self.n_tasks + t

    def set_expert_impl(self, expert_impl: str) -> None:
        """Switches every expert layer to "fused" (the fused ops) or "loop" (the loop-of-experts reference)."""
        _bank.set_expert_impl(self, expert_impl)
        self.expert_impl = expert_impl

    def set_impl(self, impl: str) -> None:
        """Deprecated name of `set_expert_impl`."""
        _bank.warn_deprecated("set_impl()", "set_expert_impl()")
        self.set_expert_impl(impl)

    @property
    def impl(self) -> str:
        """Deprecated name of `expert_impl`."""
        return self.expert_impl

    def forward(self, batch: Dict[str, Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _select_heads(per_head: Tensor, heads: Tensor) -> Tensor:
    """per_head [Hd, B, ...] and heads [T, B] -> [T, B, ...] (row heads[t, b] of column b)."""
    B = per_head.shape[1]
    b = torch.arange(B, device=heads.device).unsqueeze(0).expand_as(heads)
    return per_head[heads, b]


# ================================================================================================ baselines
class MLPPerHead(_CTRModel):
    """Single-domain single-task baseline: an independent MLP (Linear-LN-ReLU layers + tower) per (domain, task)."""

    name = "mlp"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, emb_dim=EMB_DIM, hidden=(64,), tower=(32,), expert_impl="fused", **_):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, _)
        n_heads = n_domains * n_tasks
        dims = [self.embedding.out_dim, *hidden]
        self.body = nn.ModuleList(ExpertBank(n_heads, dims[i], dims[i + 1], expert_impl=self.expert_impl) for i in range(len(dims) - 1))
        self.tower = RoutedMLP(n_heads, [dims[-1], *tower, 1], expert_impl=self.expert_impl)

    def forward(self, batch):
        x = self.embedding(batch["sparse"], batch["dense"])
        heads = self.heads(batch["domain"])  # [T, B]
        route = heads.reshape(-1)
        h = x.repeat(self.n_tasks, 1)  # [T*B, D] (task-major)
        for layer in self.body:
            h = layer.routed(h, route)
        return self.tower(h, route).view(self.n_tasks, -1).t()


class SharedBottom(_CTRModel):
    """Shared-Bottom: one bottom expert (Linear-LN-ReLU) for all heads, a tower per head."""

    name = "sharedbottom"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, emb_dim=EMB_DIM, expert_dim=EXPERT_DIM, tower=(32,), expert_impl="fused", **_):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, _)
        self.bottom = ExpertBank(1, self.embedding.out_dim, expert_dim, expert_impl=self.expert_impl)
        self.tower = RoutedMLP(n_domains * n_tasks, [expert_dim, *tower, 1], expert_impl=self.expert_impl)

    def forward(self, batch):
        x = self.embedding(batch["sparse"], batch["dense"])
        h = self.bottom.routed(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        heads = self.heads(batch["domain"])
        return self.tower(h.repeat(self.n_tasks, 1), heads.reshape(-1)).view(self.n_tasks, -1).t()


class MMoE(_CTRModel):
    """MMoE: shared experts, a softmax gate and a tower per head (per (domain, task) in the MDMT form)."""

    name = "mmoe"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, emb_dim=EMB_DIM, n_experts=N_EXPERTS,
                 expert_dim=EXPERT_DIM, tower=(32,), expert_impl="fused", **_):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, _)
        n_heads, d = n_domains * n_tasks, self.embedding.out_dim
        self.experts = ExpertBank(n_experts, d, expert_dim, expert_impl=self.expert_impl)
        self.gate_weight = nn.Parameter(torch.randn(n_heads, d, n_experts) * 0.01)
        self.gate_bias = nn.Parameter(torch.zeros(n_heads, n_experts))
        self.tower = RoutedMLP(n_heads, [expert_dim, *tower, 1], expert_impl=self.expert_impl)

    def forward(self, batch):
        x = self.embedding(batch["sparse"], batch["dense"])
        heads = self.heads(batch["domain"])
        if self.n_domains == 1:  # every head is used by every sample
            mixed = self.experts.gated(x, self.gate_weight, self.gate_bias)  # [T, B, H]
        else:
            mixed = _select_heads(self.experts.gated(x, self.gate_weight, self.gate_bias), heads)
        return self.tower(mixed.reshape(-1, mixed.shape[-1]), heads.reshape(-1)).view(self.n_tasks, -1).t()


class PLE(_CTRModel):
    """PLE: `n_levels` CGC levels of shared + per-head specific experts, gates masked to (shared, own); the
    lower levels also carry a shared gate over all experts. Towers per head.

    Level 1 runs the gated op on the shared input; higher levels use the op's per-expert-input form
    (each specific expert reads its head's output, each shared expert the shared output).
    """

    name = "ple"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, emb_dim=EMB_DIM, n_shared=N_SHARED, n_specific=1,
                 expert_dim=EXPERT_DIM, n_levels=2, tower=(32,), expert_impl="fused", **_):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, _)
        n_heads = n_domains * n_tasks
        self.n_heads, self.n_shared, self.n_specific, self.n_levels = n_heads, n_shared, n_specific, n_levels
        n_exp = n_shared + n_heads * n_specific
        # gate g < n_heads: head g's gate over shared + its own experts; gate n_heads: shared gate over all
        self.register_buffer("gate_mask", cgc_gate_mask(n_shared, n_specific, n_heads, output_shared=True),
                             persistent=False)
        # which level input each expert reads
        self.register_buffer("owner", cgc_expert_inputs(n_shared, n_specific, n_heads), persistent=False)
        d = self.embedding.out_dim
        self.levels = nn.ModuleList()
        self.gate_weights = nn.ParameterList()
        self.gate_biases = nn.ParameterList()
        for level in range(n_levels):
            d_in = d if level == 0 else expert_dim
            n_gates = n_heads + (1 if level < n_levels - 1 else 0)
            self.levels.append(ExpertBank(n_exp, d_in, expert_dim, expert_impl=self.expert_impl))
            self.gate_weights.append(nn.Parameter(torch.randn(n_gates, d_in, n_exp) * 0.01))
            self.gate_biases.append(nn.Parameter(torch.zeros(n_gates, n_exp)))
        self.tower = RoutedMLP(n_heads, [expert_dim, *tower, 1], expert_impl=self.expert_impl)

    def forward(self, batch):
        x = self.embedding(batch["sparse"], batch["dense"])
        heads = self.heads(batch["domain"])
        h = None  # [n_heads + 1, B, H] after a level
        for level, bank in enumerate(self.levels):
            n_gates = self.gate_weights[level].shape[0]
            mask = self.gate_mask[:n_gates]
            if level == 0:
                h = bank.gated(x, self.gate_weights[level], self.gate_biases[level], gate_mask=mask)
            else:
                per_expert = h[self.owner]  # [E, B, H]
                # each gate reads its own head's input: gate logits computed per gate
                gates = per_input_gates(h[:n_gates], self.gate_weights[level], self.gate_biases[level], mask)
                h = bank.gated(per_expert.contiguous(), gates=gates)
        mixed = _select_heads(h[:self.n_heads], heads)
        return self.tower(mixed.reshape(-1, mixed.shape[-1]), heads.reshape(-1)).view(self.n_tasks, -1).t()


class STAR(_CTRModel):
    """STAR (Sheng et al. 2021): star-topology FCN layers whose weight for domain d is W_shared ⊙ W_d and bias
    b_shared + b_d — run as routed experts over the D effective weights — plus an auxiliary network on the
    domain embedding whose logit is added, and a tower per (domain, task). Partitioned normalization is
    replaced by the per-domain LayerNorm of the routed experts (one LayerNorm per domain)."""

    name = "star"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, emb_dim=EMB_DIM, hidden=(64,), tower=(32,), expert_impl="fused", **_):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, _)
        dims = [self.embedding.out_dim, *hidden]
        self.star_layers = nn.ModuleList(ExpertBank(n_domains, dims[i], dims[i + 1], expert_impl=self.expert_impl) for i in range(len(dims) - 1))
        self.shared_weights = nn.ParameterList(nn.Parameter(torch.empty(dims[i], dims[i + 1]).uniform_(-1, 1) / math.sqrt(dims[i]))
                                               for i in range(len(dims) - 1))
        self.shared_biases = nn.ParameterList(nn.Parameter(torch.zeros(dims[i + 1])) for i in range(len(dims) - 1))
        for bank in self.star_layers:  # W_d starts at 1 so W_shared ⊙ W_d starts shared (as in STAR)
            nn.init.ones_(bank.weight)
            nn.init.zeros_(bank.bias)
        self.domain_emb = nn.Embedding(n_domains, emb_dim)
        self.aux = RoutedMLP(1, [emb_dim + self.embedding.out_dim, 32, n_tasks], expert_impl=self.expert_impl)
        self.tower = RoutedMLP(n_domains * n_tasks, [dims[-1], *tower, 1], expert_impl=self.expert_impl)

    def forward(self, batch):
        x = self.embedding(batch["sparse"], batch["dense"])
        dom = batch["domain"]
        h = x
        for bank, ws, bs in zip(self.star_layers, self.shared_weights, self.shared_biases):
            h = bank.routed(h, dom, weight=ws.unsqueeze(0) * bank.weight, bias=bs.unsqueeze(0) + bank.bias)
        heads = self.heads(dom)
        main = self.tower(h.repeat(self.n_tasks, 1), heads.reshape(-1)).view(self.n_tasks, -1).t()
        aux_in = torch.cat([self.domain_emb(dom), x], 1)
        return main + self.aux(aux_in, torch.zeros_like(dom))


class PerGroup(nn.Module):
    """The -MTL / -MDL forms: one independent base model per domain (mtl) or per task (mdl)."""

    def __init__(self, make, setting: str, n_domains: int, n_tasks: int):
        super().__init__()
        if setting not in ("mtl", "mdl"):
            raise ValueError(f"setting must be 'mtl' or 'mdl', got {setting!r}")
        self.setting, self.n_domains, self.n_tasks = setting, n_domains, n_tasks
        if setting == "mtl":
            self.members = nn.ModuleList(make(1, n_tasks) for _ in range(n_domains))
        else:
            self.members = nn.ModuleList(make(n_domains, 1) for _ in range(n_tasks))

    def set_expert_impl(self, expert_impl: str) -> None:
        for m in self.members:
            m.set_expert_impl(expert_impl)

    def set_impl(self, impl: str) -> None:
        """Deprecated name of `set_expert_impl`."""
        _bank.warn_deprecated("set_impl()", "set_expert_impl()")
        self.set_expert_impl(impl)

    def forward(self, batch):
        dom = batch["domain"]
        if self.setting == "mdl":
            return torch.cat([m(batch) for m in self.members], 1)
        out = None
        for d, m in enumerate(self.members):
            rows = (dom == d).nonzero().flatten()
            if rows.numel() == 0:
                continue
            sub = {k: v[rows] for k, v in batch.items() if isinstance(v, Tensor) and v.shape[:1] == dom.shape}
            sub["domain"] = torch.zeros_like(rows)
            logits = m(sub)
            out = logits.new_zeros(dom.shape[0], self.n_tasks) if out is None else out
            out = out.index_copy(0, rows, logits)
        return out


class AdaTT(_CTRModel):
    """AdaTT (Li et al., KDD'23) with the (domain, task) heads as its tasks: `n_specific` experts per head plus
    `n_shared` shared experts (AdaTT-sp, `sparse=True`: none), all Linear-LN-ReLU over the input. Head h's
    fusion unit adds a softmax gate over every expert (logits from the input) and a native residual, its own
    experts weighted by learned scalars (init 1) — both as one given-gates call of the gated op. One fusion
    level; a tower per head."""

    name = "adatt"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, emb_dim=EMB_DIM, n_specific=1, n_shared=N_SHARED,
                 expert_dim=EXPERT_DIM, tower=(32,), sparse=False, expert_impl="fused", **_):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, _)
        n_heads, d = n_domains * n_tasks, self.embedding.out_dim
        self.n_heads, self.n_specific = n_heads, n_specific
        self.n_shared = 0 if sparse else n_shared
        n_exp = n_heads * n_specific + self.n_shared
        self.experts = ExpertBank(n_exp, d, expert_dim, expert_impl=self.expert_impl)
        self.gate_weight = nn.Parameter(torch.randn(n_heads, d, n_exp) * 0.01)
        self.gate_bias = nn.Parameter(torch.zeros(n_heads, n_exp))
        self.native_weight = nn.Parameter(torch.ones(n_heads, n_specific))
        own = torch.arange(n_heads).unsqueeze(1) * n_specific + torch.arange(n_specific)  # [heads, n_specific]
        self.register_buffer("own_experts", own, persistent=False)
        self.tower = RoutedMLP(n_heads, [expert_dim, *tower, 1], expert_impl=self.expert_impl)

    def forward(self, batch):
        x = self.embedding(batch["sparse"], batch["dense"])
        heads = self.heads(batch["domain"])
        logits = torch.einsum("bd,gde->gbe", x, self.gate_weight) + self.gate_bias.unsqueeze(1)
        native = torch.zeros_like(self.gate_bias).scatter(1, self.own_experts, self.native_weight)  # [heads, E]
        gates = torch.softmax(logits, -1) + native.unsqueeze(1)
        mixed = self.experts.gated(x, gates=gates)  # [heads, B, H]
        mixed = _select_heads(mixed, heads) if self.n_domains > 1 else mixed
        return self.tower(mixed.reshape(-1, mixed.shape[-1]), heads.reshape(-1)).view(self.n_tasks, -1).t()


class M2M(_CTRModel):
    """M2M (Zhang et al., WSDM'22), from the paper's description, on the expert layers:

    * scenario knowledge s_d: a learned embedding per domain (no scenario-side features here);
    * backbone: `n_experts` shared Linear-LN-ReLU experts over the input;
    * meta attention per (domain, task): a query from a meta unit (a layer whose weights are generated from
      s_d) applied to the task embedding, softmax attention over the experts' outputs;
    * meta tower per (domain, task): a residual ReLU layer whose weights are generated from s_d and the task
      (routed op with the generated per-head weights, as STAR passes its products), then a linear output per task.
    Because s_d depends only on the domain, every generated weight is one tensor per domain (or head).
    """

    name = "m2m"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, emb_dim=EMB_DIM, n_experts=N_EXPERTS, expert_dim=EXPERT_DIM,
                 expert_impl="fused", **_):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, _)
        H, d, n_heads = expert_dim, self.embedding.out_dim, n_domains * n_tasks
        self.expert_dim = H
        self.experts = ExpertBank(n_experts, d, H, expert_impl=self.expert_impl)
        self.scenario = nn.Embedding(n_domains, emb_dim)
        self.task_emb = nn.Parameter(torch.randn(n_tasks, H) * 0.1)
        nn.init.normal_(self.scenario.weight, std=1.0)
        scale = 1 / math.sqrt(H * emb_dim)
        self.query_gen = nn.Parameter(torch.randn(emb_dim, H * H) * scale)  # meta unit of the attention
        self.tower_gen = nn.Parameter(torch.randn(n_tasks, emb_dim, H * H) * scale)  # meta tower weights per task
        self.tower_gen_bias = nn.Parameter(torch.zeros(n_tasks, emb_dim, H))
        self.meta_tower = ExpertBank(n_heads, H, H, layer_norm=False, activation="relu", expert_impl=self.expert_impl)
        self.out = ExpertBank(n_tasks, H, 1, layer_norm=False, activation="none", expert_impl=self.expert_impl)

    def forward(self, batch):
        x = self.embedding(batch["sparse"], batch["dense"])
        dom = batch["domain"]
        B, T, D, H = x.shape[0], self.n_tasks, self.n_domains, self.expert_dim
        outs = self.experts.experts_out(x)  # [B, E, H]
        s = self.scenario.weight  # [D, e]
        w_query = (s @ self.query_gen).view(D, H, H)
        queries = torch.relu(torch.einsum("th,dhk->dtk", self.task_emb, w_query))  # [D, T, H]
        q = queries[dom].transpose(0, 1)  # [T, B, H]
        att = torch.softmax(torch.einsum("tbh,beh->tbe", q, outs) / math.sqrt(H), -1)
        mixed = torch.einsum("tbe,beh->tbh", att, outs)  # [T, B, H]
        w_tower = torch.einsum("de,tek->dtk", s, self.tower_gen).reshape(D * T, H, H) + self.meta_tower.weight
        b_tower = torch.einsum("de,teh->dth", s, self.tower_gen_bias).reshape(D * T, H) + self.meta_tower.bias
        heads = self.heads(dom).reshape(-1)
        h = mixed.reshape(T * B, H)
        h = h + self.meta_tower.routed(h, heads, weight=w_tower, bias=b_tower)
        tasks = torch.arange(T, device=x.device).repeat_interleave(B)
        return self.out.routed(h, tasks).view(T, B).t()


# ================================================================================================ M3oE
M3OE_VARIANTS = {
    # the official code (Applied-Machine-Learning-Lab/M3oE, MDMTRec): see docs/multidomain.md
    "official": dict(star_dim=512, rep_dim=256, star_activation="none", rep_skip=True, tower_layer_norm=True,
                     detach_gate=True, scalar_fusion=True, fusion_init=1.0, star_init="xavier", tower_hidden=None),
    # this package before issue 15 (the paper's text as first read)
    "v1": dict(star_dim=None, rep_dim=64, star_activation="relu", rep_skip=False, tower_layer_norm=False,
               detach_gate=False, scalar_fusion=False, fusion_init=0.0, star_init="star", tower_hidden=32),
}


class M3oE(_CTRModel):
    """M3oE (Zhang et al., SIGIR'24).

    * STAR-style domain representation `x (W_shared ⊙ W_d) + b_shared + b_d` (routed over domains), then a
      Linear-LayerNorm-ReLU mapping plus a Linear-LayerNorm-ReLU skip of the input (official) — or, variant
      "v1", a ReLU after the STAR layer and a Linear+ReLU mapping without skip;
    * shared experts mixed by a softmax gate per (domain, task) (gate input detached in the official code);
    * one expert per domain mixed with `α_d·D_d + (1-α_d)/(D-1)·Σ_{j≠d} D_j`, one per task with α_t likewise
      (both mixes are the gated op with given per-sample weights);
    * fusion `shared + β_d·domain_mix + β_t·task_mix`; α, β = sigmoid of trainable scalars (`fusion_parameters()`):
      four scalars (official) or one per domain / per task (v1). `fusion="concat"` and `fusion="gated"` are the
      paper's ablations "concat modules" (tower reads [shared; domain_mix; task_mix]) and "fully gated modules"
      (one softmax gate per (domain, task) over all shared, domain and task experts, no α/β);
    * a two-layer tower per (domain, task) (Linear-LN-ReLU-Linear in the official code).
    Ablations: `fixed_fusion` (all α, β = 0.5, no AutoML), `use_domain_module`, `use_task_module`.
    """

    name = "m3oe"
    _FUSION = ("alpha_domain", "alpha_task", "beta_domain", "beta_task")

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, emb_dim=EMB_DIM, n_shared=None, expert_dim=EXPERT_DIM,
                 variant="official", fusion="add", fixed_fusion=False, use_domain_module=True, use_task_module=True,
                 expert_impl="fused", **kwargs):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, kwargs)
        if variant not in M3OE_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(M3OE_VARIANTS)}, got {variant!r}")
        if fusion not in ("add", "concat", "gated"):
            raise ValueError(f"fusion must be 'add', 'concat' or 'gated', got {fusion!r}")
        if n_shared is None:  # the official MovieLens script uses 4; v1 used the paper's text (1 on MovieLens)
            n_shared = 4 if variant == "official" else 1
        cfg = dict(M3OE_VARIANTS[variant])
        cfg.update({k: v for k, v in kwargs.items() if k in cfg and v is not None})
        if variant == "v1" and "rep_dim" not in kwargs:
            cfg["rep_dim"] = expert_dim
        self.variant, self.fusion, self.cfg = variant, fusion, cfg
        d, rep_dim = self.embedding.out_dim, cfg["rep_dim"]
        star_dim = cfg["star_dim"] or rep_dim
        self.use_domain_module, self.use_task_module = use_domain_module, use_task_module
        self.fixed_fusion = fixed_fusion or fusion == "gated"
        # domain representation: STAR layer (routed over domains) + mapping (+ skip)
        self.star = ExpertBank(n_domains, d, star_dim, layer_norm=False, activation=cfg["star_activation"], expert_impl=self.expert_impl)
        self.star_shared_weight = nn.Parameter(torch.empty(d, star_dim))
        self.star_shared_bias = nn.Parameter(torch.zeros(star_dim))
        nn.init.zeros_(self.star.bias)
        if cfg["star_init"] == "xavier":  # official: both factors xavier-uniform
            nn.init.xavier_uniform_(self.star_shared_weight)
            for w in self.star.weight:
                nn.init.xavier_uniform_(w)
        else:  # STAR's own init: W_d = 1
            nn.init.ones_(self.star.weight)
            nn.init.uniform_(self.star_shared_weight, -1 / math.sqrt(d), 1 / math.sqrt(d))
        ln = cfg["rep_skip"]  # the official mapping and skip are Linear-LN-ReLU
        self.mapping = ExpertBank(1, star_dim, rep_dim, layer_norm=ln, activation="relu", expert_impl=self.expert_impl)
        self.skip = ExpertBank(1, d, rep_dim, layer_norm=True, activation="relu", expert_impl=self.expert_impl) if cfg["rep_skip"] else None
        n_heads = n_domains * n_tasks
        n_dom = n_domains if use_domain_module else 0
        n_task = n_tasks if use_task_module else 0
        if fusion == "gated":  # one bank of shared + domain + task experts, one gate per head over all of them
            self.shared = ExpertBank(n_shared + n_dom + n_task, rep_dim, expert_dim, expert_impl=self.expert_impl)
            n_gate = n_shared + n_dom + n_task
            self.domain_experts = self.task_experts = None
        else:
            self.shared = ExpertBank(n_shared, rep_dim, expert_dim, expert_impl=self.expert_impl)
            n_gate = n_shared
            self.domain_experts = ExpertBank(n_domains, rep_dim, expert_dim, expert_impl=self.expert_impl) if use_domain_module else None
            self.task_experts = ExpertBank(n_tasks, rep_dim, expert_dim, expert_impl=self.expert_impl) if use_task_module else None
        self.shared_gate_weight = nn.Parameter(torch.randn(n_heads, rep_dim, n_gate) * 0.01)
        self.shared_gate_bias = nn.Parameter(torch.zeros(n_heads, n_gate))
        # fusion scalars (pre-sigmoid): α domain, α task, β domain, β task (one each, or one per domain / task)
        sizes = (1, 1, 1, 1) if cfg["scalar_fusion"] else (n_domains, n_tasks, n_domains, n_tasks)
        for nm, n in zip(self._FUSION, sizes):
            if self.fixed_fusion or (fusion == "concat" and nm.startswith("beta")):
                self.register_buffer(nm, torch.zeros(n))  # sigmoid(0) = 0.5, never trained (unused by concat)
            else:
                setattr(self, nm, nn.Parameter(torch.full((n,), float(cfg["fusion_init"]))))
        tower_in = expert_dim * (1 + (fusion == "concat") * ((n_dom > 0) + (n_task > 0)))
        hidden = cfg["tower_hidden"] or expert_dim
        self.tower = RoutedMLP(n_heads, [tower_in, hidden, 1], expert_impl=self.expert_impl, layer_norm=cfg["tower_layer_norm"])

    def fusion_parameters(self) -> List[nn.Parameter]:
        """The α/β scalars (empty with fixed_fusion)."""
        return [p for n, p in self.named_parameters() if n in self._FUSION]

    def main_parameters(self) -> List[nn.Parameter]:
        """Every parameter except the fusion scalars."""
        return [p for n, p in self.named_parameters() if n not in self._FUSION]

    def fusion_weights(self) -> Dict[str, List[float]]:
        """The α/β after the sigmoid."""
        return {n: torch.sigmoid(getattr(self, n).detach()).cpu().tolist() for n in self._FUSION}

    @staticmethod
    def _balance(alpha: Tensor, own: Tensor, n: int) -> Tensor:
        """Mix weights [..., n]: α on `own`, (1-α)/(n-1) elsewhere (α alone when n == 1)."""
        onehot = F.one_hot(own, n).to(alpha.dtype)
        if n == 1:
            return onehot
        a = alpha.unsqueeze(-1)
        return onehot * a + (1 - onehot) * (1 - a) / (n - 1)

    def _scalar(self, name: str, index: Tensor) -> Tensor:
        """σ(scalar) for each entry of `index` (per-domain / per-task scalars indexed, a single one broadcast)."""
        v = torch.sigmoid(getattr(self, name))
        return v[index] if v.numel() > 1 else v.expand(index.shape[0])

    def representation(self, batch) -> Tensor:
        x = self.embedding(batch["sparse"], batch["dense"])
        dom = batch["domain"]
        w = self.star_shared_weight.unsqueeze(0) * self.star.weight
        b = self.star_shared_bias.unsqueeze(0) + self.star.bias
        r = self.star.routed(x, dom, weight=w, bias=b)
        zero = torch.zeros_like(dom)
        r = self.mapping.routed(r, zero)
        if self.skip is not None:
            r = r + self.skip.routed(x, zero)
        return r

    def forward(self, batch):
        dom = batch["domain"]
        r = self.representation(batch)
        B, T, D = r.shape[0], self.n_tasks, self.n_domains
        heads = self.heads(dom)  # [T, B]
        if self.cfg["detach_gate"]:  # gate logits from the detached representation, mixes as given gates
            logits = torch.einsum("bd,gde->gbe", r.detach(), self.shared_gate_weight) + self.shared_gate_bias.unsqueeze(1)
            shared = self.shared.gated(r, gates=torch.softmax(logits, -1))
        else:
            shared = self.shared.gated(r, self.shared_gate_weight, self.shared_gate_bias)  # [D*T, B, H]
        fused = _select_heads(shared, heads) if D > 1 else shared  # [T, B, H]
        parts = [fused]
        if self.domain_experts is not None:
            gates = self._balance(self._scalar("alpha_domain", dom), dom, D).unsqueeze(0)  # [1, B, D]
            domain_mix = self.domain_experts.gated(r, gates=gates.contiguous())  # [1, B, H]
            if self.fusion == "concat":
                parts.append(domain_mix.expand(T, B, -1))
            else:
                fused = fused + self._scalar("beta_domain", dom).view(1, B, 1) * domain_mix
        if self.task_experts is not None:
            tasks = torch.arange(T, device=r.device)
            gates = self._balance(self._scalar("alpha_task", tasks), tasks, T).unsqueeze(1).expand(T, B, T)  # [T, B, T]
            task_mix = self.task_experts.gated(r, gates=gates.contiguous())  # [T, B, H]
            if self.fusion == "concat":
                parts.append(task_mix)
            else:
                fused = fused + self._scalar("beta_task", tasks).view(T, 1, 1) * task_mix
        if self.fusion == "concat":
            fused = torch.cat(parts, -1)
        return self.tower(fused.reshape(T * B, -1), heads.reshape(-1)).view(T, B).t()


# ================================================================================================ M3REC
class M3REC(_CTRModel):
    """M3REC (Lan et al., RecSys'23), built from its abstract; every choice the abstract leaves open is ours:

    * Meta-Item-Embedding Generator (MIEG): an MLP maps the item-side features (item sparse fields other than the
      id, item dense columns) to an item embedding g_i. The item's embedding is `m_i·e_id(i) + g_i`, where m_i is
      1 for items seen at least `min_item_count` times in training and 0 otherwise (cold items use g_i alone).
      Meta-learning is approximated first-order by "cold-start simulation": during training the id part of each
      sample is dropped with probability `cold_prob`, so g_i is trained on the loss it gets when it stands alone
      (the cold phase of Meta-Embedding), in the same backward pass as everything else.
    * User-Preference Transformer (UPT): a user has one embedding per scenario, u_s = e_user(u) + e_us(u, s) + p_s
      (p_s a scenario position embedding). One transformer encoder layer attends over the S scenario tokens; the
      output at the current scenario (which attends to the user's representations in the other scenarios)
      replaces the user-id field embedding.
    * Backbone: `n_shared` shared experts plus one expert per scenario (routed by scenario id).
    * Task-specific aggregate gate: per task t a softmax over [shared experts, the sample's scenario expert],
      computed from [input; scenario embedding]; then a tower per task fed [aggregate; scenario embedding].
    """

    name = "m3rec"

    def __init__(self, field_dims, n_dense, n_domains, n_tasks, *, user_field=0, item_field=1, item_sparse_fields=(),
                 item_dense_cols=(), emb_dim=EMB_DIM, n_shared=N_SHARED, expert_dim=EXPERT_DIM, tower=(32,),
                 cold_prob=0.1, min_item_count=1, n_heads_attn=2, use_generator=True, expert_impl="fused", **_):
        super().__init__(field_dims, n_dense, n_domains, n_tasks, emb_dim, expert_impl, _)
        self.user_field, self.item_field, self.cold_prob, self.min_item_count = user_field, item_field, cold_prob, min_item_count
        self.item_side_fields = [f for f in item_sparse_fields if f != item_field]
        self.item_dense_cols = list(item_dense_cols)
        n_users, n_items = field_dims[user_field], field_dims[item_field]
        # MIEG
        gen_in = emb_dim * len(self.item_side_fields) + len(self.item_dense_cols)
        self.use_generator = use_generator  # False: the ablation without MIEG (every item its id embedding alone)
        self.generator = RoutedMLP(1, [max(gen_in, 1), 2 * emb_dim, emb_dim], expert_impl=self.expert_impl) if use_generator else None
        self.register_buffer("item_seen", torch.ones(n_items))
        # UPT
        self.user_scenario = nn.Embedding(n_users * n_domains, emb_dim)
        nn.init.normal_(self.user_scenario.weight, std=0.05)
        self.scenario_pos = nn.Embedding(n_domains, emb_dim)
        heads = n_heads_attn if emb_dim % n_heads_attn == 0 else 1
        self.upt = nn.TransformerEncoderLayer(emb_dim, heads, dim_feedforward=2 * emb_dim, dropout=0.0, batch_first=True)
        # backbone + aggregate gates
        d = self.embedding.out_dim
        self.scenario_emb = nn.Embedding(n_domains, emb_dim)
        self.shared = ExpertBank(n_shared, d, expert_dim, expert_impl=self.expert_impl)
        self.scenario_experts = ExpertBank(n_domains, d, expert_dim, expert_impl=self.expert_impl)
        self.gate = nn.Linear(d + emb_dim, n_tasks * (n_shared + 1))
        self.n_shared = n_shared
        self.tower = RoutedMLP(n_tasks, [expert_dim + emb_dim, *tower, 1], expert_impl=self.expert_impl)

    def fit_item_counts(self, item_ids: Tensor) -> None:
        """Marks the items seen at least `min_item_count` times in training (call with the training item ids)."""
        counts = torch.bincount(item_ids.cpu(), minlength=self.item_seen.numel()).float()
        self.item_seen.copy_((counts >= self.min_item_count).float().to(self.item_seen.device))

    def _generated_item(self, fields: Tensor, dense: Tensor, dom: Tensor, item: Tensor, B: int) -> Tensor:
        """MIEG: `m_i·e_id(i) + g_i`, the id part dropped for unseen items (and with `cold_prob` in training)."""
        parts = [fields[:, self.item_side_fields].flatten(1)] if self.item_side_fields else []
        if self.item_dense_cols:
            parts.append(dense[:, self.item_dense_cols])
        gen_in = torch.cat(parts, 1) if parts else fields.new_zeros(B, 1)
        generated = self.generator(gen_in, torch.zeros_like(dom))
        keep = self.item_seen[item]
        if self.training and self.cold_prob > 0:
            keep = keep * (torch.rand(B, device=keep.device) >= self.cold_prob).float()
        return keep.unsqueeze(1) * fields[:, self.item_field] + generated

    def forward(self, batch):
        sparse, dense, dom = batch["sparse"], batch["dense"], batch["domain"]
        B, S, T = sparse.shape[0], self.n_domains, self.n_tasks
        fields = self.embedding.fields(sparse)  # [B, F, e]
        # MIEG
        item = sparse[:, self.item_field]
        if self.generator is None:
            item_vec = fields[:, self.item_field]
        else:
            item_vec = self._generated_item(fields, dense, dom, item, B)
        # UPT
        user = sparse[:, self.user_field]
        scen = torch.arange(S, device=sparse.device)
        tokens = self.user_scenario(user.unsqueeze(1) * S + scen) + self.scenario_pos(scen) + fields[:, self.user_field].unsqueeze(1)
        encoded = self.upt(tokens)  # [B, S, e]
        user_vec = encoded[torch.arange(B, device=dom.device), dom]
        fields = fields.clone()
        fields[:, self.item_field] = item_vec
        fields[:, self.user_field] = user_vec
        x = torch.cat([fields.flatten(1), dense], 1)
        # backbone + task aggregate gates
        s_emb = self.scenario_emb(dom)
        logits = self.gate(torch.cat([x, s_emb], 1)).view(B, T, self.n_shared + 1)
        g = torch.softmax(logits, -1).permute(1, 0, 2)  # [T, B, E+1]
        shared_mix = self.shared.gated(x, gates=g[..., :self.n_shared].contiguous())  # [T, B, H]
        scen_out = self.scenario_experts.routed(x, dom)  # [B, H]
        agg = shared_mix + g[..., self.n_shared:] * scen_out.unsqueeze(0)
        tin = torch.cat([agg, s_emb.unsqueeze(0).expand(T, B, -1)], 2).reshape(T * B, -1)
        route = torch.arange(T, device=dom.device).repeat_interleave(B)
        return self.tower(tin, route).view(T, B).t()


# ================================================================================================ factory
_BASE = {"mlp": MLPPerHead, "sharedbottom": SharedBottom, "mmoe": MMoE, "ple": PLE, "star": STAR, "m3oe": M3oE,
         "m3rec": M3REC, "adatt": AdaTT, "adatt-sp": AdaTT, "m2m": M2M}


def build_model(name: str, data, *, setting: str = "mdmt", expert_impl: str = "fused", **kwargs) -> nn.Module:
    """Model `name` for a CTRData's shapes. `setting` ("mdmt", "mtl", "mdl") applies to the baselines
    sharedbottom, mmoe, ple, star; mlp is per (domain, task) already, m3oe/m3rec are mdmt by design.
    `expert_impl`: "fused" or "loop" (`impl=` is its deprecated spelling)."""
    expert_impl = resolve_expert_impl(expert_impl, kwargs)
    key = name.lower()
    if key not in _BASE:
        raise ValueError(f"unknown model {name!r} (one of {', '.join(MODEL_NAMES)})")
    if setting not in ("mdmt", "mtl", "mdl"):
        raise ValueError(f"setting must be mdmt, mtl or mdl, got {setting!r}")
    cls = _BASE[key]
    extra = dict(kwargs)
    if key == "adatt-sp":
        extra["sparse"] = True
    if key == "m3rec":
        extra.update(user_field=data.user_field if data.user_field is not None else 0,
                     item_field=data.item_field if data.item_field is not None else 1,
                     item_sparse_fields=data.item_sparse_fields, item_dense_cols=data.item_dense_cols)
    make = lambda nd, nt: cls(data.field_dims, data.n_dense, nd, nt, expert_impl=expert_impl, **extra)  # noqa: E731
    if setting == "mdmt" or key in MDMT_ONLY:
        model = make(data.n_domains, data.n_tasks)
    else:
        model = PerGroup(make, setting, data.n_domains, data.n_tasks)
    model.model_name = key
    model.setting = setting if key not in MDMT_ONLY else "mdmt"
    return model
