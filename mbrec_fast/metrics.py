"""CTR metrics: exact ROC-AUC (ties count one half) and log loss, overall and per (domain, task).

The AUC is the Mann-Whitney statistic computed from average ranks, vectorized in torch: one sort of
the scores (inside each group when grouped), tie runs found by comparing neighbours, each run given the
mean of its ranks. That is exact for ties (a positive and a negative with the same score count 1/2) and
costs O(n log n); sums are in float64 so millions of samples do not lose precision.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from ._checks import check_finite, check_tensor

__all__ = ["auc_score", "grouped_auc", "log_loss", "grouped_log_loss", "ctr_metrics"]

_EPS = 1e-7


def _check_scores_labels(scores, labels, name_s: str = "scores", name_l: str = "labels"):
    check_tensor(scores, name_s, ndim=1)
    check_tensor(labels, name_l, ndim=1)
    if scores.numel() != labels.numel():
        raise ValueError(f"{name_s} and {name_l} must have the same length, got {scores.numel()} and {labels.numel()}")
    if not scores.is_floating_point():
        scores = scores.double()
    check_finite(scores, name_s)
    labels = labels.to(torch.float64) if labels.dtype != torch.bool else labels.double()
    if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"{name_l} must be 0/1")
    return scores, labels


def _average_ranks_sorted(keys_equal_prev: Tensor) -> Tensor:
    """Average 1-based ranks for a sorted sequence, given a mask `same[i] = (x[i] == x[i-1])` (same[0] False)."""
    n = keys_equal_prev.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=keys_equal_prev.device)
    starts = torch.nonzero(~keys_equal_prev).flatten()  # first position (0-based) of each tie run
    counts = torch.diff(starts, append=torch.tensor([n], device=starts.device))
    avg = starts.to(torch.float64) + (counts.to(torch.float64) + 1) * 0.5  # mean of ranks start+1 .. start+count
    return torch.repeat_interleave(avg, counts)


def auc_score(scores: Tensor, labels: Tensor) -> float:
    """Exact ROC-AUC with ties as one half. NaN when only one class is present."""
    scores, labels = _check_scores_labels(scores, labels)
    n_pos = float(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s, order = torch.sort(scores.double())
    same = torch.zeros_like(s, dtype=torch.bool)
    same[1:] = s[1:] == s[:-1]
    ranks = _average_ranks_sorted(same)
    rank_sum = float((ranks * labels[order]).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def grouped_auc(scores: Tensor, labels: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """AUC of each group g in [0, n_groups) (float64 [n_groups], NaN where a group lacks a class).

    One sort by (group, score) for all groups together, so a (domain, task) table costs one pass.
    """
    scores, labels = _check_scores_labels(scores, labels)
    check_tensor(groups, "groups", ndim=1, dtypes=(torch.int64, torch.int32))
    if groups.numel() != scores.numel():
        raise ValueError(f"groups must have the same length as scores, got {groups.numel()} and {scores.numel()}")
    groups = groups.long()
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= n_groups):
        raise ValueError(f"groups must lie in [0, {n_groups})")
    out = torch.full((n_groups,), float("nan"), dtype=torch.float64)
    if scores.numel() == 0:
        return out
    s = scores.double()
    # stable sort by score, then stable sort by group -> ordered by (group, score)
    s_sorted, o1 = torch.sort(s, stable=True)
    g1 = groups[o1]
    g_sorted, o2 = torch.sort(g1, stable=True)
    order = o1[o2]
    s_sorted = s_sorted[o2]
    y = labels[order]
    same = torch.zeros_like(s_sorted, dtype=torch.bool)
    same[1:] = (s_sorted[1:] == s_sorted[:-1]) & (g_sorted[1:] == g_sorted[:-1])
    global_ranks = _average_ranks_sorted(same)
    counts = torch.bincount(g_sorted, minlength=n_groups).to(torch.float64)
    offsets = torch.cumsum(counts, 0) - counts  # samples before each group
    ranks = global_ranks - offsets[g_sorted]
    n_pos = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g_sorted, y)
    rank_sum = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g_sorted, ranks * y)
    n_neg = counts - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp_min(1)
    out[valid] = auc[valid].cpu()
    return out


def log_loss(probs: Tensor, labels: Tensor, eps: float = _EPS) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1-eps])."""
    probs, labels = _check_scores_labels(probs, labels, "probs")
    if probs.numel() == 0:
        return float("nan")
    if bool(((probs < 0) | (probs > 1)).any()):
        raise ValueError("probs must lie in [0, 1]")
    p = probs.double().clamp(eps, 1 - eps)
    return float(-(labels * p.log() + (1 - labels) * (1 - p).log()).mean())


