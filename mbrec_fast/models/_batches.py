"""Deprecated import path: the batcher moved to `mbrec_fast.batching` (one home for `TripleBatches` and
`PairBatches`); these names stay importable from here."""
from ..batching import PairBatches, default_level_probs, epoch_seed, negatives  # noqa: F401

__all__ = ["epoch_seed", "negatives", "PairBatches", "default_level_probs"]
