"""Seeded epoch batches of (user, positive, negatives, behavior) for the multi-behavior models.

A batch is drawn lazily when iterated (so the trainer's "data" time is the sampling time), and it is a
pure function of (seed, epoch, batch index): the permutation comes from a generator seeded by
(seed, epoch) and each batch's negatives from the sampler with seed = f(seed, epoch) and
offset = first row of the batch. A resumed run that skips k batches therefore sees the same rest.

Negatives come from `mbrec_fast.sample_negatives` when the extension provides its fused op; otherwise
from `fallback_negatives` here (vectorized rejection sampling with the same mode semantics).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import numpy as np
import torch

__all__ = ["epoch_seed", "negatives", "fallback_negatives", "PairBatches", "default_level_probs"]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 62-bit seed for (seed, epoch, stream), distinct across all three."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB)
    return x & ((1 << 62) - 1)


def default_level_probs(n_behaviors: int) -> torch.Tensor:
    """[R, R] cascade table: for behavior r, half the mass on untouched items (last column), the other
    half spread evenly over the lower behaviors 0..r-1 (all of it on untouched items for r = 0)."""
    table = torch.zeros(n_behaviors, n_behaviors, dtype=torch.float64)
    for r in range(n_behaviors):
        if r == 0:
            table[r, -1] = 1.0
        else:
            table[r, :r] = 0.5 / r
            table[r, -1] = 0.5
    return table


def _rows_of(csr) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(csr[0].numel() - 1), csr[0].diff())


def _member(graph, which, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Is items[j] in row users[j] of behavior `which`'s CSR (or of the union CSR when which is None)?"""
    n_items = graph.n_items
    cache = graph.__dict__.setdefault("_mbrec_flat_keys", {}) if hasattr(graph, "__dict__") else {}
    keys = cache.get(which)
    if keys is None:
        csr = graph.union_csr() if which is None else graph.csr(which)
        keys = cache[which] = _rows_of(csr) * n_items + csr[1]
    if keys.numel() == 0:
        return torch.zeros(items.shape, dtype=torch.bool)
    q = users * n_items + items
    pos = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
    return keys[pos] == q


def fallback_negatives(graph, users: torch.Tensor, num_neg: int, behavior, mode: str = "exclusive",
                       level_probs: Optional[torch.Tensor] = None, seed: int = 0, max_rounds: int = 64) -> torch.Tensor:
    """Vectorized rejection sampler ([len(users), num_neg] int64) for modes exclusive / strict / cascade."""
    gen = torch.Generator().manual_seed(seed)
    n_items = graph.n_items
    users = users.cpu().long()
    b = users.numel()
    beh = torch.as_tensor(behavior, dtype=torch.long).cpu()
    beh = beh.expand(b).contiguous() if beh.dim() == 0 else beh
    u_rep = users.repeat_interleave(num_neg)
    b_rep = beh.repeat_interleave(num_neg)
    out = torch.empty(u_rep.numel(), dtype=torch.long)
    if mode == "cascade":
        table = default_level_probs(graph.n_behaviors) if level_probs is None else torch.as_tensor(level_probs, dtype=torch.float64)
        level = torch.multinomial(table[b_rep].float().clamp_min(0) + 1e-12, 1, generator=gen).flatten()
        untouched = level == graph.n_behaviors - 1
    else:
        untouched = torch.ones(u_rep.numel(), dtype=torch.bool)
        level = torch.full_like(u_rep, graph.n_behaviors - 1)
    todo = torch.arange(u_rep.numel())
    # lower-level draws: uniform over the user's items at that level, rejected when done at behavior r
    for lv in range(graph.n_behaviors - 1):
        idx = todo[(~untouched[todo]) & (level[todo] == lv)]
        if idx.numel() == 0:
            continue
        ip, ind = graph.csr(lv)
        start, length = ip[u_rep[idx]], ip[u_rep[idx] + 1] - ip[u_rep[idx]]
        cand = torch.full_like(idx, -1)
        ok = length > 0
        pick = start[ok] + (torch.rand(int(ok.sum()), generator=gen) * length[ok]).long().clamp_max_(
            (length[ok] - 1).clamp_min(0))
        cand[ok] = ind[pick].long()
        for r in b_rep[idx].unique().tolist():
            sel = (b_rep[idx] == r) & ok
            bad = _member(graph, r, u_rep[idx][sel], cand[sel])
            tmp = ok.clone()
            tmp[sel] = ~bad
            ok = tmp
        out[idx[ok]] = cand[ok]
        untouched[idx[~ok]] = True  # empty / rejected lower pool: fall back to untouched items
    pending = todo[untouched]
    for _ in range(max_rounds):
        if pending.numel() == 0:
            break
        cand = torch.randint(0, n_items, (pending.numel(),), generator=gen)
        if mode in ("strict", "cascade"):
            bad = _member(graph, None, u_rep[pending], cand)
        else:
            bad = torch.zeros(pending.numel(), dtype=torch.bool)
            for r in b_rep[pending].unique().tolist():
                sel = b_rep[pending] == r
                bad[sel] = _member(graph, r, u_rep[pending][sel], cand[sel])
        out[pending[~bad]] = cand[~bad]
        pending = pending[bad]
    if pending.numel():  # users who touched (almost) everything: accept any item not done at r
        out[pending] = torch.randint(0, n_items, (pending.numel(),), generator=gen)
    return out.view(b, num_neg)


