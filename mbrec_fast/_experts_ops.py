"""Registration of the expert ops behind `mbrec_fast.gated_experts` / `mbrec_fast.routed_experts`: schemas, fakes,
autograd and the CUDA kernels, all in this one module (nothing else registers expert fakes).

Four ops, all registered with `torch.library.custom_op` (schemas inferred from the Python signatures; the ops are
Triton/torch-backed, so there is no C++ schema):

* ``mbrec_fast::gated_experts_fwd`` / ``mbrec_fast::gated_experts_bwd``
* ``mbrec_fast::routed_experts_fwd`` / ``mbrec_fast::routed_experts_bwd``

plus the fakes of the C++ passes their CPU kernels call (``mbrec_fast::gated_mix_fwd`` / ``gated_mix_bwd``,
``routed_combine`` / ``routed_mix_bwd`` and the LayerNorm twins, and the segment GEMMs ``segment_mm`` /
``segment_mm_tn``; schemas and kernels in csrc/experts/).

The default implementation of every op (the CPU kernel) is the torch code in `mbrec_fast._experts_torch`. On CUDA
all four ops are overridden by Triton launchers from `mbrec_fast.kernels` (when Triton is installed); fp64 inputs
run the torch code there too.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the gated_mix_* schemas the fakes below attach to)
from ._experts_torch import (ACTIVATIONS, EMPTY_SHAPE, compute_dtype, gated_experts_bwd_torch,  # noqa: F401
                             gated_experts_fwd_torch, routed_experts_bwd_torch, routed_experts_fwd_torch,
                             saves_gathered_x)


# ------------------------------------------------------------------------------------------------ gated: fwd
@torch.library.custom_op("mbrec_fast::gated_experts_fwd", mutates_args=())
def gated_experts_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Optional[Tensor],
                      gate_weight: Optional[Tensor], gate_bias: Optional[Tensor], gate_mask: Optional[Tensor],
                      ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], ln_eps: float,
                      activation: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out [T, B, H] in x.dtype, saved state fp32 (the activation for relu/none without LayerNorm, else the
    pre-activation), gate probs [T, B, E] fp32 or empty if gates given)."""
    return gated_experts_fwd_torch(x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias,
                                   ln_eps, activation)


@gated_experts_fwd.register_fake
def _(x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias, ln_eps, activation):
    E, _, H = weight.shape
    T = gates.shape[0] if gates is not None else gate_weight.shape[0]
    B = x.shape[-2]
    out = x.new_empty((T, B, H))
    pre = x.new_empty((B, E, H) if x.dim() == 2 else (E, B, H), dtype=compute_dtype(x))
    probs = x.new_empty((T, B, E) if gates is None else EMPTY_SHAPE, dtype=compute_dtype(x))
    return out, pre, probs


@torch.library.custom_op("mbrec_fast::gated_experts_bwd", mutates_args=())
def gated_experts_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Optional[Tensor],
                      gate_weight: Optional[Tensor], gate_bias: Optional[Tensor], gate_mask: Optional[Tensor],
                      ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], ln_eps: float, activation: str,
                      pre: Tensor, probs: Tensor) -> List[Tensor]:
    """Gradients [dx, dweight, dbias, dgates, dgate_weight, dgate_bias, dln_weight, dln_bias]; empty where absent."""
    return gated_experts_bwd_torch(grad_out, x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight,
                                   ln_bias, ln_eps, activation, pre, probs)


@gated_experts_bwd.register_fake
def _(grad_out, x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias, ln_eps, activation,
      pre, probs):
    def like(t):
        return x.new_empty(EMPTY_SHAPE) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return [like(x), like(weight), like(bias), like(gates), like(gate_weight), like(gate_bias), like(ln_weight),
            like(ln_bias)]


@torch.library.register_fake("mbrec_fast::gated_mix_fwd")
def _(act, gates, relu):
    """Fake of the C++ gate-mixture forward (csrc/experts): out [T, B, H]; act is updated in place."""
    return act.new_empty((gates.shape[0], act.shape[0], act.shape[2]))


@torch.library.register_fake("mbrec_fast::gated_mix_bwd")
def _(grad_out, act, gates, relu, with_bias):
    """Fake of the C++ gate-mixture backward: (grad of the pre-activation, grad of gates, bias grad or empty)."""
    dbias = act.new_empty((act.shape[1], act.shape[2]) if with_bias else EMPTY_SHAPE)
    return torch.empty_like(act), torch.empty_like(gates), dbias


@torch.library.register_fake("mbrec_fast::gated_ln_mix_fwd")
def _(pre, gates, ln_weight, ln_bias, eps, activation, expert_major):
    """Fake of the C++ LayerNorm-experts mixture forward (csrc/experts): out [T, B, H]."""
    batch = pre.shape[1] if expert_major else pre.shape[0]
    return pre.new_empty((gates.shape[0], batch, pre.shape[2]))


