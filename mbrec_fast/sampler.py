"""Cascade-aware negative sampling for multi-behavior recommenders.

`InteractionGraph` holds, per behavior (cascade order, 0 = weakest ... R-1 = target), a sorted and
deduplicated CSR user -> items, plus the union of all behaviors ("touched") and the union of the auxiliary
(non-target) behaviors ("visited" pool). Everything is packed into one int64 `indptr[R + 2, n_users + 1]`
and one int32 `indices` tensor: memory is proportional to the interactions and there is no per-user
Python object. `sample_negatives` draws `num_neg` negatives per row with a counter-based Philox RNG keyed
by (seed, offset, row index), so a given (seed, offset) gives the same bits for any thread count and on
CPU or CUDA. `TripleBatches` is a drop-in for a DataLoader of (user, positive, negative, behavior) triples.

Modes (for a row with user u and positive behavior r):

* ``"exclusive"``: items u did not do at r (items done only at other behaviors are allowed);
* ``"strict"``: items u never touched at any behavior;
* ``"cascade"``: per draw, pick level l < r with probability ``level_probs[r][l]`` and draw from the items u
  did at l but not at r, or with probability ``level_probs[r][-1]`` from the never-touched items. An empty
  level pool falls back to the never-touched pool, then to the exclusive set;
* ``"visited"``: items u touched at an auxiliary behavior but not at r (MEMBER's visited pool);
* ``"unvisited"``: items u touched neither at an auxiliary behavior nor at r.

Draws are uniform over the pool, or with ``popularity`` proportional to the given item weights restricted
to the pool and renormalized (modes exclusive, strict, unvisited and the never-touched pool of cascade).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _sampler_ops
from ._checks import check_csr, check_tensor
from .csr import build_packed_csr as _build_torch, coo_to_csr as _coo_to_csr  # noqa: F401  (old private names)
from .csr import indptr_from_rows, tensor_from_numpy


def __getattr__(name: str):
    """Deprecated path: `TripleBatches` (and its old name `NegativeSampler`) live in `mbrec_fast.batching`
    (also `mbrec_fast.TripleBatches`). Resolved on first use: that module builds on this one, which itself
    never imports it."""
    if name in ("TripleBatches", "NegativeSampler"):
        from .batching import TripleBatches
        return TripleBatches
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["InteractionGraph", "sample_negatives", "sample_sequence_negatives", "AliasTable", "MODES"]

MODES = ("exclusive", "strict", "cascade", "visited", "unvisited")
_MODE_IDS = {m: i for i, m in enumerate(MODES)}
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ----------------------------------------------------------------------------------------------------------
# graph
# ----------------------------------------------------------------------------------------------------------
class InteractionGraph:
    """Multi-behavior interaction graph: per-behavior sorted CSRs plus the touched and auxiliary unions.

    Behaviors are integers in cascade order, 0 = weakest (e.g. view) ... R-1 = target (e.g. buy).
    Build it with `from_arrays` or `from_table`; move it with `to(device)`.
    """

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, n_users: int, n_items: int,
                 behavior_names: Optional[Sequence[str]] = None):
        """Wraps packed storage (use the constructors instead): indptr int64 [R + 2, n_users + 1] with global
        offsets into the int32 `indices`; rows 0..R-1 are the behaviors, R the touched union, R+1 the
        auxiliary union. The storage is validated (offsets, id range, sorted distinct rows): the kernels
        trust it."""
        _check_storage(indptr, indices, _check_count(n_users, "n_users"), _check_count(n_items, "n_items"))
        self._init_storage(indptr, indices, n_users, n_items, behavior_names)

    @classmethod
    def _trusted(cls, indptr, indices, n_users, n_items, behavior_names=None) -> "InteractionGraph":
        """A graph around storage this module built itself (no second validation)."""
        graph = object.__new__(cls)
        graph._init_storage(indptr, indices, n_users, n_items, behavior_names)
        return graph

    def _init_storage(self, indptr, indices, n_users, n_items, behavior_names) -> None:
        self._indptr = indptr
        self._indices = indices
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.n_behaviors = int(indptr.shape[0]) - 2
        names = list(behavior_names) if behavior_names is not None else [str(b) for b in range(self.n_behaviors)]
        if len(names) != self.n_behaviors:
            raise ValueError(f"behavior_names must have {self.n_behaviors} entries, got {len(names)}")
        self.behavior_names = names
        self._degree_cache: Dict[int, torch.Tensor] = {}
        self._max_touched: Optional[int] = None

    def max_touched_len(self) -> int:
        """The largest number of distinct items one user touched (cached): every pool of the complement
        modes keeps at least n_items minus this many items."""
        if self._max_touched is None:
            row = self._indptr[self.n_behaviors]
            self._max_touched = int((row[1:] - row[:-1]).max()) if self.n_users else 0
        return self._max_touched

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, users, items, behaviors, n_users: int, n_items: int,
                    behavior_names: Optional[Sequence[str]] = None, n_behaviors: Optional[int] = None
                    ) -> "InteractionGraph":
        """Builds the graph from parallel id arrays (tensors, NumPy arrays or lists); duplicates are merged.

        behaviors are ints in cascade order (0 = weakest); n_behaviors defaults to len(behavior_names) or
        max(behaviors) + 1. Construction is a C++ counting sort (linear in the interactions).
        """
        users = _as_id_tensor(users, "users")
        items = _as_id_tensor(items, "items")
        behaviors = _as_id_tensor(behaviors, "behaviors")
        if not (users.numel() == items.numel() == behaviors.numel()):
            raise ValueError(f"users, items and behaviors must have the same length, got "
                             f"{users.numel()}, {items.numel()}, {behaviors.numel()}")
        n_users, n_items = _check_count(n_users, "n_users"), _check_count(n_items, "n_items")
        if n_items >= 2 ** 31 - 1 or n_users >= 2 ** 31 - 1:
            raise ValueError("n_users and n_items must be below 2**31 - 1")
        if n_behaviors is None:
            n_behaviors = len(behavior_names) if behavior_names is not None else (
                int(behaviors.max()) + 1 if behaviors.numel() else 1)
        n_behaviors = _check_count(n_behaviors, "n_behaviors")
        if not 1 <= n_behaviors <= 64:
            raise ValueError(f"n_behaviors must lie in [1, 64], got {n_behaviors}")
        _check_range(users, "users", n_users)
        _check_range(items, "items", n_items)
        _check_range(behaviors, "behaviors", n_behaviors)
        indptr, indices = _sampler_ops.build_interaction_graph(users, items, behaviors, n_users, n_items, n_behaviors)
        return cls._trusted(indptr, indices, n_users, n_items, behavior_names)

    @classmethod
    def from_table(cls, df_or_path, behavior_order: Sequence[str], user_col: str = "user", item_col: str = "item",
                   behavior_col: str = "behavior", n_users: Optional[int] = None,
                   n_items: Optional[int] = None) -> "InteractionGraph":
        """Builds the graph from a pandas DataFrame or a TSV path (``user<TAB>item<TAB>behavior[...]``, no
        header, the layout of ../shared/data). behavior_order lists behavior names weakest first; rows whose
        behavior is not in it raise ValueError. n_users / n_items default to max id + 1 (for a path, to the
        meta.json next to it when present)."""
        import pandas as pd
        if isinstance(df_or_path, (str, os.PathLike)):
            path = os.fspath(df_or_path)
            df = pd.read_csv(path, sep="\t", header=None, usecols=[0, 1, 2],
                             names=[user_col, item_col, behavior_col], dtype={0: np.int64, 1: np.int64, 2: str})
            meta = os.path.join(os.path.dirname(path), "meta.json")
            if os.path.exists(meta) and (n_users is None or n_items is None):
                import json
                with open(meta) as f:
                    m = json.load(f)
                n_users = m.get("n_users") if n_users is None else n_users
                n_items = m.get("n_items") if n_items is None else n_items
        else:
            df = df_or_path
        for col in (user_col, item_col, behavior_col):
            if col not in df.columns:
                raise ValueError(f"table has no column {col!r} (columns: {list(df.columns)})")
        order = list(behavior_order)
        lookup = {str(b): k for k, b in enumerate(order)}
        codes = df[behavior_col].astype(str).map(lookup).fillna(-1).to_numpy(dtype=np.int64)
        if (codes < 0).any():
            bad = sorted(set(df[behavior_col].astype(str)[codes < 0].unique()))[:5]
            raise ValueError(f"behavior_order does not contain behaviors {bad} found in column {behavior_col!r}")
        users = torch.from_numpy(df[user_col].to_numpy(dtype=np.int64, copy=True))
        items = torch.from_numpy(df[item_col].to_numpy(dtype=np.int64, copy=True))
        behaviors = torch.from_numpy(codes.astype(np.int64))
        n_users = _inferred_count(users, "user", user_col) if n_users is None else n_users
        n_items = _inferred_count(items, "item", item_col) if n_items is None else n_items
        return cls.from_arrays(users, items, behaviors, n_users, n_items, behavior_names=[str(b) for b in order],
                               n_behaviors=len(order))

    # -- access ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._indices.device

    @property
    def target(self) -> int:
        """Index of the target (strongest) behavior, R - 1."""
        return self.n_behaviors - 1

    def behavior_id(self, behavior: Union[int, str]) -> int:
        """Resolves a behavior name or int to its cascade index (ValueError when unknown)."""
        if isinstance(behavior, str):
            if behavior not in self.behavior_names:
                raise ValueError(f"behavior {behavior!r} is unknown; known: {self.behavior_names}")
            return self.behavior_names.index(behavior)
        b = int(behavior)
        if not 0 <= b < self.n_behaviors:
            raise ValueError(f"behavior must lie in [0, {self.n_behaviors}), got {b}")
        return b

    def _slot(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        ptr = self._indptr[k]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return ptr - lo, self._indices[lo:hi]

    def csr(self, behavior: Union[int, str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(indptr int64 [n_users + 1], indices int32) of the sorted, deduplicated user -> items at behavior."""
        return self._slot(self.behavior_id(behavior))

    def union_csr(self, behaviors: Optional[Sequence[Union[int, str]]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """CSR of the union of the given behaviors (default: all of them, the "touched" items)."""
        if behaviors is None:
            return self._slot(self.n_behaviors)
        ids = sorted({self.behavior_id(b) for b in behaviors})
        if ids == list(range(self.n_behaviors)):
            return self._slot(self.n_behaviors)
        if ids == list(range(self.n_behaviors - 1)):
            return self._slot(self.n_behaviors + 1)
        if len(ids) == 1:
            return self.csr(ids[0])
        parts = [self.positives(b) for b in ids]
        u = torch.cat([p[0] for p in parts]).cpu()
        i = torch.cat([p[1] for p in parts]).cpu()
        ip, ix = _coo_to_csr(u, i, self.n_users, self.n_items)
        return ip.to(self.device), ix.to(self.device)

    def aux_csr(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """CSR of the union of the auxiliary (non-target) behaviors: each user's visited pool."""
        return self._slot(self.n_behaviors + 1)

    def positives(self, behavior: Union[int, str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(users, items) int64 COO of the interactions at behavior, sorted by user then item."""
        ptr, idx = self.csr(behavior)
        users = torch.repeat_interleave(torch.arange(self.n_users, device=ptr.device), ptr.diff())
        return users, idx.to(torch.int64)

    def degree(self, behavior: Union[int, str, None] = None) -> torch.Tensor:
        """Items per user at behavior (None: touched items), int64 [n_users]."""
        k = self.n_behaviors if behavior is None else self.behavior_id(behavior)
        return self._indptr[k].diff()

    def nnz(self, behavior: Union[int, str, None] = None) -> int:
        """Number of (user, item) pairs at behavior (None: touched pairs)."""
        k = self.n_behaviors if behavior is None else self.behavior_id(behavior)
        return int(self._indptr[k, -1] - self._indptr[k, 0])

    def nbytes(self) -> int:
        """Bytes held by the packed CSR storage."""
        return self._indptr.numel() * 8 + self._indices.numel() * self._indices.element_size()

    def to(self, device) -> "InteractionGraph":
        """Copy of the graph on device (the storage is two tensors)."""
        return InteractionGraph._trusted(self._indptr.to(device), self._indices.to(device), self.n_users, self.n_items,
                                         self.behavior_names)

    def item_popularity(self, behavior: Union[int, str, None] = None) -> torch.Tensor:
        """Interaction count of each item at behavior (None: touched), float64 [n_items]; a common weight."""
        k = self.n_behaviors if behavior is None else self.behavior_id(behavior)
        _, idx = self._slot(k)
        return torch.bincount(idx.to(torch.int64).cpu(), minlength=self.n_items).to(torch.float64)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}={self.nnz(b)}" for b, n in enumerate(self.behavior_names))
        return (f"InteractionGraph(n_users={self.n_users}, n_items={self.n_items}, behaviors=[{counts}], "
                f"touched={self.nnz()}, device={self.device})")


# An inferred id space may be this much larger than the rows that imply it (ids need not be dense), and
# always this large; beyond it one garbled id would make the graph build allocate gigabytes.
_INFERRED_SLACK, _INFERRED_MIN = 16, 1 << 24


def _inferred_count(ids: torch.Tensor, what: str, column: str) -> int:
    """max id + 1 of a table without meta.json, refused when one id implies a huge, mostly empty id space."""
    n = int(ids.max()) + 1 if ids.numel() else 0
    if n > max(_INFERRED_MIN, _INFERRED_SLACK * ids.numel()):
        row = int(torch.argmax(ids))
        raise ValueError(f"column {column!r}, row {row}: {what} id {n - 1} implies n_{what}s = {n} for only "
                         f"{ids.numel()} rows; re-index the ids or pass n_{what}s explicitly")
    return n


def _check_storage(indptr, indices, n_users: int, n_items: int) -> None:
    """Validates packed graph storage (O(rows + nnz)): int64 offsets [R + 2, n_users + 1], each slot
    non-decreasing within [0, len(indices)]; int32 ids in [0, n_items), strictly increasing in every row."""
    check_tensor(indptr, "indptr", ndim=2, dtypes=(torch.int64,))
    check_tensor(indices, "indices", ndim=1, dtypes=(torch.int32,), device=indptr.device)
    if indptr.shape[0] < 3 or indptr.shape[1] != n_users + 1:
        raise ValueError(f"indptr must have shape [R + 2 >= 3, n_users + 1 = {n_users + 1}], got {tuple(indptr.shape)}")
    nnz = indices.numel()
    lo, hi = int(indptr.min()), int(indptr.max())
    if lo < 0 or hi > nnz:
        raise ValueError(f"indptr offsets must lie in [0, len(indices) = {nnz}], found [{lo}, {hi}]")
    if bool((indptr[:, 1:] < indptr[:, :-1]).any()):
        raise ValueError("indptr must be non-decreasing within each slot")
    if nnz:
        ids = indices.to(torch.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= n_items:
            raise ValueError(f"indices out of range: ids must lie in [0, {n_items}), found [{int(ids.min())}, "
                             f"{int(ids.max())}]")
        # positions whose id does not exceed the previous one; none may lie strictly inside a row
        bad = torch.zeros(nnz + 1, dtype=torch.int64, device=ids.device)
        bad[2:] = torch.cumsum((ids[1:] <= ids[:-1]).to(torch.int64), 0)
        starts, ends = indptr[:, :-1].reshape(-1), indptr[:, 1:].reshape(-1)
        inner = ends > starts + 1
        if bool(inner.any()) and bool((bad[ends[inner]] != bad[starts[inner] + 1]).any()):
            raise ValueError("indices must be sorted and distinct within every row")


def _as_id_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = tensor_from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
        if x.numel() == 0 and x.is_floating_point():  # an empty list: no ids, no dtype to object to
            x = x.to(torch.int64)
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must hold integer ids, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x.to(torch.int64)


def _check_count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def _check_range(x: torch.Tensor, name: str, n: int) -> None:
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} out of range: ids must lie in [0, {n}), found [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------------------
# popularity: Walker / Vose alias table
# ----------------------------------------------------------------------------------------------------------
class AliasTable:
    """Vose alias table over item weights, built once, for O(1) popularity draws.

    `threshold` (int64, values in [0, 2^32]) and `alias` (int32) drive the draw: bin k uniform, then k if a
    32-bit draw is below threshold[k], else alias[k]. `weights_q` holds the weights quantized to integers
    (sum < 2^62) with `prefix` their cumulative sums; the exact fallback for users with a small allowed set
    samples from these integers, so both paths follow the given weights to within ~1e-9 relative.
    """

    def __init__(self, weights):
        w = torch.as_tensor(weights).detach().cpu().to(torch.float64)
        if w.dim() != 1:
            raise ValueError(f"popularity must be 1-D (one weight per item), got shape {tuple(w.shape)}")
        if w.numel() == 0:
            raise ValueError("popularity must be non-empty")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("popularity contains NaN or inf")
        if bool((w < 0).any()):
            raise ValueError("popularity weights must be >= 0")
        if float(w.max()) <= 0:
            raise ValueError("popularity weights must not all be 0")
        n = w.numel()
        # Rescale by a power of two (exact) so that the largest weight lies in [0.5, 1): weights all below
        # 1e-300 or summing past 1e308 then quantize like any others (the scale below neither overflows
        # nor turns every weight into 0), and ordinary weights quantize to the same integers as unscaled.
        wn = np.ldexp(w.numpy(), -int(np.frexp(float(w.max()))[1]))
        scale = float(2 ** 62) / (float(wn.sum()) * (1 + 1e-9))
        scale = min(scale, float(2 ** 40) / float(wn.max()))
        self.weights_q = torch.from_numpy(np.floor(wn * scale).astype(np.int64))
        # items whose weight quantizes to 0 are never drawn on either path
        prefix = torch.zeros(n + 1, dtype=torch.int64)
        prefix[1:] = torch.cumsum(self.weights_q, 0)
        self.prefix = prefix
        self.n = n
        self.threshold, self.alias = _build_alias(self.weights_q.numpy().astype(np.float64))

    def to(self, device) -> "AliasTable":
        out = object.__new__(AliasTable)
        out.n = self.n
        for k in ("weights_q", "prefix", "threshold", "alias"):
            setattr(out, k, getattr(self, k).to(device))
        return out


def _build_alias(w: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    n = w.size
    p = w * (n / w.sum())
    alias = np.arange(n, dtype=np.int32)
    prob = np.ones(n, dtype=np.float64)
    small = [i for i in range(n) if p[i] < 1.0]
    large = [i for i in range(n) if p[i] >= 1.0]
    p = p.copy()
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s] = p[s]
        alias[s] = g
        p[g] = (p[g] + p[s]) - 1.0
        (small if p[g] < 1.0 else large).append(g)
    for i in small + large:
        prob[i] = 1.0
    thr = np.minimum(np.round(prob * 2.0 ** 32), 2.0 ** 32).astype(np.int64)
    # a zero-weight item must never be kept by its own bin
    thr[w == 0] = 0
    return torch.from_numpy(thr), torch.from_numpy(alias)


# ----------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------
def _level_table(graph: InteractionGraph, level_probs, behavior_scalar: Optional[int]) -> torch.Tensor:
    """Validates level_probs and returns the [R, R] probability table (float64)."""
    R = graph.n_behaviors
    if level_probs is None:
        raise ValueError("level_probs is required for mode='cascade'")
    p = torch.as_tensor(level_probs, dtype=torch.float64).cpu()
    if p.dim() == 1:
        if behavior_scalar is None:
            raise ValueError("level_probs must be a [n_behaviors, n_behaviors] table when behavior varies per row")
        r = behavior_scalar
        if p.numel() != r + 1:
            raise ValueError(f"level_probs for behavior {r} must have {r + 1} entries "
                             f"(levels 0..{r - 1}, then never-touched), got {p.numel()}")
        table = torch.zeros(R, R, dtype=torch.float64)
        table[:, R - 1] = 1.0
        table[r, :r] = p[:r]
        table[r, r:] = 0
        table[r, R - 1] = p[r]
        p_check = p
    elif p.dim() == 2:
        if tuple(p.shape) != (R, R):
            raise ValueError(f"level_probs table must have shape ({R}, {R}), got {tuple(p.shape)}")
        table = p.clone()
        for r in range(R):
            if bool((table[r, r:R - 1] != 0).any()):
                raise ValueError(f"level_probs[{r}] puts mass on levels >= {r}; only levels below the "
                                 f"positive's behavior (and the last column, never-touched) may be non-zero")
        p_check = table
    else:
        raise ValueError(f"level_probs must be 1-D or 2-D, got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p_check).all()):
        raise ValueError("level_probs contains NaN or inf")
    if bool((p_check < 0).any()):
        raise ValueError("level_probs must be non-negative")
    sums = table.sum(1)
    if bool(((sums - 1).abs() > 1e-6).any()):
        raise ValueError(f"level_probs must sum to 1 per behavior, got sums {sums.tolist()}")
    return table


def _never_touched_table(R: int) -> torch.Tensor:
    """The level table of the non-cascade modes: every behavior draws from never-touched items."""
    table = torch.zeros(R, R, dtype=torch.float64)
    table[:, R - 1] = 1.0
    return table


@functools.lru_cache(maxsize=None)
def _never_touched_thresholds(R: int, device: str) -> torch.Tensor:
    """Thresholds of `_never_touched_table(R)` on `device`, built once (a dozen small ops per call was a
    fifth of a 20k-row sampling call)."""
    return _level_thresholds(_never_touched_table(R)).to(device)


def _level_thresholds(table: torch.Tensor) -> torch.Tensor:
    """Cumulative integer thresholds (out of 2^32) per behavior: pick the first level whose threshold
    exceeds a 32-bit draw. Integer compares keep CPU and GPU bit-identical."""
    cum = torch.cumsum(table, 1)
    thr = torch.round(cum * 2.0 ** 32).to(torch.int64).clamp_(0, 2 ** 32)
    # a zero-probability level must never be picked: its threshold equals the previous one
    zero = table == 0
    prev = torch.cat([torch.zeros_like(thr[:, :1]), thr[:, :-1]], 1)
    thr = torch.where(zero, prev, thr)
    last = (table > 0).to(torch.int64) * torch.arange(table.shape[1]).unsqueeze(0)
    thr[torch.arange(table.shape[0]), last.argmax(1)] = 2 ** 32
    return thr.contiguous()


def sample_negatives(graph: InteractionGraph, users, num_neg: int, *, behavior=None, mode: str = "exclusive",
                     level_probs=None, replacement: bool = True, popularity=None, seed: int = 0, offset: int = 0,
                     on_empty: str = "error") -> torch.Tensor:
    """Draws `num_neg` negatives for each row (user, positive behavior); int64 [len(users), num_neg].

    behavior: an int/name for every row, or an int64 tensor with one behavior per row (default: target).
    mode: one of MODES (see the module docstring). level_probs (cascade only): for a single behavior r a
    sequence of r + 1 probabilities [level 0, ..., level r-1, never-touched]; for per-row behaviors an
    [R, R] table whose row r holds levels 0..r-1 in columns 0..r-1 and never-touched in column R-1.
    replacement=False: the negatives of a row are distinct (a row is a random ordering of a sample drawn
    without replacement). popularity: item weights (tensor [n_items]) or an `AliasTable`; draws follow the
    weights restricted to the allowed pool and renormalized. seed/offset: with the row index they key the
    Philox RNG, so the output is a pure function of (graph, arguments). on_empty: "error" raises ValueError
    when a row's allowed set is empty (or smaller than num_neg without replacement); "sentinel" writes -1
    in the draws that have no item.
    """
    if not isinstance(graph, InteractionGraph):
        raise TypeError(f"graph must be an InteractionGraph, got {type(graph).__name__}")
    if mode not in _MODE_IDS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(num_neg, bool) or not isinstance(num_neg, (int, np.integer)) or int(num_neg) < 1:
        raise ValueError(f"num_neg must be an int >= 1, got {num_neg!r}")
    num_neg = int(num_neg)
    if on_empty not in ("error", "sentinel"):
        raise ValueError(f"on_empty must be 'error' or 'sentinel', got {on_empty!r}")
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2 ** 63:
            raise ValueError(f"{name} must be an int in [0, 2**63), got {v!r}")
    device = graph.device
    users = _as_id_tensor(users if not isinstance(users, torch.Tensor) else users.cpu(), "users")
    _check_range(users, "users", graph.n_users)
    n = users.numel()
    R = graph.n_behaviors
    behavior_scalar: Optional[int] = None
    if behavior is None:
        behavior_scalar = R - 1
        behaviors = torch.full((n,), behavior_scalar, dtype=torch.int64)
    elif isinstance(behavior, (int, np.integer, str)) and not isinstance(behavior, bool):
        behavior_scalar = graph.behavior_id(behavior)
        behaviors = torch.full((n,), behavior_scalar, dtype=torch.int64)
    else:
        behaviors = _as_id_tensor(behavior if not isinstance(behavior, torch.Tensor) else behavior.cpu(), "behavior")
        if behaviors.numel() != n:
            raise ValueError(f"behavior must have one entry per row ({n}), got {behaviors.numel()}")
        _check_range(behaviors, "behavior", R)
    if mode == "cascade":
        table = _level_table(graph, level_probs, behavior_scalar)
    else:
        if level_probs is not None:
            raise ValueError(f"level_probs is only used by mode='cascade', got mode={mode!r}")
        table = _never_touched_table(R)
    if mode == "visited" and R < 2:
        raise ValueError("mode='visited' needs at least one auxiliary behavior")
    alias = None
    if popularity is not None:
        if mode == "visited":
            raise ValueError("popularity is not supported with mode='visited' (the pool is the user's own items)")
        alias = popularity if isinstance(popularity, AliasTable) else AliasTable(popularity)
        if alias.n != graph.n_items:
            raise ValueError(f"popularity must have n_items = {graph.n_items} weights, got {alias.n}")

    thr = _level_thresholds(table).to(device) if mode == "cascade" else _never_touched_thresholds(R, str(device))
    if alias is not None:
        a = alias.to(device)
        pop = (a.threshold, a.alias, a.weights_q, a.prefix)
    else:
        empty64 = torch.empty(0, dtype=torch.int64, device=device)
        pop = (empty64, torch.empty(0, dtype=torch.int32, device=device), empty64, empty64)
    out = _sampler_ops.sample_negatives(
        graph._indptr, graph._indices, users.to(device).contiguous(), behaviors.to(device).contiguous(), thr, pop,
        graph.n_items, num_neg, _MODE_IDS[mode], bool(replacement), int(seed), int(offset))
    # A row can lack allowed items only in the visited mode, with zero popularity weights, or when a user
    # touched nearly every item; otherwise the scan of the output is skipped.
    can_run_short = (mode == "visited" or alias is not None
                     or graph.max_touched_len() + (1 if replacement else num_neg) > graph.n_items)
    if on_empty == "error" and n and can_run_short and int(out.min()) < 0:
        row = int(torch.nonzero((out < 0).any(1))[0, 0])
        raise ValueError(
            f"users[{row}] = {int(users[row])} (behavior {int(behaviors[row])}) has "
            f"{'an empty' if bool((out[row] < 0).all()) else 'a too small'} allowed set for mode={mode!r}"
            f"{'' if replacement else ' without replacement'}; pass on_empty='sentinel' to get -1 instead")
    return out


def sample_sequence_negatives(seqs: torch.Tensor, n_items: int, num_neg: int, *, pad: int = -1,
                              item_domain: Optional[torch.Tensor] = None, seq_domain: Optional[torch.Tensor] = None,
                              seed: int = 0, offset: int = 0, on_empty: str = "error") -> torch.Tensor:
    """Negatives for every position of a padded batch of sequences (SASRec / SyNCRec); int64 [B, L, num_neg].

    seqs: int [B, L] item ids in [0, n_items), `pad` marks padding (default -1; with pad=0 item 0 is never
    drawn). A negative for row b is never an item of seqs[b]. With item_domain (int [n_items], domain of
    each item) negatives are restricted to one domain per position: seq_domain[b, t] when given, else the
    domain of seqs[b, t]. Padded positions get `pad`. Draws are with replacement, keyed by
    (seed, offset, b * L + t). on_empty as in `sample_negatives`.
    """
    check_tensor(seqs, "seqs", ndim=2, dtypes=_INT_DTYPES)
    n_items = _check_count(n_items, "n_items")
    if n_items >= 2 ** 31:
        raise ValueError(f"n_items must be below 2**31 (item ids are int32 in the kernel), got {n_items}")
    if isinstance(num_neg, bool) or not isinstance(num_neg, (int, np.integer)) or int(num_neg) < 1:
        raise ValueError(f"num_neg must be an int >= 1, got {num_neg!r}")
    if on_empty not in ("error", "sentinel"):
        raise ValueError(f"on_empty must be 'error' or 'sentinel', got {on_empty!r}")
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2 ** 63:
            raise ValueError(f"{name} must be an int in [0, 2**63), got {v!r}")
    device = seqs.device
    s = seqs.to(torch.int64)
    valid = s != pad
    if bool(valid.any()):
        vals = s[valid]
        lo, hi = int(vals.min()), int(vals.max())
        if lo < 0 or hi >= n_items:
            raise ValueError(f"seqs out of range: non-pad ids must lie in [0, {n_items}), found [{lo}, {hi}]")
    B, L = s.shape
    n_domains = 0
    if item_domain is not None:
        check_tensor(item_domain, "item_domain", ndim=1, dtypes=_INT_DTYPES)
        if item_domain.numel() != n_items:
            raise ValueError(f"item_domain must have n_items = {n_items} entries, got {item_domain.numel()}")
        item_domain = item_domain.to(device=device, dtype=torch.int64)
        if item_domain.numel() and int(item_domain.min()) < 0:
            raise ValueError("item_domain must hold non-negative domain ids")
        n_domains = int(item_domain.max()) + 1 if item_domain.numel() else 0
        if seq_domain is not None:
            check_tensor(seq_domain, "seq_domain", ndim=2, dtypes=_INT_DTYPES)
            if tuple(seq_domain.shape) != (B, L):
                raise ValueError(f"seq_domain must have the shape of seqs {(B, L)}, got {tuple(seq_domain.shape)}")
            pos_dom = seq_domain.to(device=device, dtype=torch.int64)
            bad = valid & ((pos_dom < 0) | (pos_dom >= n_domains))
            if bool(bad.any()):
                raise ValueError(f"seq_domain out of range: domains must lie in [0, {n_domains}) at non-pad positions")
        else:
            pos_dom = torch.where(valid, item_domain[s.clamp(0, max(n_items - 1, 0))], torch.zeros_like(s))
        pos_dom = torch.where(valid, pos_dom, torch.full_like(pos_dom, -1))
    elif seq_domain is not None:
        raise ValueError("seq_domain needs item_domain")
    else:
        pos_dom = torch.where(valid, torch.zeros_like(s), torch.full_like(s, -1))

    # Per row: distinct sorted items of the sequence (plus the pad id when it is an item id), then a
    # sentinel n_items; the kernel reads each row up to its length.
    big = torch.full_like(s, n_items)
    excl = torch.where(valid, s, big)
    if 0 <= pad < n_items:
        excl = torch.cat([excl, torch.full((B, 1), pad, dtype=torch.int64, device=device)], 1)
    excl, _ = torch.sort(excl, 1)
    dup = torch.zeros_like(excl, dtype=torch.bool)
    dup[:, 1:] = excl[:, 1:] == excl[:, :-1]
    excl = torch.where(dup, torch.full_like(excl, n_items), excl)
    excl, _ = torch.sort(excl, 1)
    excl_len = (excl < n_items).sum(1)
    if item_domain is not None:
        order = torch.argsort(item_domain, stable=True)
        dom_indptr = indptr_from_rows(item_domain, n_domains)
        dom_items = order.to(torch.int32)
    else:
        dom_indptr = torch.empty(0, dtype=torch.int64, device=device)
        dom_items = torch.empty(0, dtype=torch.int32, device=device)
    out = _sampler_ops.sample_sequence_negatives(
        excl.to(torch.int32).contiguous(), excl_len.contiguous(), pos_dom.contiguous(), dom_indptr, dom_items.contiguous(),
        n_items, int(num_neg), int(pad), int(seed), int(offset))
    if on_empty == "error":
        hole = valid & (out < 0).any(-1) if pad >= 0 else valid & (out == -1).any(-1)
        if bool(hole.any()):
            b, t = (int(v) for v in torch.nonzero(hole)[0])
            raise ValueError(f"seqs[{b}, {t}] has no allowed negative (every candidate item is in the sequence"
                             f"{' or outside its domain' if item_domain is not None else ''}); "
                             f"pass on_empty='sentinel' to get -1 instead")
    return out
