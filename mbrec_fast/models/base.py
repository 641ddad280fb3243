"""The interface every multi-behavior model implements, so one trainer and one evaluator serve them all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

ScoreFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def check_model_kwargs(cls, kwargs: Dict[str, object]) -> None:
    """Raises a TypeError naming an unknown constructor argument of `cls` (for the `from_data` helpers)."""
    import inspect
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in params:
            raise TypeError(f"{cls.__name__} has no argument {key!r} (accepts: {', '.join(params)})")


def constructor_defaults(cls) -> Dict[str, object]:
    """The defaults of `cls`'s constructor arguments: where each model states its defaults, once (the CLI
    reads them for its help and passes None through as "the model's default")."""
    import inspect
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


#: (indptr [U + 1], item ids, scores): sparse per-user scores that replace a dot product (the evaluator's
#: `score_overrides`)
ScoreOverrides = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[ids] for a 2-D x (an embedding table's weight, propagated embeddings) and integer ids of any shape, as an
    index_select: its backward is an index_add, 4x nn.Embedding's dense backward (20 k ids into a 15 k x 64 table,
    2 CPU threads) and faster than advanced indexing's index_put with accumulate."""
    return x.index_select(0, ids.reshape(-1)).reshape(*ids.shape, x.shape[-1])


@dataclass
class Scorer:
    """How a model scores (user, item) pairs for full-ranking evaluation.

    Either a dot product of `user_emb[u]` and `item_emb[i]` (the evaluator's fast path), or a
    `score_fn(users, item_start, item_end) -> [len(users), item_end - item_start]` for models whose
    score is not a dot product (cascaded heads, hard-gated experts). block_items: items per score_fn
    call when the model knows better than the evaluator's default (a cheap score_fn wants wide blocks,
    an MLP over every pair narrow ones).
    dot_with_overrides: optionally, beside a score_fn, the same scores as (user_emb, item_emb, overrides): a dot
    product except on the sparse pairs of `overrides` = (indptr, indices, scores) by user. `evaluator_kwargs`
    then takes the evaluator's fused dot-product path with `score_overrides` (no score block materialized);
    everything else that reads a scorer (the pool protocol, the plain-PyTorch benchmark) keeps using score_fn.
    """

    user_emb: Optional[torch.Tensor] = None
    item_emb: Optional[torch.Tensor] = None
    score_fn: Optional[ScoreFn] = None
    n_items: Optional[int] = None
    block_items: Optional[int] = None
    dot_with_overrides: Optional[Tuple[torch.Tensor, torch.Tensor, ScoreOverrides]] = None

    def __post_init__(self):
        dot = self.user_emb is not None and self.item_emb is not None
        if dot == (self.score_fn is not None):
            raise ValueError("Scorer needs either (user_emb, item_emb) or score_fn, not both")
        if self.score_fn is not None and self.n_items is None:
            raise ValueError("Scorer with score_fn needs n_items")
        if self.dot_with_overrides is not None and self.score_fn is None:
            raise ValueError("Scorer.dot_with_overrides is an alternative form of a score_fn; give the score_fn too")

    def evaluator_kwargs(self) -> Dict[str, object]:
        """Arguments to pass to `mbrec_fast.evaluate_full_ranking`."""
        if self.dot_with_overrides is not None:
            ue, ie, overrides = self.dot_with_overrides
            return {"user_emb": ue, "item_emb": ie, "score_overrides": overrides}
        if self.score_fn is not None:
            return {"user_emb": None, "item_emb": None, "score_fn": self.score_fn, "n_items": self.n_items,
                    "block_items": self.block_items}
        return {"user_emb": self.user_emb, "item_emb": self.item_emb}


class MultiBehaviorModel(nn.Module):
    """Base class of the multi-behavior recommenders (NMTR, MEMBER, LightGCN, BPR-MF, NeuMF, MC-BPR).

    The trainer calls, per epoch: `on_epoch_start`, then `loss` on each batch of
    `training_batches`; for evaluation it calls `scorer()` under `torch.no_grad()`.
    """

    #: short name used by the CLI and in checkpoints
    name: str = "model"

    @classmethod
    def from_data(cls, data, **kwargs) -> "MultiBehaviorModel":
        """The model for a `MultiBehaviorData` (the one construction protocol of the family): shapes and
        graphs come from `data`, everything else from kwargs, a constructor argument left out taking the
        constructor's default. An unknown kwarg raises TypeError naming it. This default suits a
        constructor (n_users, n_items, ...); models that need more of `data` override it."""
        check_model_kwargs(cls, kwargs)
        return cls(data.n_users, data.n_items, **kwargs)

    def training_batches(self, data, epoch: int, batch_size: int, seed: int) -> Iterable[Dict[str, torch.Tensor]]:
        """Batches of one epoch. Must be a deterministic function of (seed, epoch), so that a resumed
        run can skip the batches it already consumed and continue bit-exactly."""
        raise NotImplementedError

    def loss(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Total loss of one batch plus its named parts (floats, for logging)."""
        raise NotImplementedError

    def scorer(self) -> Scorer:
        """Scores for evaluation. Called under no_grad; may cache propagated embeddings."""
        raise NotImplementedError

    def on_epoch_start(self, data, epoch: int, seed: int) -> None:
        """Per-epoch work such as rebuilding augmented graphs (seeded by seed and epoch)."""
