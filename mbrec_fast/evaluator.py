"""Full-ranking top-K evaluation and retrieval without the users x items score matrix.

`evaluate_full_ranking` ranks every item for every evaluated user, drops the user's excluded
(training) items, and computes RecBole's top-K metrics (HR, NDCG, Recall, Precision, MRR) overall
and per target group, in one pass. Scores come from a blocked GEMM (dot-product models) or from a
user-supplied `score_fn` (any model); each block of scores feeds per-user top-K heaps and is
dropped right away, so memory is O(users * K + threads * block) instead of O(users * items).

Semantics (RecBole's definitions, see docs/evaluator.md):
* HR@K = 1 if at least one target is in the top K, else 0.
* NDCG@K = DCG / IDCG, gain 1/log2(rank + 1) with 1-based rank; IDCG over min(|targets|, K) positions.
* Recall@K = hits / |targets|;  Precision@K = hits / K;  MRR@K = 1 / rank of the first hit (0 if none).
* Duplicate target ids count once. Excluded items are never ranked; a target that is also excluded
  cannot be hit but still counts in |targets| (as in RecBole, whose history mask does the same).
* Ties: higher score first, equal scores by lower item id (deterministic on any thread count/device).
* Means are over users with >= 1 target; users without targets are skipped and counted in n_skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .csr import Csr, coo_to_csr, csr_rows, indptr_from_rows
from ._checks import check_csr, check_finite, check_tensor
from . import _evaluator_ops
from ._evaluator_ops import METRICS

__all__ = ["EvalResult", "evaluate_full_ranking", "topk", "METRICS"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ScoreFn = Callable[[torch.Tensor, int, int], torch.Tensor]

# Default block sizes on CPU: 256 users per block (packed d-major, 64 KB at d = 64, stays in L2 while the
# micro-kernel streams the item table past it); block_items is the score_fn block width and, for fp16/bf16
# embeddings, the item rows converted to fp32 at a time (fp32 items are read in place). See docs/evaluator.md.
DEFAULT_BLOCK_USERS = 256
DEFAULT_BLOCK_ITEMS = 256
# On a GPU one cuBLAS GEMM per block wants large tiles (2048 x 32768 fp32 = 256 MB of scores).
DEFAULT_BLOCK_USERS_CUDA = 2048
DEFAULT_BLOCK_ITEMS_CUDA = 32768
# Users handed to one op call: bounds the [chunk, K] heaps and per-user metric rows.
_USER_CHUNK = 8192
# Without group_names, labels up to max(this, number of targets) name their own groups; a larger label is
# an error instead of a group (and per-user metric rows) per id below it.
_MAX_UNNAMED_GROUPS = 64
_MERGE_WINDOW_BYTES = 64 * 2 ** 20  # score_fn blocks gathered per top-k merge (see _topk_score_fn)


@dataclass
class EvalResult:
    """Result of `evaluate_full_ranking`.

    metrics: "{metric}@{k}" -> mean over evaluated users (e.g. "ndcg@10").
    n_users: users evaluated (had >= 1 target); n_skipped: users without targets (skipped).
    groups: group name -> metrics computed on that group's targets only;
    group_users: group name -> users with >= 1 target in that group.
    per_user: when requested, "{metric}@{k}" -> [n_users] float64 values, plus "user" -> their ids.
    """
    metrics: Dict[str, float]
    n_users: int
    n_skipped: int
    groups: Dict[str, Dict[str, float]] = field(default_factory=dict)
    group_users: Dict[str, int] = field(default_factory=dict)
    per_user: Optional[Dict[str, torch.Tensor]] = None


def _empty_csr(n_rows: int, device) -> Csr:
    return (torch.zeros(n_rows + 1, dtype=torch.int64, device=device),
            torch.zeros(0, dtype=torch.int64, device=device))


# ----------------------------------------------------------------------------------------------
# Argument handling

def _resolve_group(process_group):
    if process_group is None:
        return None
    import torch.distributed as dist
    if isinstance(process_group, str):
        if process_group != "default":
            raise ValueError(f"process_group must be None, 'default' or a torch.distributed group, got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.group.WORLD
    return process_group


def _check_block(value, name: str, default: int, device=None) -> int:
    if value is None:
        if device is not None and torch.device(device).type == "cuda":
            return DEFAULT_BLOCK_USERS_CUDA if name == "block_users" else DEFAULT_BLOCK_ITEMS_CUDA
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_ks(ks, n_items: int) -> List[int]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = list(ks)
    if not ks:
        raise ValueError("ks must contain at least one cutoff")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"ks must hold ints, got {k!r}")
        if k < 1 or k > n_items:
            raise ValueError(f"ks: every K must satisfy 1 <= K <= n_items = {n_items}, got {k}")
    return ks


def _check_embeddings(user_emb, item_emb):
    check_tensor(user_emb, "user_emb", ndim=2, dtypes=_FLOAT_DTYPES)
    check_tensor(item_emb, "item_emb", ndim=2, dtypes=_FLOAT_DTYPES, device=user_emb.device)
    if user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"user_emb and item_emb must have the same embedding dim, got "
                         f"{user_emb.shape[1]} and {item_emb.shape[1]}")
    if user_emb.dtype != item_emb.dtype:
        raise TypeError(f"user_emb and item_emb must have the same dtype, got {user_emb.dtype} and {item_emb.dtype}")
    if item_emb.shape[0] < 1:
        raise ValueError("item_emb must hold at least one item")
    check_finite(user_emb, "user_emb")
    check_finite(item_emb, "item_emb")


def _check_users(users, n_users: int, device) -> torch.Tensor:
    if users is None:
        return torch.arange(n_users, dtype=torch.int64, device=device)
    check_tensor(users, "users", ndim=1, dtypes=(torch.int64, torch.int32))
    users = users.to(device=device, dtype=torch.int64).contiguous()
    if users.numel() and (int(users.min()) < 0 or int(users.max()) >= n_users):
        raise ValueError(f"users out of range: ids must lie in [0, {n_users}), found "
                         f"[{int(users.min())}, {int(users.max())}]")
    return users


# ----------------------------------------------------------------------------------------------
# Public API

def topk(user_emb: torch.Tensor, item_emb: torch.Tensor, k: int,
         exclude: Optional[Csr] = None, *, users: Optional[torch.Tensor] = None,
         block_users: Optional[int] = None, block_items: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k items by dot product for each user, never building the users x items matrix.

    Returns (scores [U, k] fp32, ids [U, k] int64), best first; equal scores are ordered by lower item
    id. Items in the user's row of the `exclude` CSR are never returned; when fewer than k items are
    eligible the tail is padded with score -inf and id -1. `users` restricts (and orders) the rows.
    fp16/bf16 embeddings are accepted and scored in fp32.
    """
    _check_embeddings(user_emb, item_emb)
    n_users, n_items = user_emb.shape[0], item_emb.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1 or k > n_items:
        raise ValueError(f"k must satisfy 1 <= k <= n_items = {n_items}, got {k}")
    device = user_emb.device
    exclude = _empty_csr(n_users, device) if exclude is None else check_csr(exclude, "exclude", n_users, n_items, device)
    users = _check_users(users, n_users, device)
    _check_dot_finite(user_emb, item_emb, users)
    bu = _check_block(block_users, "block_users", DEFAULT_BLOCK_USERS, device)
    bi = _check_block(block_items, "block_items", DEFAULT_BLOCK_ITEMS, device)
    scores, ids = _evaluator_ops.topk_dot(user_emb.contiguous(), item_emb.contiguous(), users, exclude, k, bu, bi,
                                          adapt_users=block_users is None)
    _check_no_overflow(scores, ids)
    return scores, ids


