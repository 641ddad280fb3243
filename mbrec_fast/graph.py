"""Sparse x dense products for graph propagation (LightGCN-style models, MEMBER's experts).

`csr_spmm(crow, col, val, x, transpose)` is y = A x for a sparse A in CSR form and a dense x [n, d], with a
backward to x (dx = A^T dy through the transpose given, which graphs that propagate both ways already hold).
Each output element is one fused multiply-add per nonzero in storage order, so a value is the same on every
thread count, instruction set (AVX-512, AVX2, portable) and device. On CPU it runs the package's SIMD row kernel,
several times the rate of `torch.sparse.mm` on the models' graphs (benchmarks/test_bench_graph.py).

`row_l2_normalize(x)` is F.normalize(x, dim=-1) as one pass each way (norm and scaling fused; backward from the
saved output and norms), for the per-layer normalisation of propagated embeddings and contrastive losses; the same
bits on every thread count and device, several times F.normalize's forward + backward on the CPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _graph_ops  # noqa: F401  (fakes and autograd of torch.ops.mbrec_fast's graph ops)
from .csr import csr_rows, indptr_from_rows

__all__ = ["CsrMatrix", "csr_spmm", "csr_transpose", "row_l2_normalize"]

#: (crow [rows + 1], col [nnz], val [nnz]): int64 offsets and column indices, values of x's dtype
CsrMatrix = Tuple[Tensor, Tensor, Tensor]


def csr_transpose(a: CsrMatrix, n_cols: int) -> CsrMatrix:
    """A^T in CSR for A = (crow, col, val) with `n_cols` columns (stable: within a row of A^T the entries keep
    A's row order)."""
    crow, col, val = a
    if crow.dim() != 1 or crow.numel() < 1:
        raise ValueError("crow must be a 1-D tensor of rows + 1 offsets")
    if col.shape != val.shape or col.dim() != 1:
        raise ValueError(f"col and val must be 1-D of the same length, got {tuple(col.shape)} and {tuple(val.shape)}")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n_cols):
        raise ValueError(f"col must lie in [0, {n_cols})")
    order = torch.sort(col, stable=True).indices
    return indptr_from_rows(col, n_cols), csr_rows((crow, col))[order].contiguous(), val[order].contiguous()


def csr_spmm(a: CsrMatrix, x: Tensor, transpose: Optional[CsrMatrix] = None) -> Tensor:
    """y = A x, [rows, d], for A = (crow, col, val) in CSR with x.size(0) columns and x [n, d] (fp32 or fp64).

    transpose: A^T as (crow, col, val) (e.g. from `csr_transpose`, built once per graph); needed when x requires
    grad, since the backward is dx = A^T dy. Gradients flow to x only (val must not require grad)."""
    crow, col, val = a
    x = x.contiguous()
    t = (None, None, None) if transpose is None else transpose
    return torch.ops.mbrec_fast.csr_spmm(crow, col, val, x, *t)


def row_l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows of x [n, d] (fp32 or fp64) scaled to unit L2 norm: x / max(|x_r|, eps) as F.normalize(x, dim=-1,
    eps=eps), computed as a multiply by the reciprocal (within one rounding of F.normalize), differentiable in x."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor, got {type(x).__name__}"
                         + (f" of {x.dim()} dimensions" if isinstance(x, Tensor) else ""))
    return torch.ops.mbrec_fast.row_l2_normalize(x.contiguous(), float(eps))[0]
