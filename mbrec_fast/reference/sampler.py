"""Pure NumPy reference of the negative samplers: the definition of every mode, one Python loop per row.

Slow and simple on purpose. The tests use `allowed_items` to check every negative exhaustively and
`sample_negatives_reference` / `expected_distribution` for the distribution tests. The fused kernels draw
different random numbers (Philox), so they agree with this module in distribution, not bit for bit; the
kernels' random stream itself is defined bit for bit by `philox4x32_10` / `philox_stream_words` below.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["row_items", "allowed_items", "cascade_pools", "expected_distribution",
           "sample_negatives_reference", "sample_sequence_negatives_reference", "philox4x32_10",
           "philox_stream_words"]

MODES = ("exclusive", "strict", "cascade", "visited", "unvisited")

_M32 = 0xFFFFFFFF


def philox4x32_10(ctr: Sequence[int], key: Sequence[int]) -> List[int]:
    """Philox-4x32-10 (Salmon et al., SC'11) of a 4-word counter under a 2-word key, in Python integers."""
    c, k0, k1 = [int(x) & _M32 for x in ctr], int(key[0]) & _M32, int(key[1]) & _M32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & _M32, (p0 >> 32) ^ c[3] ^ k1, p0 & _M32]
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c


def philox_stream_words(seed: int, offset: int, index: int, n_words: int) -> List[int]:
    """The first n_words 32-bit words of the kernels' stream (seed, offset, index) (csrc/common/philox.h):
    key (seed low, seed high ^ offset high * 0x9E3779B9), counter (index low, index high, block, offset low)."""
    key = (seed & _M32, ((seed >> 32) ^ (((offset >> 32) * 0x9E3779B9) & _M32)) & _M32)
    words: List[int] = []
    block = 0
    while len(words) < n_words:
        words += philox4x32_10((index & _M32, index >> 32, block, offset & _M32), key)
        block += 1
    return words[:n_words]


def row_items(indptr: torch.Tensor, indices: torch.Tensor, u: int) -> np.ndarray:
    """Sorted item ids of row u of a CSR (as a NumPy array)."""
    ip = indptr.cpu()
    return indices.cpu()[int(ip[u]):int(ip[u + 1])].numpy().astype(np.int64)


def _sets(graph, u: int, r: int) -> Dict[str, np.ndarray]:
    at_r = row_items(*graph.csr(r), u)
    touched = row_items(*graph.union_csr(), u)
    aux = row_items(*graph.aux_csr(), u)
    return {"at_r": at_r, "touched": touched, "aux": aux}


def allowed_items(graph, u: int, r: int, mode: str) -> np.ndarray:
    """The sorted set a negative of user u for a positive at behavior r may come from.

    exclusive: items u did not do at r; strict: items u never touched; visited: items u touched at an
    auxiliary behavior but not at r; unvisited: items u touched neither at an auxiliary behavior nor at r;
    cascade: the union of every pool the mixture can draw from (lower levels minus r, and untouched items),
    which equals the exclusive set.
    """
    n = graph.n_items
    s = _sets(graph, u, r)
    everything = np.arange(n, dtype=np.int64)
    if mode in ("exclusive", "cascade"):
        return np.setdiff1d(everything, s["at_r"])
    if mode == "strict":
        return np.setdiff1d(everything, s["touched"])
    if mode == "visited":
        return np.setdiff1d(s["aux"], s["at_r"])
    if mode == "unvisited":
        return np.setdiff1d(everything, np.union1d(s["aux"], s["at_r"]))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def cascade_pools(graph, u: int, r: int) -> List[np.ndarray]:
    """Pools of the cascade mixture for (u, r): [level 0 minus r, ..., level r-1 minus r, untouched]."""
    n = graph.n_items
    at_r = row_items(*graph.csr(r), u)
    pools = [np.setdiff1d(row_items(*graph.csr(lv), u), at_r) for lv in range(r)]
    pools.append(np.setdiff1d(np.arange(n, dtype=np.int64), row_items(*graph.union_csr(), u)))
    return pools