_NORM_CHUNK = 1 << 16


def _max_row_norm(x: torch.Tensor) -> float:
    """Largest L2 norm of a row of x, in float64 and chunked (no copy of the whole table)."""
    return max((float(torch.linalg.vector_norm(c, dim=1, dtype=torch.float64).max()) for c in x.split(_NORM_CHUNK)),
               default=0.0)


def _check_dot_finite(user_emb: torch.Tensor, item_emb: torch.Tensor, users: torch.Tensor) -> None:
    """Finite embeddings can still give -inf or NaN fp32 dot products (an overflow, or inf - inf inside the
    sum), which the ranking would drop as silent misses. |u.v| and every partial sum are bounded by
    |u| |v|, so when max |u| * max |v| stays well below the fp32 range (the normal case) nothing can
    overflow; only otherwise are the evaluated users' scores checked exactly, block by block."""
    if not users.numel() or _max_row_norm(user_emb) * _max_row_norm(item_emb) <= torch.finfo(torch.float32).max / 4:
        return
    for rows in users.split(256):
        u = user_emb.index_select(0, rows).float()
        for start in range(0, item_emb.shape[0], _NORM_CHUNK):
            if not bool(torch.isfinite(u @ item_emb[start:start + _NORM_CHUNK].float().t()).all()):
                raise ValueError("user_emb/item_emb: dot products overflow float32 (inf or NaN scores); "
                                 "rescale the embeddings")


