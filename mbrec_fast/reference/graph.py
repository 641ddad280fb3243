"""References of the graph ops: y = A x as a gather and an index_add over the nonzeros, in float64; row L2
normalisation as F.normalize."""
from __future__ import annotations

import torch


def csr_spmm_ref(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x in float64 for A = (crow, col, val) in CSR with x.size(0) columns."""
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
    y = torch.zeros(crow.numel() - 1, x.shape[1], dtype=torch.float64, device=x.device)
    return y.index_add_(0, rows, val.double()[:, None] * x.double()[col])


def row_l2_normalize_ref(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of x scaled to unit L2 norm (norms clamped at eps), differentiable: F.normalize(x, dim=-1, eps=eps)."""
    return torch.nn.functional.normalize(x, dim=-1, eps=eps)
