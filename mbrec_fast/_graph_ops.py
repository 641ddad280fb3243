"""The graph op family's Python side: the fake (meta) implementation and the autograd of `csr_spmm`.

The C++ side: schema in csrc/graph/graph_ops.cpp, CPU kernel in graph_cpu.cpp, CUDA kernel in graph_cuda.cu; the
pure-PyTorch reference is mbrec_fast/reference/graph.py; the public wrapper is `mbrec_fast.graph.csr_spmm`.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the torch.ops.mbrec_fast schemas the fakes attach to)


@torch.library.register_fake("mbrec_fast::csr_spmm")
def _csr_spmm_fake(crow, col, val, x, t_crow=None, t_col=None, t_val=None):
    torch._check(x.dim() == 2)
    return x.new_empty((crow.shape[0] - 1, x.shape[1]))


def _csr_spmm_setup(ctx, inputs, output):
    crow, col, val, x, t_crow, t_col, t_val = inputs
    if ctx.needs_input_grad[2]:
        raise ValueError("csr_spmm: val must not require grad (the op differentiates with respect to x only)")
    if ctx.needs_input_grad[3] and t_crow is None:
        raise ValueError("csr_spmm: x requires grad, so the transpose (t_crow, t_col, t_val) must be given "
                         "(mbrec_fast.graph.csr_transpose builds it)")
    ctx.save_for_backward(crow, col, val, t_crow, t_col, t_val)


def _csr_spmm_backward(ctx, grad):
    crow, col, val, t_crow, t_col, t_val = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[3]:  # dx = A^T dy: the same op with A and its transpose swapped
        grad_x = torch.ops.mbrec_fast.csr_spmm(t_crow, t_col, t_val, grad.contiguous(), crow, col, val)
    return None, None, None, grad_x, None, None, None


torch.library.register_autograd("mbrec_fast::csr_spmm", _csr_spmm_backward, setup_context=_csr_spmm_setup)