def grouped_log_loss(probs: Tensor, labels: Tensor, groups: Tensor, n_groups: int, eps: float = _EPS) -> Tensor:
    """Mean log loss per group (float64 [n_groups], NaN for empty groups)."""
    probs, labels = _check_scores_labels(probs, labels, "probs")
    groups = groups.long()
    p = probs.double().clamp(eps, 1 - eps)
    ll = -(labels * p.log() + (1 - labels) * (1 - p).log())
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, ll)
    counts = torch.bincount(groups, minlength=n_groups).to(torch.float64)
    out = sums / counts
    out[counts == 0] = float("nan")
    return out


def ctr_metrics(probs: Tensor, labels: Tensor, domains: Tensor, n_domains: int,
                task_names: Optional[Sequence[str]] = None, label_mask: Optional[Tensor] = None) -> Dict[str, float]:
    """AUC and log loss per (domain, task) and overall for predictions probs[N, T] of labels[N, T].

    Keys: `auc_d{d}_{task}`, `logloss_d{d}_{task}`, `auc` (mean over the (domain, task) cells that have
    both classes — the "overall AUC" of the M3oE table), `logloss` (mean over all labelled entries),
    `auc_{task}` (pooled over domains) and `auc_d{d}` (mean over the tasks of domain d).
    `label_mask[N, T]` (bool) marks entries that carry a label; default all.
    """
    check_tensor(probs, "probs", ndim=2)
    check_tensor(labels, "labels", ndim=2)
    check_tensor(domains, "domains", ndim=1)
    if probs.shape != labels.shape:
        raise ValueError(f"probs and labels must have the same shape, got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if domains.numel() != probs.shape[0]:
        raise ValueError("domains must have one entry per row of probs")
    n_tasks = probs.shape[1]
    task_names = list(task_names) if task_names is not None else [f"t{t}" for t in range(n_tasks)]
    if len(task_names) != n_tasks:
        raise ValueError(f"task_names must have {n_tasks} entries")
    probs, labels, domains = probs.detach().cpu(), labels.detach().cpu(), domains.detach().cpu().long()
    mask = torch.ones_like(labels, dtype=torch.bool) if label_mask is None else label_mask.cpu().bool()
    out: Dict[str, float] = {}
    cell_aucs = []
    ll_sum, ll_n = 0.0, 0
    for t, name in enumerate(task_names):
        m = mask[:, t]
        p, y, d = probs[m, t], labels[m, t], domains[m]
        aucs = grouped_auc(p, y, d, n_domains)
        lls = grouped_log_loss(p, y, d, n_domains)
        for dom in range(n_domains):
            out[f"auc_d{dom}_{name}"] = float(aucs[dom])
            out[f"logloss_d{dom}_{name}"] = float(lls[dom])
            if not math.isnan(float(aucs[dom])):
                cell_aucs.append(float(aucs[dom]))
        out[f"auc_{name}"] = auc_score(p, y) if p.numel() else float("nan")
        if p.numel():
            ll_sum += log_loss(p, y) * p.numel()
            ll_n += p.numel()
    for dom in range(n_domains):
        vals = [out[f"auc_d{dom}_{n}"] for n in task_names if not math.isnan(out[f"auc_d{dom}_{n}"])]
        out[f"auc_d{dom}"] = sum(vals) / len(vals) if vals else float("nan")
    out["auc"] = sum(cell_aucs) / len(cell_aucs) if cell_aucs else float("nan")
    out["logloss"] = ll_sum / ll_n if ll_n else float("nan")
    return out
