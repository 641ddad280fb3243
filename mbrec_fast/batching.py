"""Training batches of (user, positive, negatives, behavior): one home for the sampler's `TripleBatches`
and the multi-behavior models' `PairBatches`.

Both walk the positives of some behaviors of an `InteractionGraph` in a seeded order, one batch at a time,
and draw each batch's negatives with `sample_negatives` when the batch is reached (so a trainer's "data"
time is the sampling time). `_EpochBatches` holds that loop; the two classes differ only in how the
order, the RNG seed / offset of a batch and the key layout are chosen:

* `TripleBatches` (public, a DataLoader drop-in): keys users / positives / negatives / behaviors; order
  from (seed, epoch) set by `set_epoch`; negatives keyed by (seed, epoch * len + batch index).
* `PairBatches` (the models' `training_batches`): keys users / pos / neg / behavior; one object per
  epoch; order and negatives keyed by `epoch_seed(seed, epoch, stream)`, offset = first row * num_neg.
  A batch is a pure function of (seed, epoch, batch index), so a resumed run that skips k batches sees
  the same rest.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

from .sampler import MODES, InteractionGraph, sample_negatives

__all__ = ["TripleBatches", "PairBatches", "behavior_positives", "epoch_seed", "negatives", "default_level_probs"]


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


def behavior_positives(graph: InteractionGraph, behaviors: Sequence[int]
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(users, items, behaviors) int64 CPU tensors of every training interaction at the given behaviors,
    behavior by behavior in the order given, each sorted by user then item."""
    us, its, bs = [], [], []
    for b in behaviors:
        u, i = graph.positives(b)
        us.append(u.cpu())
        its.append(i.cpu())
        bs.append(torch.full_like(us[-1], b))
    return torch.cat(us), torch.cat(its), torch.cat(bs)


