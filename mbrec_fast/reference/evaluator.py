"""Reference full-ranking evaluation: dense score matrix, excluded items set to -inf, a stable
sort by (-score, item id), and the RecBole metric formulas written out one user at a time.

Slow and simple on purpose; the fused kernels in `mbrec_fast.evaluator` are tested against it.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["dense_scores", "reference_topk", "reference_user_metrics", "reference_evaluate", "dense_blocked_evaluate"]

METRIC_NAMES = ("hr", "ndcg", "recall", "precision", "mrr")


def dense_scores(user_emb: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """All user x item dot products in fp32 (the dense matrix the fused path never builds)."""
    return user_emb.float() @ item_emb.float().T


def reference_topk(scores: torch.Tensor, k: int, exclude: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   users: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a dense [b, n_items] score matrix.

    Row r belongs to user `users[r]` (default r) whose excluded items (row of the `exclude` CSR) get
    -inf and never appear. Order: higher score first, equal scores by lower item id. Slots beyond the
    number of eligible items hold score -inf and id -1.
    """
    scores = scores.float().clone()
    b, n = scores.shape
    users = torch.arange(b) if users is None else users.cpu()
    excluded = torch.zeros(b, n, dtype=torch.bool)
    if exclude is not None:
        indptr, indices = exclude[0].cpu().long(), exclude[1].cpu().long()
        for r in range(b):
            u = int(users[r])
            excluded[r, indices[indptr[u]:indptr[u + 1]]] = True
    scores = scores.cpu()
    scores[excluded] = -math.inf
    # Columns are in item-id order, so a stable descending sort puts equal scores in id order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    top_scores = torch.gather(scores, 1, order)
    top_excluded = torch.gather(excluded, 1, order)
    top_ids = torch.where(top_excluded, torch.full_like(order, -1), order)
    top_scores = torch.where(top_excluded, torch.full_like(top_scores, -math.inf), top_scores)
    return top_scores, top_ids


def reference_user_metrics(top_ids: Sequence[int], targets: Sequence[int], k: int) -> Dict[str, float]:
    """RecBole metrics of one user's ranked list at cutoff k (targets deduplicated; ids -1 never hit)."""
    target_set = set(int(t) for t in targets)
    n_targets = len(target_set)
    hits = 0
    dcg = 0.0
    first_rank = 0
    for rank, item in enumerate(list(top_ids)[:k], start=1):
        if int(item) >= 0 and int(item) in target_set:
            hits += 1
            dcg += 1.0 / math.log2(rank + 1)
            if first_rank == 0:
                first_rank = rank
    idcg = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(n_targets, k) + 1))
    return {
        "hr": 1.0 if hits > 0 else 0.0,
        "ndcg": dcg / idcg,
        "recall": hits / n_targets,
        "precision": hits / k,
        "mrr": 1.0 / first_rank if first_rank else 0.0,
    }


def reference_evaluate(scores: torch.Tensor, exclude, targets, ks: Sequence[int] = (10,),
                       metrics: Sequence[str] = METRIC_NAMES, users: Optional[torch.Tensor] = None,
                       target_groups: Optional[torch.Tensor] = None,
                       group_names: Optional[List[str]] = None) -> dict:
    """Evaluates a dense [n_users, n_items] score matrix; returns a plain dict with the fields of EvalResult.

    Per group g, only targets whose label is g count (a duplicated target keeps the label of its first
    occurrence); users with no target in the group are skipped for that group.
    """
    ks = list(dict.fromkeys(ks))  # a repeated cut-off is one metric, not two summed into it
    n_users = scores.shape[0]
    users = torch.arange(n_users) if users is None else users.cpu().long()
    t_indptr, t_indices = targets[0].cpu().long(), targets[1].cpu().long()
    kmax = max(ks)
    _, top_ids = reference_topk(scores[users], kmax, exclude, users)
    names = [f"{m}@{k}" for k in ks for m in metrics]
    group_labels = sorted(set(target_groups.tolist())) if target_groups is not None else []
    if group_names is None and target_groups is not None:
        n_groups = int(target_groups.max()) + 1 if target_groups.numel() else 0
        group_names = [str(g) for g in range(n_groups)]
    sums = {n: 0.0 for n in names}
    group_sums = {g: {n: 0.0 for n in names} for g in (group_names or [])}
    group_users = {g: 0 for g in (group_names or [])}
    per_user = {n: [] for n in names}
    per_user["user"] = []
    n_eval = n_skipped = 0
    for r, u in enumerate(users.tolist()):
        lo, hi = int(t_indptr[u]), int(t_indptr[u + 1])
        row = t_indices[lo:hi].tolist()
        if not row:
            n_skipped += 1
            continue
        n_eval += 1
        per_user["user"].append(u)
        ranked = top_ids[r].tolist()
        for k in ks:
            values = reference_user_metrics(ranked, row, k)
            for m in metrics:
                sums[f"{m}@{k}"] += values[m]
                per_user[f"{m}@{k}"].append(values[m])
        if target_groups is not None:
            labels = target_groups[lo:hi].tolist()
            first_label = {}
            for item, label in zip(row, labels):
                first_label.setdefault(item, label)
            for g, gname in enumerate(group_names):
                in_group = [item for item, label in first_label.items() if label == g]
                if not in_group:
                    continue
                group_users[gname] += 1
                for k in ks:
                    values = reference_user_metrics(ranked, in_group, k)
                    for m in metrics:
                        group_sums[gname][f"{m}@{k}"] += values[m]
    del group_labels
    return {
        "metrics": {n: (s / n_eval if n_eval else 0.0) for n, s in sums.items()},
        "n_users": n_eval,
        "n_skipped": n_skipped,
        "groups": {g: {n: (s / group_users[g] if group_users[g] else 0.0) for n, s in d.items()}
                   for g, d in group_sums.items()},
        "group_users": group_users,
        "per_user": {n: torch.tensor(v, dtype=torch.int64 if n == "user" else torch.float64)
                     for n, v in per_user.items()},
    }