def expected_distribution(graph, u: int, r: int, mode: str, level_probs: Optional[np.ndarray] = None,
                          popularity: Optional[np.ndarray] = None) -> np.ndarray:
    """Probability of each item (length n_items) for one with-replacement draw of (u, r) in `mode`.

    Follows the documented semantics: uniform (or popularity-weighted, renormalized) over the allowed set;
    for cascade, level l with probability level_probs[l], an empty pool falling back to the untouched pool,
    then to the exclusive set.
    """
    n = graph.n_items
    p = np.zeros(n, dtype=np.float64)

    def spread(pool: np.ndarray, mass: float, weighted: bool) -> bool:
        if pool.size == 0:
            return False
        if weighted and popularity is not None:
            w = popularity[pool].astype(np.float64)
            if w.sum() <= 0:
                return False
            p[pool] += mass * w / w.sum()
        else:
            p[pool] += mass / pool.size
        return True

    if mode != "cascade":
        spread(allowed_items(graph, u, r, mode), 1.0, True)
        return p
    pools = cascade_pools(graph, u, r)
    excl = allowed_items(graph, u, r, "exclusive")
    for lv, mass in enumerate(level_probs):
        if mass == 0:
            continue
        is_untouched = lv == len(pools) - 1
        if spread(pools[lv], mass, is_untouched):
            continue
        if not is_untouched and spread(pools[-1], mass, True):
            continue
        spread(excl, mass, True)
    return p


def sample_negatives_reference(graph, users, behaviors, num_neg: int, mode: str = "exclusive",
                               level_probs: Optional[np.ndarray] = None, replacement: bool = True,
                               popularity: Optional[np.ndarray] = None, seed: int = 0) -> torch.Tensor:
    """Row-by-row sampler with NumPy's generator; -1 marks draws from an empty allowed set.

    level_probs, when given, is the [R, R] table of the public API (row r: levels 0..r-1, untouched last).
    Without replacement each draw removes its item from every pool of the row; the row is then shuffled.
    """
    rng = np.random.default_rng(seed)
    users = torch.as_tensor(users).cpu().numpy().astype(np.int64)
    behaviors = np.broadcast_to(torch.as_tensor(behaviors).cpu().numpy().astype(np.int64), users.shape)
    out = np.full((users.size, num_neg), -1, dtype=np.int64)
    pop = None if popularity is None else np.asarray(popularity, dtype=np.float64)
    for row, (u, r) in enumerate(zip(users, behaviors)):
        u, r = int(u), int(r)
        taken: set = set()

        def draw(pool: np.ndarray, weighted: bool) -> int:
            if taken:
                pool = pool[~np.isin(pool, np.fromiter(taken, dtype=np.int64))]
            if pool.size == 0:
                return -1
            if weighted and pop is not None:
                w = pop[pool]
                if w.sum() <= 0:
                    return -1
                return int(rng.choice(pool, p=w / w.sum()))
            return int(pool[rng.integers(pool.size)])

        if mode == "cascade":
            probs = np.asarray(level_probs, dtype=np.float64)[r]
            levels = list(range(r)) + [graph.n_behaviors - 1]
            pools = cascade_pools(graph, u, r)
            excl = allowed_items(graph, u, r, "exclusive")
        else:
            allowed = allowed_items(graph, u, r, mode)
        for k in range(num_neg):
            if mode == "cascade":
                lv = int(rng.choice(len(levels), p=probs[levels] / probs[levels].sum()))
                is_untouched = lv == len(levels) - 1
                item = draw(pools[lv], is_untouched)
                if item < 0 and not is_untouched:
                    item = draw(pools[-1], True)
                if item < 0:
                    item = draw(excl, True)
            else:
                item = draw(allowed, True)
            out[row, k] = item
            if not replacement and item >= 0:
                taken.add(item)
        if not replacement:
            valid = out[row][out[row] >= 0]
            out[row, :valid.size] = rng.permutation(valid)
    return torch.from_numpy(out)


def sample_sequence_negatives_reference(seqs: torch.Tensor, n_items: int, num_neg: int, pad: int = -1,
                                        item_domain: Optional[torch.Tensor] = None,
                                        seq_domain: Optional[torch.Tensor] = None, seed: int = 0) -> torch.Tensor:
    """For each non-pad position: uniform negatives not in that row's sequence (and in the position's domain)."""
    rng = np.random.default_rng(seed)
    s = seqs.cpu().numpy().astype(np.int64)
    B, L = s.shape
    dom_of_item = None if item_domain is None else item_domain.cpu().numpy().astype(np.int64)
    out = np.full((B, L, num_neg), pad, dtype=np.int64)
    everything = np.arange(n_items, dtype=np.int64)
    for b in range(B):
        seen = np.unique(s[b][s[b] != pad])
        base = np.setdiff1d(everything, np.union1d(seen, [pad] if 0 <= pad < n_items else []))
        for t in range(L):
            if s[b, t] == pad:
                continue
            pool = base
            if dom_of_item is not None:
                d = int(seq_domain[b, t]) if seq_domain is not None else int(dom_of_item[s[b, t]])
                pool = base[dom_of_item[base] == d]
            if pool.size == 0:
                out[b, t] = -1
                continue
            out[b, t] = pool[rng.integers(pool.size, size=num_neg)]
    return torch.from_numpy(out)
