"""Brute-force ranking metrics of the two sequential protocols, one Python loop per user (test reference).

Sampled protocol: the target is ranked among its sampled negatives; rank = 1 + #(negatives scoring >= the target)
(ties count against the target). Full protocol: every item not excluded is ranked by score, ties by lower item id
(the evaluator's order); an excluded target cannot be hit.
HR@K = [rank <= K]; NDCG@K = 1 / log2(rank + 1) if rank <= K else 0; MRR = 1 / rank (sampled: untruncated;
full: MRR@K, 0 beyond K).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["sampled_metrics_reference", "full_ranking_metrics_reference", "negative_pool_reference",
           "eval_negatives_reference", "sequence_negatives_torch", "dense_full_ranking"]


def negative_pool_reference(sequence: Sequence[int], target: int, item_domain: Sequence[int],
                            protocol: str) -> List[int]:
    """Sorted candidate negatives of one target: the items not in `sequence` (and not the target), from every
    domain ("official") or from the target's domain only ("domain")."""
    if protocol not in ("official", "domain"):
        raise ValueError(f"protocol must be 'official' or 'domain', got {protocol!r}")
    seen = set(int(i) for i in sequence) | {int(target)}
    dom = int(item_domain[target])
    return [i for i in range(len(item_domain)) if i not in seen and (protocol == "official" or int(item_domain[i]) == dom)]


def eval_negatives_reference(history: Sequence[int], target: int, item_domain: Sequence[int], n_neg: int, seed: int,
                             user: int, protocol: str) -> List[int]:
    """The sampled protocol's draw for one user: min(n_neg, pool) distinct items of the pool, uniform without
    replacement from numpy's Generator seeded with [seed, user] (the draw `sample_eval_negatives` makes)."""
    import numpy as np
    pool = negative_pool_reference(history, target, item_domain, protocol)
    k = min(n_neg, len(pool))
    return [int(v) for v in np.random.default_rng([seed, user]).choice(np.array(pool, dtype=np.int64), size=k,
                                                                         replace=False)]


def _accumulate(ranks: List[float], groups: List[int], ks: Sequence[int], names: Sequence[str],
                mrr_cut: int = 0) -> Dict[str, Dict[str, float]]:
    def one(rs: List[float]) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for k in ks:
            out[f"hr@{k}"] = sum(1.0 for r in rs if r <= k) / max(len(rs), 1)
            out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in rs if r <= k) / max(len(rs), 1)
        if mrr_cut:
            out[f"mrr@{mrr_cut}"] = sum(1.0 / r for r in rs if r <= mrr_cut) / max(len(rs), 1)
        else:
            out["mrr"] = sum(1.0 / r for r in rs) / max(len(rs), 1)
        return out
    res = {"all": one(ranks)}
    for g, name in enumerate(names):
        rs = [r for r, gg in zip(ranks, groups) if gg == g]
        if rs:
            res[name] = one(rs)
    return res


def sampled_metrics_reference(pos_scores: torch.Tensor, neg_scores: torch.Tensor, groups: torch.Tensor,
                              ks: Sequence[int], group_names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """pos_scores [U], neg_scores [U, M], groups [U] -> {"all": metrics, group name: metrics}."""
    ranks = []
    for u in range(pos_scores.numel()):
        p = float(pos_scores[u])
        ranks.append(1 + sum(1 for v in neg_scores[u].tolist() if v >= p))
    return _accumulate(ranks, groups.tolist(), ks, group_names)


def full_ranking_metrics_reference(scores: torch.Tensor, exclude: Sequence[Sequence[int]], targets: torch.Tensor,
                                   groups: torch.Tensor, ks: Sequence[int],
                                   group_names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """scores [U, N] (already including any domain restriction), exclude[u] item ids, targets [U], groups [U]."""
    ranks = []
    kmax = max(ks)
    for u in range(scores.shape[0]):
        ex = set(int(i) for i in exclude[u])
        t = int(targets[u])
        if t in ex:
            ranks.append(float("inf"))
            continue
        st = float(scores[u, t])
        rank = 1
        for i, v in enumerate(scores[u].tolist()):
            if i in ex or i == t:
                continue
            if v > st or (v == st and i < t):
                rank += 1
        ranks.append(rank)
    return _accumulate(ranks, groups.tolist(), ks, group_names, mrr_cut=kmax)


def sequence_negatives_torch(seqs: torch.Tensor, n_items: int, num_neg: int, item_domain: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Plain-PyTorch negatives per position [B, L, num_neg] (-1 at padding, seqs pad = -1): uniform over the items
    (of the position's domain when `item_domain` is given) not in the row, by redrawing collisions row by row. The
    baseline the SyNCRec benchmark runs against `mbrec_fast.sample_sequence_negatives`."""
    B, L = seqs.shape
    out = torch.full((B, L, num_neg), -1, dtype=torch.int64)
    pools = None
    if item_domain is not None:
        pools = [torch.nonzero(item_domain == d).flatten() for d in range(int(item_domain.max()) + 1)]
    for b in range(B):
        row = seqs[b][seqs[b] >= 0]
        n = row.numel()
        if pools is None:
            draw = torch.randint(n_items, (n, num_neg), generator=generator)
        else:
            dom = item_domain[row]
            draw = torch.empty(n, num_neg, dtype=torch.int64)
            for d in dom.unique().tolist():
                sel = dom == d
                draw[sel] = pools[d][torch.randint(pools[d].numel(), (int(sel.sum()), num_neg), generator=generator)]
        bad = torch.isin(draw, row)
        while bool(bad.any()):
            k = int(bad.sum())
            if pools is None:
                fresh = torch.randint(n_items, (k,), generator=generator)
            else:
                dd = dom[:, None].expand(n, num_neg)[bad]
                fresh = torch.empty(k, dtype=torch.int64)
                for d in dd.unique().tolist():
                    sel = dd == d
                    fresh[sel] = pools[d][torch.randint(pools[d].numel(), (int(sel.sum()),), generator=generator)]
            draw[bad] = fresh
            bad = torch.isin(draw, row)
        out[b, :n] = draw
    return out


def dense_full_ranking(states: torch.Tensor, items: torch.Tensor, histories: Sequence[torch.Tensor],
                       targets: torch.Tensor, k: int = 10, chunk: int = 1024) -> Dict[str, float]:
    """Plain-PyTorch full ranking: dense scores of every item, history masked to -inf, torch.topk; HR@k and
    NDCG@k (ties broken by topk's order). The dense baseline of the SyNCRec benchmark."""
    hits, ndcg = 0.0, 0.0
    for s in range(0, states.shape[0], chunk):
        sc = states[s:s + chunk] @ items.T
        for r, h in enumerate(histories[s:s + chunk]):
            sc[r, h] = float("-inf")
        top = torch.topk(sc, k, dim=1).indices
        match = top == targets[s:s + chunk, None]
        pos = match.float().argmax(1)
        found = match.any(1)
        hits += float(found.sum())
        ndcg += float((found.float() / torch.log2(pos.float() + 2)).sum())
    n = max(states.shape[0], 1)
    return {f"hr@{k}": hits / n, f"ndcg@{k}": ndcg / n}
