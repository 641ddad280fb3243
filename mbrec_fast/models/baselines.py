"""Baselines of the multi-behavior experiments: BPR-MF, NeuMF (target behavior only) and MC-BPR.

All three implement `MultiBehaviorModel`: negatives come from the package sampler (through
`mbrec_fast.batching`), evaluation from `mbrec_fast.evaluate_full_ranking` (dot-product fast
path for BPR-MF and MC-BPR, a blocked `score_fn` for NeuMF).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import PairBatches, default_level_probs
from .base import MultiBehaviorModel, Scorer, check_model_kwargs, gather_rows

__all__ = ["BPRMF", "NeuMF", "MCBPR"]


def _init_embedding(n: int, dim: int, std: float = 0.1) -> nn.Embedding:
    emb = nn.Embedding(n, dim)
    nn.init.normal_(emb.weight, std=std)
    return emb


class BPRMF(MultiBehaviorModel):
    """Matrix factorization trained with BPR on the target behavior only (Rendle et al., UAI'09).

    Each training purchase (u, i) is paired with `neg_ratio` items u did not buy (sampler mode
    "exclusive" at the target behavior); loss = mean softplus(s_neg - s_pos) + reg * squared norms of
    the rows used, per example.
    """

    name = "bpr"

    def __init__(self, n_users: int, n_items: int, dim: int = 64, reg: float = 1e-4, neg_ratio: int = 1):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.n_users, self.n_items, self.dim, self.reg, self.neg_ratio = n_users, n_items, dim, reg, neg_ratio
        self.user_emb = _init_embedding(n_users, dim)
        self.item_emb = _init_embedding(n_items, dim)

    def training_batches(self, data, epoch: int, batch_size: int, seed: int) -> Iterable[Dict[str, torch.Tensor]]:
        return PairBatches.of_behaviors(data.train, [data.target], batch_size=batch_size, num_neg=self.neg_ratio,
                                        seed=seed, epoch=epoch, mode="exclusive")

    def loss(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        dev = self.user_emb.weight.device
        u, p, n = batch["users"].to(dev), batch["pos"].to(dev), batch["neg"].to(dev)
        ue, ie = self.user_emb.weight, self.item_emb.weight
        eu, ep, en = gather_rows(ue, u), gather_rows(ie, p), gather_rows(ie, n)    # [B,d] [B,d] [B,k,d]
        s_pos = (eu * ep).sum(-1, keepdim=True)
        s_neg = torch.einsum("bd,bkd->bk", eu, en)
        rank = F.softplus(s_neg - s_pos).mean()
        l2 = (eu.pow(2).sum() + ep.pow(2).sum() + en.pow(2).sum() / en.shape[1]) / u.numel()
        total = rank + self.reg * l2
        return total, {"loss": float(total.detach()), "bpr": float(rank.detach())}

    def scorer(self) -> Scorer:
        return Scorer(user_emb=self.user_emb.weight.detach(), item_emb=self.item_emb.weight.detach())


class MCBPR(BPRMF):
    """Multi-channel BPR (Loni et al., RecSys'16): BPR over every behavior with level-aware sampling.

    Every training (u, i, r) is a positive at level r; its negatives come from the sampler's
    "cascade" mode: an item u did at a lower behavior (but not at r) or an item u never touched,
    mixed by `level_probs` ([R, R], row r over levels 0..r-1 then "untouched"; default half on
    untouched items, half spread over the lower levels). Scores are one dot product, so a weak
    behavior teaches the model what a user looks at, and a higher one ranks above it.
    """

    name = "mcbpr"

    def __init__(self, n_users: int, n_items: int, dim: int = 64, reg: float = 1e-4, neg_ratio: int = 1,
                 n_behaviors: int = 2, level_probs: Optional[torch.Tensor] = None):
        super().__init__(n_users, n_items, dim=dim, reg=reg, neg_ratio=neg_ratio)
        table = default_level_probs(n_behaviors) if level_probs is None else torch.as_tensor(level_probs, dtype=torch.float64)
        if tuple(table.shape) != (n_behaviors, n_behaviors):
            raise ValueError(f"level_probs must have shape ({n_behaviors}, {n_behaviors}), got {tuple(table.shape)}")
        self.level_probs = table

    @classmethod
    def from_data(cls, data, **kwargs) -> "MCBPR":
        """Model for `data`'s behaviors (kwargs go to the constructor)."""
        check_model_kwargs(cls, kwargs)
        return cls(data.n_users, data.n_items, n_behaviors=data.n_behaviors, **kwargs)

    def training_batches(self, data, epoch: int, batch_size: int, seed: int) -> Iterable[Dict[str, torch.Tensor]]:
        return PairBatches.of_behaviors(data.train, range(data.n_behaviors), batch_size=batch_size,
                                        num_neg=self.neg_ratio, seed=seed, epoch=epoch, mode="cascade",
                                        level_probs=self.level_probs)


class NeuMF(MultiBehaviorModel):
    """Neural matrix factorization (He et al., WWW'17) on the target behavior, pointwise log loss.

    score(u, i) = h^T [p_u^G ⊙ q_i^G ; MLP([p_u^M ; q_i^M])] + b; GMF and MLP have their own
    embeddings (size `dim`), the MLP tower is 2*dim -> dim -> dim/2 with ReLU. Each purchase is one
    positive (label 1) with `neg_ratio` sampled non-purchased items (label 0). For full ranking the
    first MLP layer is split into a user part and an item part, so a [users, items] block costs
    one broadcast add plus the remaining layers.
    """

    name = "neumf"

    def __init__(self, n_users: int, n_items: int, dim: int = 64, reg: float = 0.0, neg_ratio: int = 4,
                 eval_user_block: int = 128):
        super().__init__()
        self.n_users, self.n_items, self.dim, self.reg, self.neg_ratio = n_users, n_items, dim, reg, neg_ratio
        self.eval_user_block = eval_user_block
        self.gmf_user, self.gmf_item = _init_embedding(n_users, dim, 0.01), _init_embedding(n_items, dim, 0.01)
        self.mlp_user, self.mlp_item = _init_embedding(n_users, dim, 0.01), _init_embedding(n_items, dim, 0.01)
        hidden = max(dim // 2, 1)
        self.layer1 = nn.Linear(2 * dim, dim)
        self.layer2 = nn.Linear(dim, hidden)
        self.head = nn.Linear(dim + hidden, 1)

    def training_batches(self, data, epoch: int, batch_size: int, seed: int) -> Iterable[Dict[str, torch.Tensor]]:
        return PairBatches.of_behaviors(data.train, [data.target], batch_size=batch_size, num_neg=self.neg_ratio,
                                        seed=seed, epoch=epoch, mode="exclusive")

    def _score_pairs(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        g = gather_rows(self.gmf_user.weight, u) * gather_rows(self.gmf_item.weight, i)
        m = torch.relu(self.layer1(torch.cat([gather_rows(self.mlp_user.weight, u),
                                              gather_rows(self.mlp_item.weight, i)], -1)))
        m = torch.relu(self.layer2(m))
        return self.head(torch.cat([g, m], -1)).squeeze(-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of (users[j], items[j]) pairs."""
        return self._score_pairs(users, items)

    def loss(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        dev = self.gmf_user.weight.device
        u, p, n = batch["users"].to(dev), batch["pos"].to(dev), batch["neg"].to(dev)
        k = n.shape[1]
        users = torch.cat([u, u.repeat_interleave(k)])
        items = torch.cat([p, n.reshape(-1)])
        labels = torch.cat([torch.ones_like(p, dtype=torch.float32), torch.zeros(n.numel(), device=dev)])
        logits = self._score_pairs(users, items)
        bce = F.binary_cross_entropy_with_logits(logits, labels)
        total = bce
        if self.reg:
            rows = ((self.gmf_user, users), (self.mlp_user, users), (self.gmf_item, items), (self.mlp_item, items))
            total = total + self.reg * sum(gather_rows(e.weight, x).pow(2).sum() for e, x in rows) / users.numel()
        return total, {"loss": float(total.detach()), "bce": float(bce.detach())}

    def score_block(self, users: torch.Tensor, item_start: int, item_end: int) -> torch.Tensor:
        """Scores [len(users), item_end - item_start], computed in user blocks to bound memory."""
        items = torch.arange(item_start, item_end, device=self.gmf_item.weight.device)
        d = self.dim
        w1u, w1i = self.layer1.weight[:, :d], self.layer1.weight[:, d:]
        qg = self.gmf_item(items)                                    # [n, d]
        qm = self.mlp_item(items) @ w1i.T                            # [n, d] item half of layer 1
        h_g, h_m = self.head.weight[0, :d], self.head.weight[0, d:]
        out = []
        for ub in users.to(items.device).split(self.eval_user_block):
            gmf = (self.gmf_user(ub) * h_g) @ qg.T                   # [b, n]
            a = self.mlp_user(ub) @ w1u.T + self.layer1.bias         # [b, d]
            hidden = torch.relu(a[:, None, :] + qm[None, :, :])      # [b, n, d]
            hidden = torch.relu(hidden @ self.layer2.weight.T + self.layer2.bias)
            out.append(gmf + hidden @ h_m + self.head.bias)
        return torch.cat(out) if out else torch.zeros(0, items.numel(), device=items.device)

    def scorer(self) -> Scorer:
        return Scorer(score_fn=self.score_block, n_items=self.n_items)
