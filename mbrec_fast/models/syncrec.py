"""SyNCRec (Park et al., SIGIR'24): single- and cross-domain sequential recommendation trained together.

* Item, domain and position embeddings feed two groups of causal transformer-encoder experts with distinct
  parameters: `single_experts` (the pacer's) and `cross_experts` (the runner's).
* Partitioned gating: task t (one single-domain task per domain, then the cross-domain task) has one softmax gate
  over each group; its output is `r * own_group_mix + (1 - r) * other_group_mix`. In the single-domain (SDSR) pass
  the cross experts are detached, in the cross-domain (CDSR) pass the single experts are (the asymmetry). The
  detached group runs under `torch.no_grad`, which is the same gradient as `.detach()` without storing activations.
* Negative-transfer gap per domain d: `gap_d = L_cross_d - L_single_d` (mean next-item losses of the positions whose
  target is in d, in the two passes of the same batch). The gaps are smoothed over steps by an exponential moving
  average and turned into weights `w = D * ((1 - eps) * softmax(-gap / T) + eps / D)` (mean 1) that scale each
  domain's cross-domain loss: a domain with more negative transfer gets LESS weight (the paper and CGRec), which
  limits what its cross loss pushes into the shared cross-domain experts (`reweight="lower"`; "raise" is the
  opposite reading, "none" the ablation). Losses are per-domain sums over positions (`domain_loss="sum"`, as the
  official code) or the mean of per-domain means ("mean").
* Gradient behaviour of the gap weights (`gap_grad`):
  - "detach" (default): the weights are constants of the step. Letting gradient flow through L_single_d would
    reward the pacer for changing its own loss to move the weights.
  - "cross": the current step's gap uses L_cross_d with gradient and L_single_d detached; the single losses stay
    untouched by the weighting.
  The EMA buffer itself never carries gradient (it is a running statistic): with momentum m, only the current
  step's (1 - m) share of the smoothed gap is differentiable in "cross" mode.
* Mutual-information loss between the single- and cross-domain representations of the same domain: a bilinear
  discriminator scores aligned pairs (the two states that predict the same target item) against pairs shuffled
  within the domain, with the Jensen-Shannon (softplus) bound, as in Deep InfoMax.
* Scores are dot products of the cross-domain state with the item embedding table (one table for both passes).

Defects of the public release avoided on purpose: distinct expert/gate modules (not one shared object), gap
weights that follow the measured gaps (its gap layers never train), several negatives per position (from
`mbrec_fast.sample_sequence_negatives`). Defaults follow the official script: 1 single + 4 cross experts, 2 layers,
r = 0.8, MI weight 1. `n_single=0` is the ablation without single-domain experts (one shared group, trained by
both passes).

Expert mixing through the fused op: every expert is a causal transformer trunk followed by its own output head
``Linear(d, d) -> LayerNorm`` (the head replaces the trunk's final LayerNorm). The heads of all E = E_s + E_c
experts and the partitioned gate mix run as ONE `mbrec_fast.gated_experts` call with per-expert inputs
x [E, n, d] (the trunk outputs at the n non-padding positions) and precomputed gates [1, n, E] =
[r * g_own, (1 - r) * g_other] laid out in the expert order (single experts first). The detached group's trunk
outputs come from `torch.no_grad` and its head parameters enter the op as `.detach()`ed copies, so the asymmetry
holds inside the fused op too. The trunks are full attention stacks, which no fused expert op covers; each group's
trunks run as one batched transformer (`StackedCausalEncoder`) whose output is already the op's expert-major
layout. `expert_impl="loop"` computes the same trunks (one expert at a time through torch's attention), heads and
mixture with plain torch (the reference the tests compare against).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..experts import gated_experts
from ..nn.bank import check_expert_impl, resolve_expert_impl
from ..reference.experts import gated_heads_ref
from .sasrec import (DIM, DROPOUT, MAX_LEN, N_HEADS, N_LAYERS, StackedCausalEncoder, histories_to_inputs,
                     sampled_softmax_loss)

__all__ = ["SyNCRec", "gap_weights", "mix_expert_heads", "mix_expert_heads_expert_major"]

GAP_GRAD = ("detach", "cross")
REWEIGHT = ("lower", "raise", "none")
DOMAIN_LOSS = ("sum", "mean")


def gap_weights(gaps: torch.Tensor, temperature: float, eps: float = 0.0,
                present: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w = D' * ((1 - eps) softmax(gaps / T) + eps / D') over the present domains (D' of them); 0 elsewhere."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if present is None:
        present = torch.ones_like(gaps, dtype=torch.bool)
    n = present.sum().clamp_min(1)
    logits = (gaps / temperature).masked_fill(~present, float("-inf"))
    if not bool(present.any()):
        return torch.zeros_like(gaps)
    p = torch.softmax(logits, 0)
    w = n * ((1 - eps) * p + eps / n)
    return w.masked_fill(~present, 0.0)


class SyNCRec(nn.Module):
    """Asymmetric cooperative mixture of transformer experts for single- and cross-domain next-item prediction."""

    def __init__(self, n_items: int, n_domains: int, item_domain: torch.Tensor, dim: int = DIM, n_single: int = 1,
                 n_cross: int = 4, n_layers: int = N_LAYERS, n_heads: int = N_HEADS, max_len: int = MAX_LEN,
                 dropout: float = DROPOUT, r: float = 0.8, temperature: float = 1.0, momentum: float = 0.9,
                 smoothing: float = 0.1, mi_weight: float = 1.0, gap_grad: str = "detach", expert_impl: str = "fused",
                 reweight: str = "lower", domain_loss: str = "sum", warmup_steps: int = 0):
        super().__init__()
        if reweight not in REWEIGHT:
            raise ValueError(f"reweight must be one of {REWEIGHT}, got {reweight!r}")
        if domain_loss not in DOMAIN_LOSS:
            raise ValueError(f"domain_loss must be one of {DOMAIN_LOSS}, got {domain_loss!r}")
        self.reweight, self.domain_loss = reweight, domain_loss
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.expert_impl = check_expert_impl(expert_impl)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"r must lie in [0, 1], got {r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must lie in [0, 1], got {smoothing}")
        if gap_grad not in GAP_GRAD:
            raise ValueError(f"gap_grad must be one of {GAP_GRAD}, got {gap_grad!r}")
        if n_single < 0 or n_cross < 1:
            raise ValueError(f"n_single must be >= 0 and n_cross >= 1, got {n_single} and {n_cross}")
        self.n_items, self.n_domains, self.dim, self.max_len = n_items, n_domains, dim, max_len
        self.r, self.temperature, self.momentum, self.smoothing = r, temperature, momentum, smoothing
        self.mi_weight, self.gap_grad = mi_weight, gap_grad
        self.item_emb = nn.Embedding(n_items + 2, dim, padding_idx=n_items)
        self.dom_emb = nn.Embedding(n_domains + 1, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        dom = torch.full((n_items + 2,), n_domains, dtype=torch.int64)
        dom[:n_items] = torch.as_tensor(item_domain, dtype=torch.int64)
        self.register_buffer("token_domain", dom, persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.n_single, self.n_cross = n_single, n_cross
        # each group's trunks run as one batched transformer (same initial values as a ModuleList of CausalEncoders)
        self.single_experts = StackedCausalEncoder(n_single, dim, n_layers, n_heads, dropout)
        self.cross_experts = StackedCausalEncoder(n_cross, dim, n_layers, n_heads, dropout)
        E = n_single + n_cross  # output heads of every expert (single experts first): Linear(d, d) -> LayerNorm
        self.head_weight = nn.Parameter(torch.stack([nn.init.xavier_uniform_(torch.empty(dim, dim)) for _ in range(E)]))
        self.head_bias = nn.Parameter(torch.zeros(E, dim))
        self.head_ln_weight = nn.Parameter(torch.ones(E, dim))
        self.head_ln_bias = nn.Parameter(torch.zeros(E, dim))
        n_tasks = n_domains + 1  # tasks 0..D-1: single-domain per domain; D: cross-domain
        if n_single:
            self.gate_single = nn.Parameter(torch.randn(n_tasks, dim, n_single) * dim ** -0.5)
        else:  # ablation "w/o single-domain experts": both passes share the cross experts
            self.register_parameter("gate_single", None)
        self.gate_cross = nn.Parameter(torch.randn(n_tasks, dim, n_cross) * dim ** -0.5)
        self.out_norm = nn.LayerNorm(dim)
        self.mi_bilinear = nn.Parameter(torch.eye(dim) / dim ** 0.5)
        self.register_buffer("gap_ema", torch.zeros(n_domains))
        self.register_buffer("gap_seen", torch.zeros(n_domains, dtype=torch.bool))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int64))
        nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()

    @property
    def items(self) -> torch.Tensor:
        return self.item_emb.weight[:self.n_items]

    # ------------------------------------------------------------------ encoder
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(tokens) * self.dim ** 0.5 + self.dom_emb(self.token_domain[tokens])
        x = x + self.pos_emb(torch.arange(tokens.shape[-1], device=tokens.device))
        return self.dropout(x)

    def _run(self, experts: StackedCausalEncoder, x: torch.Tensor, keep: torch.Tensor, grad: bool) -> torch.Tensor:
        """Trunk outputs [E_group, n, d] of one expert group at the n kept positions: one batched transformer
        ("fused"), or the experts one at a time ("loop", the reference). grad=False: under `torch.no_grad` (the
        detached group)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return experts(x, keep) if self.expert_impl == "fused" else experts.forward_loop(x, keep)

    @staticmethod
    def _gate(x_kept: torch.Tensor, gate: torch.Tensor, task_kept: torch.Tensor) -> torch.Tensor:
        """Softmax gate [n, E_group] of each position's task over one group, from its input embedding [n, d]."""
        logits = torch.einsum("nd,tde->nte", x_kept, gate)            # every task's logits (few tasks), then pick
        return torch.softmax(logits[torch.arange(x_kept.shape[0], device=x_kept.device), task_kept], -1)

    def _gates_and_trunks(self, x: torch.Tensor, keep: torch.Tensor, task: torch.Tensor, mode: str):
        """At the kept positions (n of them): trunk outputs expert-major [E, n, d], gates [n, E] and the slice of
        the experts this pass trains."""
        idx = torch.nonzero(keep.flatten()).flatten()
        x_kept = x.reshape(-1, x.shape[-1]).index_select(0, idx)
        task_kept = task.repeat_interleave(x.shape[1]).index_select(0, idx)
        if self.n_single == 0:  # no single-domain group: one shared group, trained by both passes
            return (self._run(self.cross_experts, x, keep, grad=True), self._gate(x_kept, self.gate_cross, task_kept),
                    slice(None))
        single = self._run(self.single_experts, x, keep, grad=mode == "single")   # [E_s, n, d] trunk outputs
        cross = self._run(self.cross_experts, x, keep, grad=mode == "cross")
        g_s, g_c = self._gate(x_kept, self.gate_single, task_kept), self._gate(x_kept, self.gate_cross, task_kept)
        w_s, w_c = (self.r, 1.0 - self.r) if mode == "single" else (1.0 - self.r, self.r)
        own = slice(0, self.n_single) if mode == "single" else slice(self.n_single, None)
        return torch.cat([single, cross], 0), torch.cat([w_s * g_s, w_c * g_c], -1), own

    def encode(self, tokens: torch.Tensor, task: torch.Tensor, mode: str) -> torch.Tensor:
        """Hidden states [B, L, d] of token rows [B, L] for per-row tasks [B] in the 'single' or 'cross' pass.

        Only the non-padding positions are computed (their states are those of the whole padded computation:
        rows are left-aligned and attention is causal); the padding positions' states are 0 (no loss, no
        prediction reads them)."""
        if mode not in ("single", "cross"):
            raise ValueError(f"mode must be 'single' or 'cross', got {mode!r}")
        B, L = tokens.shape
        x = self.embed(tokens)
        keep = tokens != self.n_items                                      # PAD = n_items
        trunks, gates, own = self._gates_and_trunks(x, keep, task, mode)   # [E, n, d], [n, E]
        params = []
        for p in (self.head_weight, self.head_bias, self.head_ln_weight, self.head_ln_bias):
            keep_e = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            keep_e[own] = True
            shape = (-1,) + (1,) * (p.dim() - 1)
            params.append(torch.where(keep_e.view(shape), p, p.detach()))   # the other group's heads: no gradient
        mixed = self.out_norm(mix_expert_heads_expert_major(trunks, gates, *params, expert_impl=self.expert_impl))
        idx = torch.nonzero(keep.flatten()).flatten()
        return mixed.new_zeros(B * L, self.dim).index_copy(0, idx, mixed).view(B, L, self.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-domain hidden states [B, L, d] (the prediction path)."""
        task = torch.full((tokens.shape[0],), self.n_domains, dtype=torch.int64, device=tokens.device)
        return self.encode(tokens, task, "cross")

    @torch.no_grad()
    def user_repr(self, histories: Sequence[torch.Tensor], batch_size: int = 1024) -> torch.Tensor:
        """Cross-domain state [B, d] after each history (scores = state @ items.T)."""
        out = []
        dev = self.item_emb.weight.device
        for s in range(0, len(histories), batch_size):
            tokens, last = histories_to_inputs(histories[s:s + batch_size], self.max_len, self.n_items)
            h = self(tokens.to(dev))
            out.append(h[torch.arange(h.shape[0], device=dev), last.to(dev)])
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=dev)

    # ------------------------------------------------------------------ losses
    def losses(self, batch: Dict[str, torch.Tensor], update_ema: bool = True) -> Dict[str, torch.Tensor]:
        """All training losses of one batch of windows (see `make_training_windows`) with negatives.

        batch: cross_in/cross_tgt [B, L], cross_neg [B, L, K], single_in/single_tgt [B, D, L], single_neg
        [B, D, L, K], align [B, L]. Returns loss (to minimise) and its parts: single_d, cross_d [D], gap [D]
        (current step), weights [D], mi.
        """
        D = self.n_domains
        B, L = batch["cross_in"].shape
        dev = batch["cross_in"].device
        # ---- single-domain pass: one row per (user, domain) with at least one target
        Ls = batch["single_in"].shape[-1]  # the single rows may be trimmed shorter than the merged ones
        s_in = batch["single_in"].reshape(B * D, Ls)
        s_tgt = batch["single_tgt"].reshape(B * D, Ls)
        s_neg = batch["single_neg"].reshape(B * D, Ls, -1)
        s_task = torch.arange(D, device=dev).repeat(B)
        rows = torch.nonzero(s_tgt[:, 0] >= 0).flatten()
        h_s = self.encode(s_in[rows], s_task[rows], "single")
        l_s, v_s = sampled_softmax_loss(h_s, self.item_emb.weight, s_tgt[rows], s_neg[rows])
        dom_s = s_task[rows][:, None].expand_as(v_s)
        # ---- cross-domain pass
        c_tgt = batch["cross_tgt"]
        h_c = self(batch["cross_in"])
        l_c, v_c = sampled_softmax_loss(h_c, self.item_emb.weight, c_tgt, batch["cross_neg"])
        dom_c = self.token_domain[c_tgt.clamp_min(0)].masked_fill(~v_c, D)
        # ---- per-domain means and sums (both passes predict the same targets: equal counts per domain)
        single_d, n_s = _domain_means(l_s, v_s, dom_s, D)
        cross_d, n_c = _domain_means(l_c, v_c, dom_c, D)
        present = (n_s > 0) & (n_c > 0)
        gap_now = cross_d.detach() - single_d.detach()
        if self.gap_grad == "cross":
            gap_now = cross_d - single_d.detach()
        if update_ema and self.training:
            with torch.no_grad():
                fresh = present & ~self.gap_seen
                ema = torch.where(fresh, gap_now.detach(),
                                  self.momentum * self.gap_ema + (1 - self.momentum) * gap_now.detach())
                self.gap_ema.copy_(torch.where(present, ema, self.gap_ema))
                self.gap_seen |= present
                self.steps_seen += 1
        prev = self.gap_ema.detach()
        # the smoothed gap: EMA of past steps plus this step's share (the only differentiable part in "cross")
        if update_ema and self.training:
            smoothed = torch.where(present & self.gap_seen, prev + (1 - self.momentum) * (gap_now - gap_now.detach()), prev)
        else:
            smoothed = torch.where(self.gap_seen, prev, gap_now)
        weights = self.weights_from_gaps(smoothed, present)
        if self.training and int(self.steps_seen) <= self.warmup_steps:  # gaps of untrained models: uniform
            weights = present.to(weights.dtype)
        if self.domain_loss == "sum":  # per-domain sums over positions (official), / the batch's target count
            n_pos = n_c[present].sum().clamp_min(1)
            loss_single = (single_d * n_s)[present].sum() / n_pos
            loss_cross = (weights * cross_d * n_c)[present].sum() / n_pos
        else:  # every present domain alike: mean over domains of the per-domain means
            n_present = present.sum().clamp_min(1)
            loss_single = single_d[present].sum() / n_present
            loss_cross = (weights * cross_d)[present].sum() / n_present
        mi = self._mi_loss(h_s, rows, h_c, batch, v_c, dom_c)
        loss = loss_single + loss_cross + self.mi_weight * mi
        return {"loss": loss, "single": loss_single.detach(), "cross": loss_cross.detach(), "mi": mi.detach(),
                "single_d": single_d.detach(), "cross_d": cross_d.detach(), "gap": gap_now.detach(),
                "weights": weights.detach(), "present": present}

    def weights_from_gaps(self, gaps: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-loss weights [D] (mean 1 over present domains) from negative-transfer gaps (cross - single loss).

        reweight "lower" (the paper, after CGRec): w = D' ((1 - eps) softmax(-gap / T) + eps / D'), the domain
        with more negative transfer gets less weight; "raise": softmax(+gap / T), the opposite reading; "none":
        1 for every present domain (ablation w/o reweighting)."""
        if present is None:
            present = torch.ones_like(gaps, dtype=torch.bool)
        if self.reweight == "none":
            return present.to(gaps.dtype)
        sign = -1.0 if self.reweight == "lower" else 1.0
        return gap_weights(sign * gaps, self.temperature, self.smoothing, present)

    def current_weights(self) -> torch.Tensor:
        """The weights the smoothed gaps give now (domains never seen: excluded, weight 0)."""
        seen = self.gap_seen if bool(self.gap_seen.any()) else torch.ones_like(self.gap_seen)
        return self.weights_from_gaps(self.gap_ema, seen)

    def _mi_loss(self, h_s: torch.Tensor, rows: torch.Tensor, h_c: torch.Tensor, batch: Dict[str, torch.Tensor],
                 v_c: torch.Tensor, dom_c: torch.Tensor) -> torch.Tensor:
        """Jensen-Shannon MI bound between aligned single/cross states, negatives shuffled within each domain."""
        if self.mi_weight == 0:
            return h_c.new_zeros(())
        D = self.n_domains
        B, L = v_c.shape
        b_idx, t_idx = torch.nonzero(v_c, as_tuple=True)
        if b_idx.numel() < 2:
            return h_c.new_zeros(())
        d = dom_c[b_idx, t_idx]
        j = batch["align"][b_idx, t_idx]
        # row of (user b, domain d) among the single-pass rows
        row_of = torch.full((B * D,), -1, dtype=torch.int64, device=h_c.device)
        row_of[rows] = torch.arange(rows.numel(), device=h_c.device)
        r = row_of[b_idx * D + d]
        keep = (r >= 0) & (j >= 0)
        s = h_s[r[keep], j[keep]]
        c = h_c[b_idx[keep], t_idx[keep]]
        d = d[keep]
        # shuffle the cross states within each domain (a random permutation of the members of each domain)
        key = d.double() * 2 + torch.rand(d.numel(), device=d.device, dtype=torch.float64)
        order = torch.argsort(key)               # grouped by domain, random inside
        shifted = order.roll(1)
        same = d[order] == d[shifted]
        perm = torch.arange(d.numel(), device=d.device)
        perm[order] = torch.where(same, shifted, order)
        pos = torch.einsum("nd,de,ne->n", s, self.mi_bilinear, c)
        neg = torch.einsum("nd,de,ne->n", s, self.mi_bilinear, c[perm])
        valid_neg = perm != torch.arange(d.numel(), device=d.device)
        return F.softplus(-pos).mean() + (F.softplus(neg) * valid_neg).sum() / valid_neg.sum().clamp_min(1)


def mix_expert_heads(trunks: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     ln_weight: torch.Tensor, ln_bias: torch.Tensor, expert_impl: str = "fused",
                     **deprecated) -> torch.Tensor:
    """sum_e gates[..., e] * LayerNorm(trunks[..., e, :] @ weight[e] + bias[e]) for trunks [B, L, E, d], gates
    [B, L, E]: one `gated_experts` call ("fused", after an expert-major copy of the trunks) or the loop twin
    `reference.experts.gated_heads_ref` ("loop"). SyNCRec itself calls `mix_expert_heads_expert_major` (its batched
    trunks are expert-major already). `impl=` is the deprecated spelling of `expert_impl=`."""
    expert_impl = resolve_expert_impl(expert_impl, deprecated)
    if deprecated:
        raise TypeError(f"unexpected keyword arguments {sorted(deprecated)}")
    B, L, E, d = trunks.shape
    if check_expert_impl(expert_impl) == "fused":
        xe = trunks.reshape(B * L, E, d).transpose(0, 1).contiguous()   # [E, B*L, d]
        return mix_expert_heads_expert_major(xe, gates.reshape(B * L, E), weight, bias, ln_weight, ln_bias).view(B, L, d)
    return gated_heads_ref(trunks, gates, weight, bias, ln_weight, ln_bias)


def mix_expert_heads_expert_major(trunks: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                  expert_impl: str = "fused") -> torch.Tensor:
    """The same mixture [N, d] for expert-major trunks [E, N, d] and gates [N, E] (the layout the batched trunks
    produce and `gated_experts` takes: no copy): one `gated_experts` call, or the loop twin ("loop")."""
    E, N, d = trunks.shape
    if check_expert_impl(expert_impl) == "fused":
        return gated_experts(trunks, weight, bias, gates=gates.reshape(1, N, E), ln_weight=ln_weight,
                             ln_bias=ln_bias, activation="none")[0]
    return gated_heads_ref(trunks.permute(1, 0, 2)[None], gates[None], weight, bias, ln_weight, ln_bias)[0]


def _domain_means(loss: torch.Tensor, valid: torch.Tensor, dom: torch.Tensor,
                  n_domains: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean loss per domain [D] over valid positions (0 where a domain has none), and the position counts [D]."""
    idx = dom.masked_fill(~valid, n_domains).flatten()
    sums = torch.zeros(n_domains + 1, dtype=loss.dtype, device=loss.device).index_add(0, idx, loss.flatten())
    cnt = torch.bincount(idx, minlength=n_domains + 1).to(loss.dtype)
    return (sums / cnt.clamp_min(1))[:n_domains], cnt[:n_domains]
