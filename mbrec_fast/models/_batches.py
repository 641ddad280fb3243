"""Seeded epoch batches of (user, positive, negatives, behavior) for the multi-behavior models.

A batch is drawn lazily when iterated (so the trainer's "data" time is the sampling time), and it is a
pure function of (seed, epoch, batch index): the permutation comes from a generator seeded by
(seed, epoch) and each batch's negatives from the sampler with seed = f(seed, epoch) and
offset = first row of the batch. A resumed run that skips k batches therefore sees the same rest.

Negatives come from the package's fused sampler op, `mbrec_fast.sample_negatives`.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch

__all__ = ["epoch_seed", "negatives", "PairBatches", "default_level_probs"]


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


def negatives(graph, users: torch.Tensor, num_neg: int, behavior, mode: str = "exclusive",
              level_probs: Optional[torch.Tensor] = None, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Negatives from the package's fused sampler op (`mbrec_fast.sample_negatives`)."""
    from ..sampler import sample_negatives
    kwargs = dict(behavior=behavior, mode=mode, seed=seed, offset=offset)
    if level_probs is not None:
        kwargs["level_probs"] = level_probs
    return sample_negatives(graph, users, num_neg, **kwargs)


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
