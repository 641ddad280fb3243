"""NMTR: neural multi-task recommendation over cascaded behaviors (Gao et al., ICDE'19 / TKDE).

One user and one item embedding table shared by every behavior; one NCF interaction unit per behavior
r (GMF, MLP or NeuMF); cascaded logits along the behavior order (weakest first)

    out^0 = f^0(p, q) + b_i^0,    out^r = out^{r-1} + f^r(p, q) + b_i^r,    y^r = sigmoid(out^r)

and a lambda-weighted sum of per-behavior pointwise log losses. Each training interaction (u, i, r) is a
positive at behavior r with `neg_ratio` negatives from the sampler at behavior r: mode "exclusive"
(the paper: any item u did not do at r, so an item u only viewed is a negative for "buy" - the
cascade-aware part) or "cascade" (a level mixture, see `mbrec_fast.batching.default_level_probs`).

The per-behavior MLP towers are routed experts: every (example, head s <= r) pair is one row routed to
expert s, so an example at behavior r runs exactly the r + 1 heads its cascaded logit needs. By default
each layer is either the package's fused `mbrec_fast.routed_experts` op (`expert_impl="fused"`) or its loop twin
`mbrec_fast.reference.experts.routed_linear_ref` (`expert_impl="loop"`: rows grouped by head, one GEMM per head;
same math). `expert_impl=None` (default) picks the fused op (on the CPU its per-head GEMMs run on the package's
segment GEMM, 1.3-1.5x the loop's training step on Tmall; before that kernel the two measured within noise and the
CPU default was the loop). Evaluation does not route:
for a [users x items] block every head is needed, and the first layer splits into a user half and an
item half (one broadcast add instead of a [b * n, 2d] GEMM), which routed rows cannot express.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import PairBatches, default_level_probs
from ..experts import routed_experts
from ..nn.bank import check_expert_impl, warn_deprecated
from ..reference.experts import routed_linear_ref
from .base import MultiBehaviorModel, Scorer, check_model_kwargs, gather_rows

__all__ = ["NMTR", "INTERACTIONS"]

INTERACTIONS = ("gmf", "mlp", "neumf")
EVAL_ITEM_TILE = 256  # items per evaluation tile of score_block (with eval_user_block users: ~1 MB per layer)


class NMTR(MultiBehaviorModel):
    """Neural multi-task recommendation with cascaded per-behavior NCF units.

    n_behaviors: behaviors in cascade order (last = target). interaction: "gmf" | "mlp" | "neumf"
    (NeuMF here shares the embeddings between its GMF and MLP parts, as in the paper).
    mlp_layers: tower depth (paper's best: 3), widths 2d -> d -> d/2 -> ... (halving, at least 1).
    loss_weights: lambda_r per behavior (normalized to sum 1; default equal). The batch loss is
    R * mean_j(lambda_{r_j} * BCE_j), i.e. the plain mean BCE when the weights are equal.
    neg_mode: sampler mode "exclusive" (paper) or "cascade" with `level_probs` [R, R].
    expert_impl: "fused" / "loop": the fused routed-experts op / its loop twin for the towers (None: fused).
    `fused_experts` (True / False / None) is its deprecated spelling.
    reg: L2 on the embedding rows of a batch (per example).
    """

    name = "nmtr"
    ddp_find_unused_parameters = True  # a batch without some behavior leaves that head unused

    def __init__(self, n_users: int, n_items: int, n_behaviors: int, dim: int = 64, interaction: str = "neumf",
                 mlp_layers: int = 3, loss_weights: Optional[Sequence[float]] = None, neg_ratio: int = 4,
                 reg: float = 0.0, neg_mode: str = "exclusive", level_probs=None, eval_user_block: int = 64,
                 expert_impl: Optional[str] = None, fused_experts: Optional[bool] = None):
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
        if n_behaviors < 1:
            raise ValueError(f"n_behaviors must be >= 1, got {n_behaviors}")
        if dim < 1 or neg_ratio < 1 or mlp_layers < 1:
            raise ValueError(f"dim, neg_ratio and mlp_layers must be >= 1, got {dim}, {neg_ratio}, {mlp_layers}")
        if neg_mode not in ("exclusive", "cascade"):
            raise ValueError(f"neg_mode must be 'exclusive' or 'cascade', got {neg_mode!r}")
        weights = torch.full((n_behaviors,), 1.0 / n_behaviors, dtype=torch.float64) if loss_weights is None \
            else torch.as_tensor(list(loss_weights), dtype=torch.float64)
        if weights.numel() != n_behaviors or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"loss_weights must be {n_behaviors} non-negative numbers with a positive sum, "
                             f"got {list(loss_weights)}")
        self.n_users, self.n_items, self.n_behaviors, self.dim = n_users, n_items, n_behaviors, dim
        self.interaction, self.neg_ratio, self.reg, self.neg_mode = interaction, neg_ratio, reg, neg_mode
        self.eval_user_block, self.expert_impl = eval_user_block, expert_impl
        if expert_impl is not None:
            check_expert_impl(expert_impl)
        if fused_experts is not None:
            warn_deprecated("fused_experts=", "expert_impl=")
            self.fused_experts = fused_experts
        self.register_buffer("loss_weights", (weights / weights.sum()).float(), persistent=False)
        self.level_probs = None
        if neg_mode == "cascade":
            table = default_level_probs(n_behaviors) if level_probs is None else torch.as_tensor(level_probs, dtype=torch.float64)
            if tuple(table.shape) != (n_behaviors, n_behaviors):
                raise ValueError(f"level_probs must have shape ({n_behaviors}, {n_behaviors}), got {tuple(table.shape)}")
            self.level_probs = table

        R = n_behaviors
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user_emb.weight, std=0.01)
        nn.init.normal_(self.item_emb.weight, std=0.01)
        self.item_bias = nn.Parameter(torch.zeros(R, n_items))           # b_i^r
        self.use_gmf = interaction in ("gmf", "neumf")
        self.use_mlp = interaction in ("mlp", "neumf")
        if self.use_gmf:
            self.gmf_h = nn.Parameter(torch.empty(R, dim))
            nn.init.uniform_(self.gmf_h, -math.sqrt(3.0 / dim), math.sqrt(3.0 / dim))
        widths = [2 * dim] + [max(dim // (2 ** k), 1) for k in range(mlp_layers)]
        self.mlp_widths = widths
        self.mlp_weight = nn.ParameterList()
        self.mlp_bias = nn.ParameterList()
        if self.use_mlp:
            for a, b in zip(widths[:-1], widths[1:]):
                w = torch.empty(R, a, b)
                for r in range(R):  # He initialization (the paper's [17]) per head
                    nn.init.kaiming_uniform_(w[r].T, nonlinearity="relu")
                self.mlp_weight.append(nn.Parameter(w))
                self.mlp_bias.append(nn.Parameter(torch.zeros(R, b)))
            self.mlp_h = nn.Parameter(torch.empty(R, widths[-1]))
            nn.init.uniform_(self.mlp_h, -math.sqrt(3.0 / widths[-1]), math.sqrt(3.0 / widths[-1]))

    @classmethod
    def from_data(cls, data, **kwargs) -> "NMTR":
        """Model for `data`'s behaviors (kwargs go to the constructor)."""
        check_model_kwargs(cls, kwargs)
        return cls(data.n_users, data.n_items, data.n_behaviors, **kwargs)

    @property
    def fused_experts(self) -> Optional[bool]:
        """Deprecated spelling of `expert_impl`: True = "fused", False = "loop", None = the default."""
        return None if self.expert_impl is None else self.expert_impl == "fused"

    @fused_experts.setter
    def fused_experts(self, value: Optional[bool]) -> None:
        self.expert_impl = None if value is None else ("fused" if value else "loop")

    # ------------------------------------------------------------------------------ scores
    def _tower(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        impl = self.expert_impl if self.expert_impl is not None else "fused"
        for w, b in zip(self.mlp_weight, self.mlp_bias):
            x = routed_experts(x, w, b, route, activation="relu") if impl == "fused" else \
                routed_linear_ref(x, w, b, route, True)
        return x

    def logits(self, users: torch.Tensor, items: torch.Tensor, behaviors) -> torch.Tensor:
        """Cascaded logits out^r(u, i) of (users[j], items[j]) at behaviors[j] (int or tensor)."""
        dev = self.user_emb.weight.device
        users, items = users.to(dev).long(), items.to(dev).long()
        beh = torch.as_tensor(behaviors, dtype=torch.long, device=dev).expand(users.shape).reshape(-1)
        users, items = users.reshape(-1), items.reshape(-1)
        if beh.numel() and (int(beh.min()) < 0 or int(beh.max()) >= self.n_behaviors):
            raise ValueError(f"behaviors must lie in [0, {self.n_behaviors})")
        p, q = gather_rows(self.user_emb.weight, users), gather_rows(self.item_emb.weight, items)
        # one row per (example, head s <= r): heads 0..r of example j
        n_heads = beh + 1
        ex = torch.repeat_interleave(torch.arange(users.numel(), device=dev), n_heads)
        starts = torch.cumsum(n_heads, 0) - n_heads
        head = torch.arange(ex.numel(), device=dev) - starts[ex]
        # gathers by index_select, whose backward is an index_add (advanced indexing's index_put with accumulate
        # took half of a 2-thread step on CPU)
        f_rows = torch.zeros(ex.numel(), device=dev, dtype=p.dtype)
        if self.use_gmf:
            f_rows = f_rows + ((p * q).index_select(0, ex) * self.gmf_h.index_select(0, head)).sum(-1)
        if self.use_mlp:
            z = self._tower(torch.cat([p, q], -1).index_select(0, ex), head)
            f_rows = f_rows + (z * self.mlp_h.index_select(0, head)).sum(-1)
        f = torch.zeros(users.numel(), device=dev, dtype=p.dtype).index_add(0, ex, f_rows)
        cum_bias = self.item_bias.cumsum(0)                               # [R, I]: sum_{s<=r} b_i^s
        return f + cum_bias.reshape(-1).index_select(0, beh * self.n_items + items)

    def forward(self, users: torch.Tensor, items: torch.Tensor, behavior: Optional[int] = None) -> torch.Tensor:
        """Cascaded logits at `behavior` (default: the target)."""
        return self.logits(users, items, self.n_behaviors - 1 if behavior is None else behavior)

    def score_block(self, users: torch.Tensor, item_start: int, item_end: int) -> torch.Tensor:
        """Target-behavior logits [len(users), item_end - item_start] (the evaluator's score_fn).

        The first MLP layer splits into a user half and an item half, each computed once per call; the rest runs on
        tiles of `eval_user_block` users x `EVAL_ITEM_TILE` items through preallocated buffers (the hidden
        activations of a tile stay in cache: untiled, one [users, items, h1] block was hundreds of MB per head)."""
        dev = self.user_emb.weight.device
        users = users.to(dev).long()
        items = torch.arange(item_start, item_end, device=dev)
        R, d, n, nu = self.n_behaviors, self.dim, items.numel(), users.numel()
        q = self.item_emb(items)                                          # [n, d]
        p = self.user_emb(users)                                          # [u, d]
        out = self.item_bias.sum(0)[items].expand(nu, -1).clone()        # out^R sums every head's bias
        if self.use_gmf:
            out = out + (p * self.gmf_h.sum(0)) @ q.T                    # sum_s h_s^T (p * q)
        if not self.use_mlp or nu == 0 or n == 0:
            return out
        w1 = self.mlp_weight[0]                                           # [R, 2d, h1]
        item_half = torch.einsum("nd,rdh->rnh", q, w1[:, d:]).contiguous()                             # [R, n, h1]
        user_half = (torch.einsum("bd,rdh->rbh", p, w1[:, :d]) + self.mlp_bias[0][:, None, :]).contiguous()
        rest = list(zip(list(self.mlp_weight)[1:], list(self.mlp_bias)[1:]))
        bu, bi = max(1, min(self.eval_user_block, nu)), min(EVAL_ITEM_TILE, n)
        h1 = w1.shape[-1]
        first = p.new_empty(bu * bi * h1)  # flat: a partial tile views its front contiguously
        bufs = [p.new_empty(bu * bi, w.shape[-1]) for w, _ in rest]
        for r in range(R):
            for u0 in range(0, nu, bu):
                u1 = min(nu, u0 + bu)
                for i0 in range(0, n, bi):
                    i1 = min(n, i0 + bi)
                    z = first[:(u1 - u0) * (i1 - i0) * h1].view(u1 - u0, i1 - i0, h1)
                    torch.add(user_half[r, u0:u1, None, :], item_half[r, None, i0:i1], out=z).relu_()
                    x = z.view(-1, h1)
                    for (w, b), buf in zip(rest, bufs):
                        x = torch.addmm(b[r], x, w[r], out=buf[:x.shape[0]]).relu_()
                    out[u0:u1, i0:i1] += (x @ self.mlp_h[r]).view(u1 - u0, i1 - i0)
        return out

    def scorer(self) -> Scorer:
        """GMF: the target logit is a dot product once the summed head weights go to the user side and the
        summed item biases become one more coordinate ([p * sum_s h_s, 1] . [q, sum_s b^s]), so the
        evaluator's fused dot-product path serves it. MLP / NeuMF: the blocked `score_block`."""
        if self.interaction == "gmf":
            with torch.no_grad():
                p = self.user_emb.weight * self.gmf_h.sum(0)
                ue = torch.cat([p, torch.ones_like(p[:, :1])], 1)
                ie = torch.cat([self.item_emb.weight, self.item_bias.sum(0)[:, None]], 1)
            return Scorer(user_emb=ue.contiguous(), item_emb=ie.contiguous())
        return Scorer(score_fn=self.score_block, n_items=self.n_items)

    # ------------------------------------------------------------------------------ training
    def training_batches(self, data, epoch: int, batch_size: int, seed: int) -> Iterable[Dict[str, torch.Tensor]]:
        """Every training (u, i, r) once per epoch as a positive at r, with `neg_ratio` negatives at r."""
        return PairBatches.of_behaviors(data.train, range(data.n_behaviors), batch_size=batch_size,
                                        num_neg=self.neg_ratio, seed=seed, epoch=epoch, mode=self.neg_mode,
                                        level_probs=self.level_probs)

    def loss(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        dev = self.user_emb.weight.device
        u, p, n = batch["users"].to(dev), batch["pos"].to(dev), batch["neg"].to(dev)
        beh = batch["behavior"].to(dev).long()
        k = n.shape[1]
        users = torch.cat([u, u.repeat_interleave(k)])
        items = torch.cat([p, n.reshape(-1)])
        behs = torch.cat([beh, beh.repeat_interleave(k)])
        labels = torch.cat([torch.ones(u.numel(), device=dev), torch.zeros(n.numel(), device=dev)])
        logits = self.logits(users, items, behs)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        weighted = (bce * self.loss_weights[behs]).mean() * self.n_behaviors
        total = weighted
        if self.reg:
            l2 = (gather_rows(self.user_emb.weight, users).pow(2).sum()
                  + gather_rows(self.item_emb.weight, items).pow(2).sum()) / users.numel()
            total = total + self.reg * l2
        return total, {"loss": float(total.detach()), "bce": float(bce.mean().detach())}