@torch.library.register_fake("mbrec_fast::gated_ln_mix_bwd")
def _(grad_out, pre, gates, ln_weight, ln_bias, eps, activation, expert_major, with_bias):
    """Fake of the C++ LayerNorm-experts backward: (grad of pre, grad of gates, bias grad, ln_weight grad, ln_bias
    grad; each of the last three [E, H] or empty)."""
    E, H = (pre.shape[0] if expert_major else pre.shape[1]), pre.shape[2]

    def sum_or_empty(present):
        return pre.new_empty((E, H) if present else EMPTY_SHAPE)
    return (torch.empty_like(pre), torch.empty_like(gates), sum_or_empty(with_bias), sum_or_empty(ln_weight is not None),
            sum_or_empty(ln_bias is not None))


@torch.library.register_fake("mbrec_fast::routed_combine")
def _(src, order, route_weight, batch):
    """Fake of the C++ routed combine (csrc/experts): out [batch, C]."""
    return src.new_empty((batch, src.shape[1]))


@torch.library.register_fake("mbrec_fast::routed_mix_bwd")
def _(grad_out, act, order, route_weight, relu):
    """Fake of the C++ routed backward pass: (grad of the pre-activation [N, H], grad of route_weight or empty)."""
    drw = act.new_empty(EMPTY_SHAPE) if route_weight is None else torch.empty_like(route_weight)
    return torch.empty_like(act), drw


@torch.library.register_fake("mbrec_fast::routed_ln_combine")
def _(pre, order, route_weight, batch, offsets, ln_weight, ln_bias, eps, activation):
    """Fake of the C++ routed LayerNorm combine (csrc/experts): out [batch, H]."""
    return pre.new_empty((batch, pre.shape[1]))


@torch.library.register_fake("mbrec_fast::routed_ln_mix_bwd")
def _(grad_out, pre, order, route_weight, offsets, ln_weight, ln_bias, eps, activation):
    """Fake of the C++ routed LayerNorm backward: (grad of pre [N, H], grad of route_weight or empty, grads of
    ln_weight / ln_bias [E, H] or empty)."""
    E, H = offsets.shape[0] - 1, pre.shape[1]
    drw = pre.new_empty(EMPTY_SHAPE) if route_weight is None else torch.empty_like(route_weight)
    return (torch.empty_like(pre), drw, pre.new_empty((E, H) if ln_weight is not None else EMPTY_SHAPE),
            pre.new_empty((E, H) if ln_bias is not None else EMPTY_SHAPE))


@torch.library.register_fake("mbrec_fast::segment_mm")
def _(a, b, offsets, bias, transpose_b):
    """Fake of the C++ segment GEMM (csrc/experts/segment_mm_cpu.cpp): out [N, M]."""
    return a.new_empty((a.shape[0], b.shape[1] if transpose_b else b.shape[2]))


@torch.library.register_fake("mbrec_fast::segment_mm_tn")
def _(a, c, offsets):
    """Fake of the C++ segment GEMM a[s:t]^T c[s:t]: out [E, P, M]."""
    return a.new_empty((offsets.shape[0] - 1, a.shape[1], c.shape[1]))


def _gated_setup(ctx, inputs, output):
    (x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias, ln_eps, activation) = inputs
    _, pre, probs = output
    ctx.save_for_backward(x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias, pre, probs)
    ctx.ln_eps = ln_eps
    ctx.activation = activation


def _gated_backward(ctx, grad_out, _grad_pre, _grad_probs):
    (x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias, pre, probs) = ctx.saved_tensors
    grads = torch.ops.mbrec_fast.gated_experts_bwd(
        grad_out.contiguous(), x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias,
        ctx.ln_eps, ctx.activation, pre, probs)
    dx, dw, db, dg, dgw, dgb, dlnw, dlnb = grads
    present = (bias, gates, gate_weight, gate_bias, ln_weight, ln_bias)
    db, dg, dgw, dgb, dlnw, dlnb = (None if t is None else d for t, d in zip(present, (db, dg, dgw, dgb, dlnw, dlnb)))
    return dx, dw, db, dg, dgw, dgb, None, dlnw, dlnb, None, None


gated_experts_fwd.register_autograd(_gated_backward, setup_context=_gated_setup)


