"""The graph op family's Python side: the fake (meta) implementations and the autograd of `csr_spmm` and
`row_l2_normalize`.

The C++ side: schema in csrc/graph/graph_ops.cpp, CPU kernel in graph_cpu.cpp, CUDA kernel in graph_cuda.cu; the
pure-PyTorch reference is mbrec_fast/reference/graph.py; the public wrappers are in `mbrec_fast.graph`.
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


@torch.library.register_fake("mbrec_fast::row_l2_normalize")
def _row_l2_normalize_fake(x, eps=1e-12):
    torch._check(x.dim() == 2)
    return torch.empty_like(x), x.new_empty((x.shape[0],))


@torch.library.register_fake("mbrec_fast::row_l2_normalize_backward")
def _row_l2_normalize_backward_fake(grad, y, norm, eps=1e-12):
    torch._check(grad.dim() == 2)
    return torch.empty_like(grad)


def _row_l2_normalize_setup(ctx, inputs, output):
    ctx.eps = inputs[1]
    ctx.save_for_backward(output[0], output[1])
    ctx.mark_non_differentiable(output[1])


def _row_l2_normalize_backward(ctx, grad_y, grad_norm):
    y, norm = ctx.saved_tensors
    if grad_y is None:
        return None, None
    return torch.ops.mbrec_fast.row_l2_normalize_backward(grad_y.contiguous(), y, norm, ctx.eps), None


torch.library.register_autograd("mbrec_fast::row_l2_normalize", _row_l2_normalize_backward,
                                setup_context=_row_l2_normalize_setup)
