"""The CSR toolkit: one home for the (indptr, indices) pairs that the sampler, the data loaders and the
models pass around.

A `Csr` is a pair (indptr int64 [n_rows + 1], indices [nnz]) whose rows hold sorted, distinct column ids.
Every CSR of the package is built here from COO pairs by the same idiom: sort and de-duplicate the keys
row * n_cols + col, then count the rows. The argument checks of a caller-given CSR stay in
`mbrec_fast._checks` (`check_csr`, and `check_finite` for float tensors).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch

__all__ = ["Csr", "coo_to_csr", "build_csr", "csr_to_coo", "csr_rows", "indptr_from_rows", "union_csr",
           "csr_contains", "build_packed_csr"]

Csr = Tuple[torch.Tensor, torch.Tensor]


def coo_to_csr(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int,
               index_dtype: torch.dtype = torch.int32) -> Csr:
    """Sorted, de-duplicated CSR (indptr int64 [n_rows + 1], indices of `index_dtype`) of (row, col)
    pairs given as int64 tensors."""
    key = torch.unique(rows * n_cols + cols)
    r = torch.div(key, n_cols, rounding_mode="floor") if n_cols else key
    return indptr_from_rows(r, n_rows), (key - r * n_cols).to(index_dtype)


def indptr_from_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """int64 offsets [n_rows + 1] (on the device of rows) of a CSR whose entries have row ids `rows` (int64, in
    [0, n_rows), sorted by row when the offsets are to index them)."""
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=indptr[1:])
    return indptr


def build_csr(rows, cols, n_rows: int, n_cols: int) -> Csr:
    """`coo_to_csr` of (row, col) pairs given as NumPy arrays (or anything np.asarray takes), with int64
    indices."""
    return coo_to_csr(tensor_from_numpy(np.asarray(rows, dtype=np.int64)),
                      tensor_from_numpy(np.asarray(cols, dtype=np.int64)), n_rows, n_cols, index_dtype=torch.int64)


def tensor_from_numpy(arr: np.ndarray) -> torch.Tensor:
    """`torch.from_numpy` of `arr` made C-contiguous, sharing its memory when it is writable; a read-only array (a
    cached or memory-mapped data file, a pandas view) is copied: torch cannot share it (and would warn)."""
    arr = np.ascontiguousarray(arr)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def csr_rows(csr: Csr) -> torch.Tensor:
    """Row id of every entry, int64 [nnz] (on the device of indptr)."""
    indptr = csr[0]
    return torch.repeat_interleave(torch.arange(indptr.numel() - 1, device=indptr.device), indptr.diff())


def csr_to_coo(csr: Csr) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int64 COO of a CSR, sorted by row then column: e.g. the positives of a behavior."""
    return csr_rows(csr), csr[1].long()


def union_csr(csrs: Sequence[Csr], n_rows: int, n_cols: int, index_dtype: torch.dtype = torch.int64) -> Csr:
    """CSR of the union of the entries of several CSRs of the same shape (computed on the CPU)."""
    if not csrs:
        empty = torch.zeros(0, dtype=torch.int64)
        return coo_to_csr(empty, empty, n_rows, n_cols, index_dtype)
    rows = torch.cat([csr_rows(tuple(t.cpu() for t in c)) for c in csrs])
    cols = torch.cat([c[1].cpu().long() for c in csrs])
    return coo_to_csr(rows, cols, n_rows, n_cols, index_dtype)


def csr_contains(csr: Csr, rows, cols, n_cols: int) -> np.ndarray:
    """Bool mask (NumPy): is (rows[j], cols[j]) an entry of the CSR? (binary search on the sorted keys)."""
    keys = csr_rows(csr).numpy() * n_cols + csr[1].numpy()
    q = np.asarray(rows, dtype=np.int64) * n_cols + np.asarray(cols, dtype=np.int64)
    if keys.size == 0:
        return np.zeros(q.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(keys, q), keys.size - 1)
    return keys[pos] == q


def build_packed_csr(users, items, behaviors, n_users: int, n_items: int, n_behaviors: int):
    """The packed storage of `InteractionGraph` in PyTorch (the C++ op `build_interaction_graph` builds the
    same): one CSR per behavior, then the union of all behaviors and the union of the auxiliary ones,
    stacked as indptr int64 [n_behaviors + 2, n_users + 1] with global offsets into int32 `indices`."""
    ptrs, idxs, base = [], [], 0
    groups = [behaviors == b for b in range(n_behaviors)]
    masks = groups + [torch.ones_like(behaviors, dtype=torch.bool), behaviors < n_behaviors - 1]
    for m in masks:
        ip, ix = coo_to_csr(users[m], items[m], n_users, n_items)
        ptrs.append(ip + base)
        idxs.append(ix)
        base += ix.numel()
    return torch.stack(ptrs), torch.cat(idxs)
