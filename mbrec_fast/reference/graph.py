"""Reference of the graph op: y = A x as a gather and an index_add over the nonzeros, in float64."""
from __future__ import annotations

import torch


def csr_spmm_ref(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x in float64 for A = (crow, col, val) in CSR with x.size(0) columns."""
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
    y = torch.zeros(crow.numel() - 1, x.shape[1], dtype=torch.float64, device=x.device)
    return y.index_add_(0, rows, val.double()[:, None] * x.double()[col])
