"""Argument checks shared by the public wrappers. Each raises ValueError/TypeError naming the argument."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .csr import Csr


def check_tensor(x, name: str, *, ndim: Optional[int] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Checks type, rank, dtype and device of one tensor argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    return x


_FINITE_CHUNK = 1 << 20


def check_finite(x: torch.Tensor, name: str) -> None:
    """Rejects NaN/inf values without temporaries the size of `x` (a 1M x 64 item table must not cost
    another copy of itself): a NaN or inf makes the sum non-finite, so a finite sum proves every value
    finite; only when the sum is not finite (a NaN/inf, or finite values overflowing) are the values
    checked exactly, chunk by chunk."""
    if not x.is_floating_point() or not x.numel():
        return
    if bool(torch.isfinite(x.sum())):
        return
    flat = x.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        if not bool(torch.isfinite(flat[start:start + _FINITE_CHUNK]).all()):
            raise ValueError(f"{name} contains NaN or inf")


def check_csr(csr, name: str, n_rows: int, n_cols: int, device: Optional[torch.device] = None) -> Csr:
    """Validates a CSR pair (indptr[n_rows+1], indices[nnz]) of int64 with sorted, in-range column ids.

    Duplicate column ids inside a row are allowed (they are treated as one). Returns the pair,
    contiguous.
    """
    if not isinstance(csr, (tuple, list)) or len(csr) != 2:
        raise TypeError(f"{name} must be a CSR pair (indptr, indices)")
    indptr, indices = csr
    check_tensor(indptr, f"{name}.indptr", ndim=1, dtypes=(torch.int64, torch.int32), device=device)
    check_tensor(indices, f"{name}.indices", ndim=1, dtypes=(torch.int64, torch.int32), device=device)
    if indptr.numel() != n_rows + 1:
        raise ValueError(f"{name}.indptr must have {n_rows + 1} entries (rows + 1), got {indptr.numel()}")
    indptr = indptr.to(torch.int64).contiguous()
    indices = indices.to(torch.int64).contiguous()
    if int(indptr[0]) != 0:
        raise ValueError(f"{name}.indptr must start at 0, got {int(indptr[0])}")
    if int(indptr[-1]) != indices.numel():
        raise ValueError(f"{name}.indptr[-1] = {int(indptr[-1])} must equal len({name}.indices) = {indices.numel()}")
    if n_rows and bool((indptr[1:] < indptr[:-1]).any()):
        raise ValueError(f"{name}.indptr must be non-decreasing")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n_cols:
            raise ValueError(f"{name}.indices out of range: ids must lie in [0, {n_cols}), found [{lo}, {hi}]")
        # Sorted within each row: a descent is only allowed where a new row starts.
        if indices.numel() > 1:
            descents = torch.nonzero(indices[1:] < indices[:-1]).flatten() + 1
            if descents.numel():
                starts = torch.zeros(indices.numel() + 1, dtype=torch.bool, device=indices.device)
                starts[indptr[:-1]] = True
                if not bool(starts[descents].all()):
                    raise ValueError(f"{name}.indices must be sorted within each row")
    return indptr, indices


# ---------------------------------------------------------------------------------------------- data files
class data_file:
    """Context manager around the reading of one data file: decoding, parsing and truncation errors come out
    as one ValueError naming the file (a bare UnicodeDecodeError, JSONDecodeError or StopIteration does not
    say which file of a data set was bad)."""

    def __init__(self, path):
        self.path = str(path)
        self.line: Optional[int] = None  # a reader may set the line it is on; errors then name it

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (OSError, MemoryError, KeyboardInterrupt)):
            return False
        import json
        where = self.path if self.line is None else f"{self.path}, line {self.line}"
        if isinstance(exc, UnicodeDecodeError):
            raise ValueError(f"{self.path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
        if isinstance(exc, json.JSONDecodeError):
            raise ValueError(f"{self.path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
        if isinstance(exc, StopIteration):
            raise ValueError(f"{self.path}: the file is empty") from exc
        if isinstance(exc, KeyError):
            raise ValueError(f"{where}: missing entry {exc}") from exc
        if isinstance(exc, (ValueError, IndexError)) and self.path not in str(exc):
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{where}: {text}") from exc
        return False


def reads_data_file(default_name: str):
    """Decorator of a loader whose first argument is a path (None: `default_name`, the bundled sample): its
    parsing errors come out as ValueError naming the file (see `data_file`)."""
    import functools

    def wrap(loader):
        @functools.wraps(loader)
        def run(path=None, *args, **kwargs):
            with data_file(default_name if path is None else path):
                return loader(path, *args, **kwargs)
        return run
    return wrap


def check_id_column(values, n: Optional[int], path, column: str, *, first_line: int = 1):
    """Integer ids of one column of a data file as an int64 NumPy array, each in [0, n) (n None: only >= 0).

    A missing, non-integer or out-of-range value raises ValueError naming the file, the line (row i is line
    first_line + i) and the value: an id past the end would otherwise wrap into a neighbouring row of a
    `row * n + col` key and give silently wrong numbers."""
    import numpy as np
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        import pandas as pd
        num = pd.to_numeric(pd.Series(arr), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(num) | (num != np.floor(num)) | (np.abs(num) >= 2.0 ** 62)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}, line {first_line + i}: {column} must be an integer id, got {arr[i]!r}")
        arr = num.astype(np.int64)
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        bad = (arr < 0) if n is None else ((arr < 0) | (arr >= n))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            span = "must be >= 0" if n is None else f"must lie in [0, {n})"
            raise ValueError(f"{path}, line {first_line + i}: {column} {int(arr[i])} out of range ({span})")
    return arr
