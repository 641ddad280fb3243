"""`@triton.jit` helpers shared by the gated and routed Triton kernels, forward and backward: the activation codes,
the activation and its derivative, what the forward saves, the LayerNorm + activation epilogue of a tile of expert
rows, the tile GEMM step, and which rows of which expert group a routed program owns."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ACT_CODES"]

ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}


@triton.jit
def _activate(y, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 3:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _activate_grad(y, ACT: tl.constexpr):
    """d act(y) / dy (1 for the identity)."""
    if ACT == 1:
        g = (y > 0.0).to(tl.float32)
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476)) + y * tl.exp(-0.5 * y * y) * 0.3989422804014327
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-y))
        g = s * (1.0 + y * (1.0 - s))
    else:
        g = tl.full(y.shape, 1.0, tl.float32)
    return g


@triton.jit
def _saved_state(pre, ACT: tl.constexpr, LN: tl.constexpr):
    """What the forward saves for the backward (the op's contract, on every device): relu(pre) for relu without
    LayerNorm (its derivative follows from the output, so the backward recomputes nothing), else pre."""
    if ACT == 1 and not LN:
        pre = tl.maximum(pre, 0.0)
    return pre


@triton.jit
def _normalize_activate(pre, mask, lnw_ptr, lnb_ptr, ln_offs, ln_mask, H, ln_eps,
                        LN: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, ACT: tl.constexpr):
    """LayerNorm over the H columns of a fp32 [rows, BLOCK_H] tile of pre-activations (entries outside `mask` count
    as 0), the per-expert affine read at `ln_offs` ([BLOCK_H] for one expert per tile, [rows, BLOCK_H] for one
    expert per row), then the activation. Returns (a, y, xhat, rstd, lnw): the activation, its input y, and the
    normalized values, 1/std and LayerNorm weight the backward needs (y itself where LN or its weight is off)."""
    y = pre
    xhat = pre
    rstd = pre
    lnw = pre
    if LN:
        mean = tl.sum(tl.where(mask, y, 0.0), axis=1) / H
        cen = tl.where(mask, y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(cen * cen, axis=1) / H + ln_eps)
        xhat = cen * rstd[:, None]
        y = xhat
        if HAS_LNW:
            lnw = tl.load(lnw_ptr + ln_offs, mask=ln_mask, other=0.0).to(tl.float32)
            y = y * lnw
        if HAS_LNB:
            y = y + tl.load(lnb_ptr + ln_offs, mask=ln_mask, other=0.0).to(tl.float32)
        y = tl.where(mask, y, 0.0)
    return _activate(y, ACT), y, xhat, rstd, lnw


@triton.jit
def _layer_norm_backward(dy, xhat, rstd, lnw, H, HAS_LNW: tl.constexpr):
    """d(pre) from d(y) back through `_normalize_activate`'s LayerNorm (y = xhat * lnw + lnb, xhat = (pre - mean) *
    rstd), with the xhat, rstd and lnw it returned."""
    if HAS_LNW:
        dxhat = dy * lnw
    else:
        dxhat = dy
    m1 = tl.sum(dxhat, axis=1) / H
    m2 = tl.sum(dxhat * xhat, axis=1) / H
    return rstd[:, None] * (dxhat - m1[:, None] - xhat * m2[:, None])


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, fp32 accumulation; IEEE fp32 products for fp32 inputs (else tl.dot's default precision)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _group_tile(pid, tile_off_ptr, offsets_ptr, E, BLOCK_M: tl.constexpr):
    """(expert, rows, mask) of routed program `pid`: its BLOCK_M tile of one expert's group of sorted rows
    (`offsets`: each expert's first row; `tile_off`: each expert's first tile). Needs pid < tile_off[E]."""
    expert = 0
    for e in range(E):
        expert += (pid >= tl.load(tile_off_ptr + e + 1)).to(tl.int32)
    tile_in_group = pid - tl.load(tile_off_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = tl.load(offsets_ptr + expert) + tile_in_group * BLOCK_M + tl.arange(0, BLOCK_M)
    return expert, rows, rows < row_end