def dense_blocked_evaluate(user_emb: torch.Tensor, item_emb: torch.Tensor, exclude, targets,
                           ks: Sequence[int] = (10, 20, 50, 100), block_users: int = 4096) -> Dict[str, float]:
    """The usual (RecBole-style) dense evaluation, vectorized: score a block of users with torch.mm,
    set excluded items to -inf, torch.topk, then the metrics from a dense positive mask.

    This is the baseline the fused evaluator is timed against; ties follow torch.topk (unspecified).
    RecBole itself scores max(eval_batch_size // n_items, 1) users per step (eval_batch_size = 4096 by
    default); pass that as block_users to mimic it. Returns metric means over users with >= 1 target.
    """
    ks = list(dict.fromkeys(ks))  # a repeated cut-off is one metric, not two summed into it
    n_users, n_items = user_emb.shape[0], item_emb.shape[0]
    kmax = max(ks)
    e_ptr, e_idx = exclude
    t_ptr, t_idx = targets
    sums = {f"{m}@{k}": 0.0 for k in ks for m in METRICS_ORDER}
    n_eval = 0
    ranks = torch.arange(1, kmax + 1, dtype=torch.float64, device=user_emb.device)
    discount = 1.0 / torch.log2(ranks + 1)
    ideal = discount.cumsum(0)
    item_f = item_emb.float()
    for u0 in range(0, n_users, block_users):
        u1 = min(n_users, u0 + block_users)
        scores = user_emb[u0:u1].float() @ item_f.T
        lo, hi = int(e_ptr[u0]), int(e_ptr[u1])
        rows = torch.repeat_interleave(torch.arange(u1 - u0, device=scores.device), e_ptr[u0:u1 + 1].diff())
        scores[rows, e_idx[lo:hi]] = -math.inf
        top = torch.topk(scores, kmax, dim=1).indices
        del scores
        # RecBole's collector: a dense int positive matrix per batch, summed for |targets|
        pos = torch.zeros(u1 - u0, n_items, dtype=torch.int32, device=user_emb.device)
        lo, hi = int(t_ptr[u0]), int(t_ptr[u1])
        rows = torch.repeat_interleave(torch.arange(u1 - u0, device=pos.device), t_ptr[u0:u1 + 1].diff())
        pos[rows, t_idx[lo:hi]] = 1
        pos_len = pos.sum(1)
        keep = pos_len > 0
        hit = torch.gather(pos, 1, top)[keep].double()
        pos_len = pos_len[keep].double()
        del pos
        n_eval += int(keep.sum())
        cum_hits = hit.cumsum(1)
        dcg = (hit * discount).cumsum(1)
        first = torch.where(hit.any(1), hit.argmax(1).double() + 1, torch.full_like(pos_len, math.inf))
        for k in ks:
            idcg = ideal[(torch.minimum(pos_len, torch.tensor(float(k), dtype=torch.float64)) - 1).long()]
            h = cum_hits[:, k - 1]
            sums[f"hr@{k}"] += float((h > 0).double().sum())
            sums[f"ndcg@{k}"] += float((dcg[:, k - 1] / idcg).sum())
            sums[f"recall@{k}"] += float((h / pos_len).sum())
            sums[f"precision@{k}"] += float((h / k).sum())
            sums[f"mrr@{k}"] += float(torch.where(first <= k, 1.0 / first, torch.zeros_like(first)).sum())
    return {name: (s / n_eval if n_eval else 0.0) for name, s in sums.items()}


METRICS_ORDER = METRIC_NAMES