def _check_no_overflow(scores: torch.Tensor, ids: torch.Tensor) -> None:
    """Finite embeddings can still overflow fp32 dot products; an inf score would rank wrongly."""
    if scores.numel() and not bool(torch.isfinite(scores[ids >= 0]).all()):
        raise ValueError("user_emb/item_emb: dot products overflow float32 (inf scores); rescale the embeddings")


def _topk_score_fn(score_fn: ScoreFn, users: torch.Tensor, n_items: int, exclude: Csr, k: int,
                   block_items: int, device,
                   on_window: Optional[Callable[[int], None]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k over score_fn blocks. score_fn is called per `block_items` items (its intermediates stay
    small), and the blocks are gathered into a window of up to _MERGE_WINDOW_BYTES that is merged into
    the running top-k at once: every merge re-seeds and re-sorts each user's k best, so merging each
    small block on its own cost more than the scoring for cheap score_fns."""
    b = users.numel()
    top_s = torch.full((b, k), -math.inf, dtype=torch.float32, device=device)
    top_i = torch.full((b, k), -1, dtype=torch.int64, device=device)
    window = block_items * max(1, _MERGE_WINDOW_BYTES // (4 * max(b, 1) * block_items))
    window = min(window, -(-n_items // block_items) * block_items)
    flat = torch.empty(b * min(window, n_items), dtype=torch.float32, device=device) if window > block_items else None
    for w_start in range(0, n_items, window):
        w_end = min(n_items, w_start + window)
        gathered = None if flat is None else flat[:b * (w_end - w_start)].view(b, w_end - w_start)
        for start in range(w_start, w_end, block_items):
            block = _score_block(score_fn, users, start, min(w_end, start + block_items), device)
            if gathered is None:
                gathered = block
            else:
                gathered[:, start - w_start:start - w_start + block.shape[1]].copy_(block)
            del block
        top_s, top_i = _evaluator_ops.topk_merge(gathered, users, w_start, exclude, top_s, top_i)
        del gathered
        if on_window is not None:
            on_window(w_end)
    return top_s, top_i


def _score_block(score_fn: ScoreFn, users: torch.Tensor, start: int, end: int, device) -> torch.Tensor:
    """score_fn(users, start, end) checked (type, shape, dtype, device, finiteness) and made fp32-contiguous."""
    b = users.numel()
    with torch.no_grad():
        block = score_fn(users, start, end)
    if not isinstance(block, torch.Tensor):
        raise TypeError(f"score_fn must return a torch.Tensor, got {type(block).__name__}")
    if tuple(block.shape) != (b, end - start):
        raise ValueError(f"score_fn(users, {start}, {end}) must return shape {(b, end - start)}, "
                         f"got {tuple(block.shape)}")
    if not block.is_floating_point():
        raise TypeError(f"score_fn must return floating-point scores, got {block.dtype}")
    if block.device.type != torch.device(device).type:
        raise ValueError(f"score_fn returned scores on {block.device}, expected {device}")
    block = block.detach().to(dtype=torch.float32).contiguous()
    check_finite(block, "score_fn scores")
    return block


def evaluate_full_ranking(user_emb: Optional[torch.Tensor], item_emb: Optional[torch.Tensor],
                          exclude: Optional[Csr], targets: Csr,
                          ks: Sequence[int] = (10, 20, 50, 100), metrics: Sequence[str] = METRICS, *,
                          score_fn: Optional[ScoreFn] = None, n_items: Optional[int] = None,
                          users: Optional[torch.Tensor] = None,
                          target_groups: Optional[torch.Tensor] = None,
                          group_names: Optional[Sequence[str]] = None,
                          per_user: bool = False, block_users: Optional[int] = None,
                          block_items: Optional[int] = None, process_group=None,
                          progress: Optional[Callable[[int, int], None]] = None,
                          score_overrides: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                          ) -> EvalResult:
    """Full-ranking top-K evaluation with RecBole's metric definitions (see module docstring).

    user_emb [U, d], item_emb [N, d]: score = dot product (fp32/fp16/bf16; scored in fp32). Or pass
    user_emb = item_emb = None, `score_fn(users, item_start, item_end) -> [b, item_end - item_start]`
    and `n_items` for any other model.
    score_overrides (dot product only): (indptr [U + 1], indices, scores) in CSR by user, sorted item ids per
    row: the score of (u, indices[j]) is scores[j] instead of the dot product, for models whose score is a dot
    product except on a sparse set of pairs (MEMBER's hard gate: another expert on the items the user
    touched). The fused dot-product op ranks every other item (the overridden ones excluded there) and the
    overridden pairs are merged into each user's top K, so no score block is materialized.
    exclude, targets: CSR pairs (indptr [U + 1], indices) by user id with sorted item ids per row;
    exclude may be None. users: evaluate only these user ids (default all U).
    target_groups: int64 label per target (aligned with targets.indices), named by group_names;
    per-group metrics count only that group's targets and skip users with none of them.
    per_user: also return each evaluated user's metric values.
    process_group: None (single process), "default", or a torch.distributed group: users are sharded
    across ranks, sums and counts all-reduced; every rank returns the same result.
    progress: optional `progress(users_done, users_total)` (this rank's users), called after each chunk
    of users and, with a score_fn, after each window of items (users_done then counts the chunk's
    users in proportion to the items scored). It only observes; the results do not depend on it.
    """
    plan = _resolve_arguments(user_emb, item_emb, exclude, targets, ks, metrics, score_fn, n_items, users,
                              target_groups, group_names, block_users, block_items, process_group, progress,
                              score_overrides)
    totals = _rank_in_chunks(plan, user_emb, item_emb, score_fn, per_user, progress)
    if plan.process_group is not None:
        totals = _reduce_across_ranks(totals, plan.process_group, per_user)
    return _result(plan, totals, per_user)


@dataclass
class _EvalPlan:
    """The arguments of `evaluate_full_ranking`, checked and resolved."""
    metrics: List[str]
    ks: List[int]
    n_items: int
    device: torch.device
    targets: Csr
    exclude: Csr
    users: torch.Tensor  # the users this process evaluates (its shard under a process group)
    target_groups: torch.Tensor  # int64 label per target; empty without groups
    group_names: List[str]
    block_users: int
    block_items: int
    adapt_users: bool  # block_users was not given: the CPU op may shrink it to occupy every thread
    process_group: object  # a torch.distributed group, or None
    # score_overrides: (indptr, indices, scores) without the excluded pairs, and the dot-product op's
    # exclusion (exclude plus every overridden pair); None without overrides
    overrides: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    dot_exclude: Optional[Csr] = None


@dataclass
class _Totals:
    """Metric sums and user counts (this process's, or every rank's once reduced).

    sums [n_groups + 1, len(ks), len(METRICS)] float64 over the evaluated users of each group (0 = all
    targets); n_eval [n_groups + 1] int64 users with >= 1 target in the group; n_skip users without targets;
    with per_user, the evaluated users' ids and their overall values [n, len(ks), len(METRICS)].
    """
    sums: torch.Tensor
    n_eval: torch.Tensor
    n_skip: int
    user_ids: Optional[torch.Tensor] = None
    user_values: Optional[torch.Tensor] = None


def _resolve_arguments(user_emb, item_emb, exclude, targets, ks, metrics, score_fn, n_items, users,
                       target_groups, group_names, block_users, block_items, process_group, progress,
                       score_overrides=None) -> _EvalPlan:
    """Checks the arguments of `evaluate_full_ranking` (the first bad one raises) and resolves the defaults:
    item count, device, empty exclude, all users, block sizes, groups, and this rank's shard of the users."""
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable or None")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"metrics: unknown metric {m!r} (choose from {METRICS})")
    if not metrics:
        raise ValueError("metrics must name at least one metric")
    if not isinstance(targets, (tuple, list)) or len(targets) != 2:
        raise TypeError("targets must be a CSR pair (indptr, indices)")

    if score_fn is None:
        if user_emb is None or item_emb is None:
            raise ValueError("user_emb and item_emb are required unless score_fn is given")
        _check_embeddings(user_emb, item_emb)
        n_users, n_items_ = user_emb.shape[0], item_emb.shape[0]
        if n_items is not None and n_items != n_items_:
            raise ValueError(f"n_items = {n_items} disagrees with item_emb.shape[0] = {n_items_}")
        n_items = n_items_
        device = user_emb.device
    else:
        if not callable(score_fn):
            raise TypeError("score_fn must be callable")
        if user_emb is not None or item_emb is not None:
            raise ValueError("pass user_emb = item_emb = None when score_fn is given")
        if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
            raise ValueError(f"n_items must be a positive int when score_fn is given, got {n_items!r}")
        check_tensor(targets[0], "targets.indptr", ndim=1)
        if targets[0].numel() < 1:
            raise ValueError("targets.indptr must have n_users + 1 >= 1 entries, got an empty tensor")
        n_users = targets[0].numel() - 1
        device = targets[0].device
    targets = check_csr(targets, "targets", n_users, n_items, device)
    exclude = _empty_csr(n_users, device) if exclude is None else check_csr(exclude, "exclude", n_users, n_items, device)
    ks = _check_ks(ks, n_items)
    users = _check_users(users, n_users, device)
    if score_fn is None:
        _check_dot_finite(user_emb, item_emb, users)
    bu = _check_block(block_users, "block_users", DEFAULT_BLOCK_USERS, device)
    bi = _check_block(block_items, "block_items", DEFAULT_BLOCK_ITEMS, device)
    target_groups, group_names = _resolve_target_groups(target_groups, group_names, targets, device)

    pg = _resolve_group(process_group)
    if pg is not None:
        import torch.distributed as dist
        rank, world = dist.get_rank(pg), dist.get_world_size(pg)
        users = users.tensor_split(world)[rank]
    overrides = dot_exclude = None
    if score_overrides is not None:
        if score_fn is not None:
            raise ValueError("score_overrides apply to the dot-product form (user_emb, item_emb), not to score_fn")
        overrides, dot_exclude = _resolve_overrides(score_overrides, exclude, n_users, n_items, device)
    return _EvalPlan(metrics=metrics, ks=ks, n_items=n_items, device=device, targets=targets, exclude=exclude,
                     users=users, target_groups=target_groups, group_names=group_names, block_users=bu,
                     block_items=bi, adapt_users=block_users is None, process_group=pg, overrides=overrides,
                     dot_exclude=dot_exclude)


def _resolve_overrides(score_overrides, exclude: Csr, n_users: int, n_items: int, device):
    """Checks score_overrides; returns (its pairs that are not excluded, with their scores) and the exclusion for
    the dot-product op (exclude united with every overridden pair), both CSR with sorted distinct rows."""
    if not isinstance(score_overrides, (tuple, list)) or len(score_overrides) != 3:
        raise TypeError("score_overrides must be (indptr, indices, scores)")
    indptr, indices = check_csr(tuple(score_overrides[:2]), "score_overrides", n_users, n_items, device)
    scores = score_overrides[2]
    check_tensor(scores, "score_overrides.scores", ndim=1, device=device)
    if not scores.is_floating_point() or scores.numel() != indices.numel():
        raise ValueError(f"score_overrides.scores must be floating point with one score per index "
                         f"({indices.numel()}), got {scores.dtype} [{scores.numel()}]")
    check_finite(scores, "score_overrides.scores")
    rows = csr_rows((indptr, indices))
    keys = rows * n_items + indices
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise ValueError("score_overrides: item ids must be distinct within a row")
    ex_rows = csr_rows(exclude)
    keep = ~torch.isin(keys, ex_rows * n_items + exclude[1])
    overrides = (indptr_from_rows(rows[keep], n_users), indices[keep].contiguous(), scores[keep].float().contiguous())
    union = coo_to_csr(torch.cat([ex_rows, rows]), torch.cat([exclude[1].long(), indices.long()]), n_users, n_items,
                       index_dtype=torch.int64)
    return overrides, union


def _rank_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys in the evaluator's order (higher score, then lower item id, larger key first) of fp32 scores and
    item ids below 2^32 - 1; padding (id -1) gets the smallest key of its score. Unique per distinct id, so a
    plain top-k over keys is the ordered top-k."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # -0.0 -> +0.0: they tie
    ordered = torch.where(bits >= 0, bits + (1 << 31), (~bits) & 0xFFFFFFFF)  # float order as unsigned 32 bits
    low = torch.where(ids < 0, 0, 0xFFFFFFFF - ids)
    return ((ordered - (1 << 31)) << 32) | low


def _merge_overrides(top_scores: torch.Tensor, top_ids: torch.Tensor, chunk: torch.Tensor, overrides,
                     k: int, rows_per_pass: int = 1024) -> torch.Tensor:
    """Item ids of each user's k best of (its top k from the dot-product op) and (its overridden pairs), best
    first in the evaluator's order (higher score, then lower item id), padded with -1."""
    indptr, indices, scores = overrides
    out = []
    for r0 in range(0, chunk.numel(), rows_per_pass):
        users = chunk[r0:r0 + rows_per_pass]
        ts, ti = top_scores[r0:r0 + rows_per_pass], top_ids[r0:r0 + rows_per_pass]
        start, count = indptr[users], indptr[users + 1] - indptr[users]
        m = int(count.max()) if count.numel() else 0
        if m == 0:
            out.append(ti)
            continue
        col = torch.arange(m, device=chunk.device)
        valid = col[None, :] < count[:, None]
        pos = (start[:, None] + col[None, :]).clamp_(max=max(indices.numel() - 1, 0))
        over = _rank_keys(torch.where(valid, scores[pos], float("-inf")), torch.where(valid, indices[pos], -1))
        keys = torch.cat([_rank_keys(ts, ti), over], 1)
        best = keys.topk(k, dim=1).values
        low = best & 0xFFFFFFFF
        out.append(torch.where(low == 0, -1, 0xFFFFFFFF - low))
    return torch.cat(out)


def _resolve_target_groups(target_groups, group_names, targets: Csr, device) -> Tuple[torch.Tensor, List[str]]:
    """(int64 label per target, group names); an empty label tensor and no names without target_groups."""
    if target_groups is None:
        if group_names is not None:
            raise ValueError("group_names given without target_groups")
        return torch.zeros(0, dtype=torch.int64, device=device), []
    check_tensor(target_groups, "target_groups", ndim=1, dtypes=(torch.int64, torch.int32), device=device)
    if target_groups.numel() != targets[1].numel():
        raise ValueError(f"target_groups must have one label per target ({targets[1].numel()}), "
                         f"got {target_groups.numel()}")
    target_groups = target_groups.to(torch.int64).contiguous()
    n_labels = int(target_groups.max()) + 1 if target_groups.numel() else 0
    if target_groups.numel() and int(target_groups.min()) < 0:
        raise ValueError("target_groups labels must be >= 0")
    if group_names is None:
        if n_labels > max(target_groups.numel(), _MAX_UNNAMED_GROUPS):  # one bad label must not allocate
            raise ValueError(f"target_groups has label {n_labels - 1} but only {target_groups.numel()} targets; "
                             f"unnamed labels must be dense ids (or pass group_names)")
        group_names = [str(g) for g in range(n_labels)]
    group_names = [str(g) for g in group_names]
    if n_labels > len(group_names):
        raise ValueError(f"target_groups has label {n_labels - 1} but group_names names only {len(group_names)} groups")
    if len(set(group_names)) != len(group_names):
        raise ValueError("group_names must be distinct")
    return target_groups, group_names


def _rank_in_chunks(plan: _EvalPlan, user_emb, item_emb, score_fn: Optional[ScoreFn], per_user: bool,
                    progress) -> _Totals:
    """Ranks this process's users, _USER_CHUNK at a time (top-k by the dot-product op or over score_fn
    blocks), and sums each chunk's metric values into the totals."""
    ks, n_items, n_groups = plan.ks, plan.n_items, len(plan.group_names)
    kmax = max(ks)
    n_ks, n_m = len(ks), len(METRICS)
    sums = torch.zeros(n_groups + 1, n_ks, n_m, dtype=torch.float64)
    n_eval = torch.zeros(n_groups + 1, dtype=torch.int64)
    n_skip = 0
    kept_users: List[torch.Tensor] = []
    kept_values: List[torch.Tensor] = []
    if score_fn is None:
        ue, ie = user_emb.contiguous(), item_emb.contiguous()
    n_total, n_done = plan.users.numel(), 0
    for chunk in plan.users.split(_USER_CHUNK):
        if score_fn is None:
            exclude = plan.exclude if plan.overrides is None else plan.dot_exclude
            top_scores, top_ids = _evaluator_ops.topk_dot(ue, ie, chunk, exclude, kmax, plan.block_users,
                                                          plan.block_items, adapt_users=plan.adapt_users)
            _check_no_overflow(top_scores, top_ids)
            if plan.overrides is not None:
                top_ids = _merge_overrides(top_scores, top_ids, chunk, plan.overrides, kmax)
        else:
            on_window = None if progress is None else (
                lambda end, done=n_done, b=chunk.numel(): progress(done + b * end // n_items, n_total))
            _, top_ids = _topk_score_fn(score_fn, chunk, n_items, plan.exclude, kmax, plan.block_items, plan.device,
                                        on_window)
        values, counts = _evaluator_ops.rank_metrics(top_ids, chunk, plan.targets, plan.target_groups, n_groups, ks)
        values, counts = values.cpu(), counts.cpu()
        valid = counts > 0
        sums += (values * valid[:, :, None, None]).sum(1)
        n_eval += valid.sum(1)
        n_skip += int((~valid[0]).sum())
        if per_user:
            kept_users.append(chunk.cpu()[valid[0]])
            kept_values.append(values[0][valid[0]])
        n_done += chunk.numel()
        if progress is not None:
            progress(n_done, n_total)
    totals = _Totals(sums=sums, n_eval=n_eval, n_skip=n_skip)
    if per_user:
        totals.user_ids = torch.cat(kept_users) if kept_users else torch.zeros(0, dtype=torch.int64)
        totals.user_values = (torch.cat(kept_values) if kept_values
                              else torch.zeros(0, n_ks, n_m, dtype=torch.float64))
    return totals


def _reduce_across_ranks(totals: _Totals, pg, per_user: bool) -> _Totals:
    """Every rank's totals summed (one all_reduce) and, with per_user, every rank's users gathered in rank
    order; each rank returns the same result."""
    import torch.distributed as dist
    sums, n_eval = totals.sums, totals.n_eval
    packed = torch.cat([sums.flatten(), n_eval.double(), torch.tensor([float(totals.n_skip)], dtype=torch.float64)])
    backend_dev = "cuda" if dist.get_backend(pg) == "nccl" else "cpu"
    packed = packed.to(backend_dev)
    dist.all_reduce(packed, group=pg)
    packed = packed.cpu()
    reduced = _Totals(sums=packed[:sums.numel()].view_as(sums),
                      n_eval=packed[sums.numel():sums.numel() + n_eval.numel()].round().to(torch.int64),
                      n_skip=int(round(float(packed[-1]))))
    if per_user:
        gathered = [None] * dist.get_world_size(pg)
        dist.all_gather_object(gathered, (totals.user_ids, totals.user_values), group=pg)
        reduced.user_ids = torch.cat([x[0] for x in gathered])
        reduced.user_values = torch.cat([x[1] for x in gathered])
    return reduced


def _result(plan: _EvalPlan, totals: _Totals, per_user: bool) -> EvalResult:
    """The means over evaluated users, overall and per group, as an EvalResult."""
    sums, n_eval = totals.sums, totals.n_eval

    def means(g: int) -> Dict[str, float]:
        out = {}
        for j, k in enumerate(plan.ks):
            for m in plan.metrics:
                out[f"{m}@{k}"] = float(sums[g, j, METRICS.index(m)] / n_eval[g]) if n_eval[g] else 0.0
        return out

    names = plan.group_names
    result = EvalResult(metrics=means(0), n_users=int(n_eval[0]), n_skipped=totals.n_skip,
                        groups={name: means(g + 1) for g, name in enumerate(names)},
                        group_users={name: int(n_eval[g + 1]) for g, name in enumerate(names)})
    if per_user:
        result.per_user = {"user": totals.user_ids}
        for j, k in enumerate(plan.ks):
            for m in plan.metrics:
                result.per_user[f"{m}@{k}"] = totals.user_values[:, j, METRICS.index(m)].clone()
    return result
