"""Brute-force references for the CTR metrics: every (positive, negative) pair compared explicitly."""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["auc_pairwise", "log_loss_loop"]


def auc_pairwise(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Fraction of (positive, negative) pairs ranked correctly, a tie counting one half. O(P*N)."""
    pos = [float(s) for s, y in zip(scores, labels) if int(y) == 1]
    neg = [float(s) for s, y in zip(scores, labels) if int(y) == 0]
    if not pos or not neg:
        return float("nan")
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else (0.5 if p == n else 0.0)
    return total / (len(pos) * len(neg))


def log_loss_loop(probs: Sequence[float], labels: Sequence[int], eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, one sample at a time."""
    total = 0.0
    for p, y in zip(probs, labels):
        p = min(max(float(p), eps), 1 - eps)
        total += -math.log(p) if int(y) == 1 else -math.log(1 - p)
    return total / len(probs) if len(probs) else float("nan")