@torch.library.custom_op("mbrec_fast::routed_experts_fwd", mutates_args=())
def routed_experts_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], route: Tensor,
                       route_weight: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                       ln_eps: float, activation: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out [B, H] in x.dtype, sorted saved state [B*k, H] fp32 (the activation for relu/none without
    LayerNorm, else the pre-activation), order [B*k], offsets [E+1], gathered X [B*k, D] fp32 saved for the
    backward where `saves_gathered_x` (CPU, relu/none, no LayerNorm), else empty)."""
    return routed_experts_fwd_torch(x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation)


@routed_experts_fwd.register_fake
def _(x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation):
    E, _, H = weight.shape
    B, k = route.shape
    xs_shape = (B * k, x.shape[1]) if saves_gathered_x(x, activation, ln_weight, ln_bias) else EMPTY_SHAPE
    return (x.new_empty((B, H)), x.new_empty((B * k, H), dtype=compute_dtype(x)),
            route.new_empty((B * k,), dtype=torch.int64), route.new_empty((E + 1,), dtype=torch.int64),
            x.new_empty(xs_shape, dtype=compute_dtype(x)))


@torch.library.custom_op("mbrec_fast::routed_experts_bwd", mutates_args=())
def routed_experts_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], route: Tensor,
                       route_weight: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                       ln_eps: float, activation: str, pre: Tensor, order: Tensor,
                       offsets: Tensor, xs: Tensor) -> List[Tensor]:
    """Gradients [dx, dweight, dbias, droute_weight, dln_weight, dln_bias]; empty where absent. `xs`: the
    forward's gathered X (or empty)."""
    return routed_experts_bwd_torch(grad_out, x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps,
                                    activation, pre, order, offsets, xs)


@routed_experts_bwd.register_fake
def _(grad_out, x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation, pre, order, offsets,
      xs):
    def like(t):
        return x.new_empty(EMPTY_SHAPE) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return [like(x), like(weight), like(bias), like(route_weight), like(ln_weight), like(ln_bias)]


def _routed_setup(ctx, inputs, output):
    (x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation) = inputs
    _, pre, order, offsets, xs = output
    ctx.save_for_backward(x, weight, bias, route, route_weight, ln_weight, ln_bias, pre, order, offsets, xs)
    # the saved-state outputs get no gradient: without this, autograd would fill zero tensors of their size
    # ([B*k, H] and [B*k, D]) for the backward to ignore
    ctx.set_materialize_grads(False)
    ctx.ln_eps = ln_eps
    ctx.activation = activation


def _routed_backward(ctx, grad_out, _gp, _go, _goff, _gxs):
    (x, weight, bias, route, route_weight, ln_weight, ln_bias, pre, order, offsets, xs) = ctx.saved_tensors
    if grad_out is None:  # only the saved-state outputs had a gradient path: nothing flows back
        return (None,) * 9
    grads = torch.ops.mbrec_fast.routed_experts_bwd(
        grad_out.contiguous(), x, weight, bias, route, route_weight, ln_weight, ln_bias, ctx.ln_eps, ctx.activation,
        pre, order, offsets, xs)
    dx, dw, db, drw, dlnw, dlnb = grads
    present = (bias, route_weight, ln_weight, ln_bias)
    db, drw, dlnw, dlnb = (None if t is None else d for t, d in zip(present, (db, drw, dlnw, dlnb)))
    return dx, dw, db, None, drw, dlnw, dlnb, None, None


routed_experts_fwd.register_autograd(_routed_backward, setup_context=_routed_setup)


def _fp64_falls_back(triton_fn, torch_fn):
    """CUDA kernel: the Triton launcher, except for fp64 inputs (gradcheck), which the fp32-accumulating kernels
    cannot serve exactly: those run the torch implementation on the GPU. The first argument (x, or grad_out for
    the backward ops) carries the dtype."""
    def kernel(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        return (torch_fn if first.dtype == torch.float64 else triton_fn)(*args, **kwargs)
    kernel.__name__ = triton_fn.__name__
    return kernel


def _register_triton() -> bool:
    """Registers the Triton launchers as the CUDA kernels of all four ops (when Triton is present)."""
    try:
        from mbrec_fast.kernels import gated_experts as _kg, routed_experts as _kr  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken: the default (torch) path serves CUDA too
        return False
    gated_experts_fwd.register_kernel("cuda")(_fp64_falls_back(_kg.gated_experts_fwd_triton, gated_experts_fwd_torch))
    gated_experts_bwd.register_kernel("cuda")(_fp64_falls_back(_kg.gated_experts_bwd_triton, gated_experts_bwd_torch))
    routed_experts_fwd.register_kernel("cuda")(
        _fp64_falls_back(_kr.routed_experts_fwd_triton, routed_experts_fwd_torch))
    routed_experts_bwd.register_kernel("cuda")(
        _fp64_falls_back(_kr.routed_experts_bwd_triton, routed_experts_bwd_torch))
    return True


TRITON_REGISTERED = _register_triton()