def negatives(graph, users: torch.Tensor, num_neg: int, behavior, mode: str = "exclusive",
              level_probs: Optional[torch.Tensor] = None, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Negatives from the package's fused sampler op when the extension has it, else from
    `fallback_negatives` (the sampler's own fallback is a per-row Python reference, far too slow to train with)."""
    if hasattr(torch.ops.mbrec_fast, "sample_negatives"):
        from ..sampler import sample_negatives
        kwargs = dict(behavior=behavior, mode=mode, seed=seed, offset=offset)
        if level_probs is not None:
            kwargs["level_probs"] = level_probs
        return sample_negatives(graph, users, num_neg, **kwargs)
    return fallback_negatives(graph, users, num_neg, behavior, mode, level_probs,
                              seed=(seed + offset * 0x2545F4914F6CDD1D) & ((1 << 62) - 1))


class PairBatches:
    """Shuffled mini-batches of positive (user, item, behavior) triples with sampled negatives.

    Yields dicts {"users", "pos", "neg" [B, num_neg], "behavior"}; len() is the number of batches.
    """

    def __init__(self, graph, users: torch.Tensor, items: torch.Tensor, behaviors: torch.Tensor, *,
                 batch_size: int, num_neg: int, seed: int, epoch: int, mode: str = "exclusive",
                 level_probs: Optional[torch.Tensor] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_neg < 1:
            raise ValueError(f"num_neg must be >= 1, got {num_neg}")
        self.graph, self.users, self.items, self.behaviors = graph, users, items, behaviors
        self.batch_size, self.num_neg, self.mode, self.level_probs = batch_size, num_neg, mode, level_probs
        self.seed = epoch_seed(seed, epoch)
        self.perm_seed = epoch_seed(seed, epoch, 1)

    def __len__(self) -> int:
        return (self.users.numel() + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        perm = torch.randperm(self.users.numel(), generator=torch.Generator().manual_seed(self.perm_seed))
        for start in range(0, perm.numel(), self.batch_size):
            idx = perm[start:start + self.batch_size]
            u, beh = self.users[idx], self.behaviors[idx]
            neg = negatives(self.graph, u, self.num_neg, beh, self.mode, self.level_probs,
                            seed=self.seed, offset=start * self.num_neg)
            yield {"users": u, "pos": self.items[idx], "neg": neg.long(), "behavior": beh}
