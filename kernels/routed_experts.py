"""Triton forward of `mbrec_fast::routed_experts_fwd`: a grouped GEMM over variable group sizes.

The (sample, slot) pairs are sorted by expert with torch (stable argsort + bincount + cumsum, giving `order` and
`offsets`); each program owns one BLOCK_M row tile of one expert's group (tile -> expert found from the per-expert
tile counts), gathers its x rows through `order` (no padded copy of x), multiplies by that expert's weight, adds
bias, LayerNorm, activation, stores the fp32 pre-activation (sorted) and atomically adds the route-weighted
result into the fp32 output row of the sample. Programs past the last tile exit at once.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gated_experts import ACT_CODES, _activate

__all__ = ["routed_experts_fwd_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _routed_experts_fwd_kernel(
        x_ptr, w_ptr, b_ptr, rw_ptr, lnw_ptr, lnb_ptr, order_ptr, offsets_ptr, tile_off_ptr, out_ptr, pre_ptr,
        D, H, E, K, ln_eps,
        s_xb, s_xd, s_we, s_wd, s_wh,
        HAS_BIAS: tl.constexpr, HAS_RW: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
        LN: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_tiles = tl.load(tile_off_ptr + E)
    if pid < n_tiles:
        expert = 0
        for e in range(E):
            expert += (pid >= tl.load(tile_off_ptr + e + 1)).to(tl.int32)
        tile_in_group = pid - tl.load(tile_off_ptr + expert)
        row_end = tl.load(offsets_ptr + expert + 1)
        rows = tl.load(offsets_ptr + expert) + tile_in_group * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        pairs = tl.load(order_ptr + rows, mask=mask_m, other=0)
        sample = pairs // K
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask_h = offs_h < H
        mask_mh = mask_m[:, None] & mask_h[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            xt = tl.load(x_ptr + sample[:, None] * s_xb + dd[None, :] * s_xd,
                         mask=mask_m[:, None] & (dd[None, :] < D), other=0.0)
            wt = tl.load(w_ptr + expert * s_we + dd[:, None] * s_wd + offs_h[None, :] * s_wh,
                         mask=(dd[:, None] < D) & mask_h[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xt, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + expert * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        tl.store(pre_ptr + rows[:, None] * H + offs_h[None, :], acc, mask=mask_mh)
        y = acc
        if LN:
            mean = tl.sum(tl.where(mask_h[None, :], y, 0.0), axis=1) / H
            cen = tl.where(mask_h[None, :], y - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(cen * cen, axis=1) / H + ln_eps)
            y = cen * rstd[:, None]
            if HAS_LNW:
                y = y * tl.load(lnw_ptr + expert * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
            if HAS_LNB:
                y = y + tl.load(lnb_ptr + expert * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        a = _activate(y, ACT)
        if HAS_RW:
            a = a * tl.load(rw_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        tl.atomic_add(out_ptr + sample[:, None] * H + offs_h[None, :], a, mask=mask_mh)


def routed_experts_fwd_triton(x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation,
                              block_m=None, block_h=None, block_d=None):
    """Same contract as `torch.ops.mbrec_fast.routed_experts_fwd`: (out [B, H], pre [B*k, H], order, offsets)."""
    from mbrec_fast._experts_ops import _sort_routes, _check_route, _check_finite_value
    E, D, H = weight.shape
    B, k = route.shape
    # bias / LayerNorm params are indexed as dense [E, H] rows
    bias, ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (bias, ln_weight, ln_bias))
    _check_route(route, E)
    _check_finite_value(route_weight, "route_weight")
    order, offsets = _sort_routes(route, E)
    ln = ln_weight is not None or ln_bias is not None
    if _INTERPRET:
        bm, bh, bd = 16, (max(16, triton.next_power_of_2(H)) if ln else 16), 16
    else:
        bm, bd = 64, 32
        bh = max(16, triton.next_power_of_2(H)) if ln else min(128, max(16, triton.next_power_of_2(H)))
    bm, bh, bd = block_m or bm, block_h or bh, block_d or bd
    if ln and bh < H:
        raise ValueError(f"LayerNorm needs block_h >= H ({H})")
    counts = offsets[1:] - offsets[:-1]
    tile_off = torch.zeros(E + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(torch.div(counts + bm - 1, bm, rounding_mode="floor"), 0, out=tile_off[1:])
    N = B * k
    out32 = torch.zeros((B, H), dtype=torch.float32, device=x.device)
    pre = torch.empty((N, H), dtype=torch.float32, device=x.device)
    max_tiles = triton.cdiv(N, bm) + E  # upper bound on sum_e ceil(count_e / bm)
    if N > 0:
        dummy = pre
        _routed_experts_fwd_kernel[(max_tiles, triton.cdiv(H, bh))](
            x, weight, bias if bias is not None else dummy,
            route_weight.contiguous() if route_weight is not None else dummy,
            ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
            order, offsets, tile_off, out32, pre, D, H, E, k, float(ln_eps),
            x.stride(0), x.stride(1), *weight.stride(),
            HAS_BIAS=bias is not None, HAS_RW=route_weight is not None, HAS_LNW=ln_weight is not None,
            HAS_LNB=ln_bias is not None, LN=ln, ACT=ACT_CODES[activation],
            IEEE=x.dtype in (torch.float32, torch.float64), BLOCK_M=bm, BLOCK_H=bh, BLOCK_D=bd)
    return out32.to(x.dtype), pre, order, offsets