def negatives(graph, users: torch.Tensor, num_neg: int, behavior, mode: str = "exclusive",
              level_probs: Optional[torch.Tensor] = None, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """Negatives from the package's fused sampler op (`mbrec_fast.sample_negatives`); level_probs only
    when given (the cascade mode)."""
    kwargs = dict(behavior=behavior, mode=mode, seed=seed, offset=offset)
    if level_probs is not None:
        kwargs["level_probs"] = level_probs
    return sample_negatives(graph, users, num_neg, **kwargs)


class _EpochBatches:
    """The batch loop shared by the batchers: rows of (users, items, behaviors) taken `batch_size` at a
    time in the order of `_order()`, each batch's negatives from `_negatives`, packed by `_pack`."""

    def __init__(self, graph, users: torch.Tensor, items: torch.Tensor, behaviors: torch.Tensor,
                 batch_size: int, num_neg: int, drop_last: bool = False):
        self.graph, self.users, self.items, self.behaviors = graph, users, items, behaviors
        self.batch_size, self.num_neg, self.drop_last = batch_size, num_neg, drop_last

    def __len__(self) -> int:
        n = self.users.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor:
        raise NotImplementedError

    def _negatives(self, k: int, start: int, users: torch.Tensor, behaviors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pack(self, users, items, negs, behaviors) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        order = self._order()
        for k in range(len(self)):
            start = k * self.batch_size
            idx = order[start:start + self.batch_size]
            u, i, b = self.users[idx], self.items[idx], self.behaviors[idx]
            yield self._pack(u, i, self._negatives(k, start, u, b), b)


class TripleBatches(_EpochBatches):
    """Epoch iterator over (users, positives, negatives, behaviors) batches: a drop-in for a DataLoader.

    The positives are every (user, item) pair of the given behaviors (default: target only), shuffled per
    epoch by (seed, epoch). Negatives come from `sample_negatives` with offset = epoch * len(self) + batch
    index, so an epoch is reproducible and different epochs draw different negatives. Each batch is a dict
    {"users": int64 [B], "positives": int64 [B], "negatives": int64 [B, num_neg], "behaviors": int64 [B]};
    with pin_memory=True (CPU graph) the tensors are in pinned memory for non_blocking copies.
    Extra keyword arguments (mode, level_probs, replacement, popularity, on_empty) go to sample_negatives.
    """

    def __init__(self, graph: InteractionGraph, behaviors=None, batch_size: int = 1024, num_neg: int = 1, *,
                 mode: str = "exclusive", seed: int = 0, shuffle: bool = True, pin_memory: bool = False,
                 drop_last: bool = False, **sample_kwargs):
        if not isinstance(graph, InteractionGraph):
            raise TypeError(f"graph must be an InteractionGraph, got {type(graph).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(num_neg, bool) or not isinstance(num_neg, int) or num_neg < 1:
            raise ValueError(f"num_neg must be an int >= 1, got {num_neg!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if behaviors is None:
            behaviors = [graph.target]
        elif isinstance(behaviors, (int, str)):
            behaviors = [behaviors]
        ids = [graph.behavior_id(b) for b in behaviors]
        super().__init__(graph, *behavior_positives(graph, ids), batch_size, num_neg, drop_last)
        self.mode = mode
        self.seed, self.shuffle, self.pin_memory = int(seed), shuffle, pin_memory
        self.sample_kwargs = sample_kwargs
        if "level_probs" in sample_kwargs and sample_kwargs["level_probs"] is not None and len(set(ids)) > 1:
            lp = torch.as_tensor(sample_kwargs["level_probs"])
            if lp.dim() != 2:
                raise ValueError("level_probs must be an [R, R] table when TripleBatches covers several behaviors")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch: changes the shuffle and the RNG offset deterministically."""
        self.epoch = int(epoch)

    def _order(self) -> torch.Tensor:
        n = self.users.numel()
        # one behavior for every row: the sampler takes it as a scalar (1-D cascade level_probs allowed)
        self._scalar_behavior = (int(self.behaviors[0]) if n and bool((self.behaviors == self.behaviors[0]).all())
                                 else None)
        self._n_batches = len(self)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2 ** 63))
            return torch.randperm(n, generator=g)
        return torch.arange(n)

    def _negatives(self, k, start, users, behaviors):
        behavior = self._scalar_behavior if self._scalar_behavior is not None else behaviors
        return sample_negatives(self.graph, users, self.num_neg, behavior=behavior, mode=self.mode, seed=self.seed,
                                offset=self.epoch * self._n_batches + k, **self.sample_kwargs)

    def _pack(self, users, items, negs, behaviors):
        batch = {"users": users, "positives": items, "negatives": negs, "behaviors": behaviors}
        device = self.graph.device
        if device.type != "cpu":
            batch = {key: v.to(device) for key, v in batch.items()}
        elif self.pin_memory and torch.cuda.is_available():
            batch = {key: v.pin_memory() for key, v in batch.items()}
        return batch


class PairBatches(_EpochBatches):
    """Shuffled mini-batches of positive (user, item, behavior) triples with sampled negatives, for one
    epoch of a multi-behavior model.

    Yields dicts {"users", "pos", "neg" [B, num_neg], "behavior"}; len() is the number of batches.
    """

    def __init__(self, graph, users: torch.Tensor, items: torch.Tensor, behaviors: torch.Tensor, *,
                 batch_size: int, num_neg: int, seed: int, epoch: int, mode: str = "exclusive",
                 level_probs: Optional[torch.Tensor] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_neg < 1:
            raise ValueError(f"num_neg must be >= 1, got {num_neg}")
        super().__init__(graph, users, items, behaviors, batch_size, num_neg)
        self.mode, self.level_probs = mode, level_probs
        self.seed = epoch_seed(seed, epoch)
        self.perm_seed = epoch_seed(seed, epoch, 1)

    @classmethod
    def of_behaviors(cls, graph, behaviors: Sequence[int], **kwargs) -> "PairBatches":
        """Batches over every training interaction of `graph` at the given behaviors."""
        return cls(graph, *behavior_positives(graph, behaviors), **kwargs)

    def _order(self) -> torch.Tensor:
        return torch.randperm(self.users.numel(), generator=torch.Generator().manual_seed(self.perm_seed))

    def _negatives(self, k, start, users, behaviors):
        return negatives(self.graph, users, self.num_neg, behaviors, self.mode, self.level_probs,
                         seed=self.seed, offset=start * self.num_neg)

    def _pack(self, users, items, negs, behaviors):
        return {"users": users, "pos": items, "neg": negs.long(), "behavior": behaviors}
