"""Triton forward of `mbrec_fast::routed_experts_fwd`: a grouped GEMM over variable group sizes.

The (sample, slot) pairs are sorted by expert with torch (stable argsort + bincount + cumsum, giving `order` and
`offsets`); each program owns one BLOCK_M row tile of one expert's group (tile -> expert found from the per-expert
tile counts), gathers its x rows through `order` (no padded copy of x), multiplies by that expert's weight, adds
bias, LayerNorm, activation, stores the fp32 pre-activation (sorted) and atomically adds the route-weighted
result into the fp32 output row of the sample. Programs past the last tile exit at once. The backward
(`mbrec_fast::routed_experts_bwd`) is three launches over the same sorted rows: fused elementwise (route-weight
gradient, d(pre) through activation and LayerNorm), grouped dX (atomic scatter to samples), grouped dW/db.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mbrec_fast._experts_torch import (check_finite_value, check_route, compute_dtype, routed_experts_bwd_torch,
                                       saves_gathered_x, sort_routes)

from .common import (ACT_CODES, _activate_grad, _dot, _group_tile, _layer_norm_backward, _normalize_activate,
                     _saved_state)

__all__ = ["routed_experts_fwd_triton", "routed_experts_bwd_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile_offsets(offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """Each expert's first BLOCK_M row tile (int64 [E+1]) from its first sorted row (`offsets` [E+1])."""
    counts = offsets[1:] - offsets[:-1]
    tile_off = torch.zeros(offsets.numel(), dtype=torch.int64, device=offsets.device)
    torch.cumsum(torch.div(counts + block_m - 1, block_m, rounding_mode="floor"), 0, out=tile_off[1:])
    return tile_off


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
        expert, rows, mask_m = _group_tile(pid, tile_off_ptr, offsets_ptr, E, BLOCK_M)
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
            acc = _dot(xt, wt, acc, IEEE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + expert * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        tl.store(pre_ptr + rows[:, None] * H + offs_h[None, :], _saved_state(acc, ACT, LN), mask=mask_mh)
        a, _, _, _, _ = _normalize_activate(acc, mask_h[None, :], lnw_ptr, lnb_ptr, expert * H + offs_h, mask_h, H,
                                            ln_eps, LN, HAS_LNW, HAS_LNB, ACT)
        if HAS_RW:
            a = a * tl.load(rw_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        tl.atomic_add(out_ptr + sample[:, None] * H + offs_h[None, :], a, mask=mask_mh)


def routed_experts_fwd_triton(x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation,
                              block_m=None, block_h=None, block_d=None):
    """Same contract as `torch.ops.mbrec_fast.routed_experts_fwd`: (out [B, H], pre [B*k, H], order, offsets, xs)."""
    E, D, H = weight.shape
    B, k = route.shape
    # bias / LayerNorm params are indexed as dense [E, H] rows
    bias, ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (bias, ln_weight, ln_bias))
    check_route(route, E)
    check_finite_value(route_weight, "route_weight")
    order, offsets = sort_routes(route, E)
    ln = ln_weight is not None or ln_bias is not None
    if _INTERPRET:
        bm, bh, bd = 16, (max(16, triton.next_power_of_2(H)) if ln else 16), 16
    else:
        bm, bd = 64, 32
        bh = max(16, triton.next_power_of_2(H)) if ln else min(128, max(16, triton.next_power_of_2(H)))
    bm, bh, bd = block_m or bm, block_h or bh, block_d or bd
    if ln and bh < H:
        raise ValueError(f"LayerNorm needs block_h >= H ({H})")
    tile_off = _tile_offsets(offsets, bm)
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
    # the gathered X output: empty on CUDA; where the op's CPU path saves it (CPU tensors under TRITON_INTERPRET),
    # the same gather, so that both return the same outputs
    cdt = compute_dtype(x)
    xs = (x.to(cdt).index_select(0, torch.div(order, k, rounding_mode="floor"))
          if saves_gathered_x(x, activation, ln_weight, ln_bias) else x.new_empty((0,), dtype=cdt))
    return out32.to(x.dtype), pre, order, offsets, xs


# ------------------------------------------------------------------------------------------------------ backward
@triton.jit
def _routed_experts_bwd_elem_kernel(
        pre_ptr, go_ptr, route_ptr, rw_ptr, lnw_ptr, lnb_ptr, order_ptr, dpre_ptr, drw_ptr, dlnw_ptr, dlnb_ptr,
        N, H, K, ln_eps, s_gob, s_goh,
        HAS_RW: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, LN: tl.constexpr, ACT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """One BLOCK_M tile of sorted (sample, slot) rows: recompute LN/activation from the saved pre-activation, the
    route-weight gradient <grad_out[b], a> (stored at the pair's own index), then d(pre) through the activation and
    LayerNorm (stored fp32, sorted); LN parameter gradients: one atomic row add per expert present in the tile."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    mask_m = rows < N
    mask_h = offs_h < H
    mask_mh = mask_m[:, None] & mask_h[None, :]
    pairs = tl.load(order_ptr + rows, mask=mask_m, other=0)
    sample = pairs // K
    expert = tl.load(route_ptr + pairs, mask=mask_m, other=0)
    p_ptrs = rows[:, None] * H + offs_h[None, :]
    eh = expert[:, None] * H + offs_h[None, :]
    pre = tl.load(pre_ptr + p_ptrs, mask=mask_mh, other=0.0)
    a, y, xhat, rstd, lnw = _normalize_activate(pre, mask_mh, lnw_ptr, lnb_ptr, eh, mask_mh, H, ln_eps,
                                                LN, HAS_LNW, HAS_LNB, ACT)
    go = tl.load(go_ptr + sample[:, None] * s_gob + offs_h[None, :] * s_goh, mask=mask_mh, other=0.0).to(tl.float32)
    if HAS_RW:
        tl.store(drw_ptr + pairs, tl.sum(go * a, axis=1), mask=mask_m)
        go = go * tl.load(rw_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    dy = go * _activate_grad(y, ACT)
    if LN:
        # rows are sorted by expert, so a tile spans few experts: one [BLOCK_H] atomic per expert present
        e_first = tl.min(tl.where(mask_m, expert, 2147483647), axis=0)
        e_last = tl.max(tl.where(mask_m, expert, -1), axis=0)
        for e in range(e_first, e_last + 1):
            in_e = (mask_m & (expert == e))[:, None]
            if HAS_LNW:
                tl.atomic_add(dlnw_ptr + e * H + offs_h, tl.sum(tl.where(in_e, dy * xhat, 0.0), axis=0), mask=mask_h)
            if HAS_LNB:
                tl.atomic_add(dlnb_ptr + e * H + offs_h, tl.sum(tl.where(in_e, dy, 0.0), axis=0), mask=mask_h)
        dy = _layer_norm_backward(dy, xhat, rstd, lnw, H, HAS_LNW)
    tl.store(dpre_ptr + p_ptrs, dy, mask=mask_mh)


@triton.jit
def _routed_experts_dx_kernel(
        dpre_ptr, w_ptr, order_ptr, offsets_ptr, tile_off_ptr, dx_ptr, D, H, E, K,
        s_we, s_wd, s_wh, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grouped dX: each program owns one BLOCK_M row tile of one expert's group, d(pre)[rows] · W[e]ᵀ, atomically
    added into the fp32 dX rows of the samples."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_tiles = tl.load(tile_off_ptr + E)
    if pid < n_tiles:
        expert, rows, mask_m = _group_tile(pid, tile_off_ptr, offsets_ptr, E, BLOCK_M)
        sample = tl.load(order_ptr + rows, mask=mask_m, other=0) // K
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_k = tl.arange(0, BLOCK_K)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_K):
            hh = h0 + offs_k
            dp = tl.load(dpre_ptr + rows[:, None] * H + hh[None, :], mask=mask_m[:, None] & (hh[None, :] < H),
                         other=0.0)
            wt = tl.load(w_ptr + expert * s_we + hh[:, None] * s_wh + offs_d[None, :] * s_wd,
                         mask=(hh[:, None] < H) & mask_d[None, :], other=0.0).to(tl.float32)
            acc = _dot(dp, wt, acc, IEEE)
        tl.atomic_add(dx_ptr + sample[:, None] * D + offs_d[None, :], acc, mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _routed_experts_dw_kernel(
        x_ptr, dpre_ptr, order_ptr, offsets_ptr, dw_ptr, db_ptr, D, H, K, s_xb, s_xd,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[e] = X[group e]ᵀ · d(pre)[group e] over the expert's sorted rows (x gathered through `order`); an empty
    group stores zeros. db[e] from the programs of d-tile 0."""
    pid_d = tl.program_id(0)
    pid_h = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < D
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + offs_k
        mask_k = rows < end
        sample = tl.load(order_ptr + rows, mask=mask_k, other=0) // K
        xt = tl.load(x_ptr + offs_d[:, None] * s_xd + sample[None, :] * s_xb,
                     mask=mask_d[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        dp = tl.load(dpre_ptr + rows[:, None] * H + offs_h[None, :], mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        acc = _dot(xt, dp, acc, IEEE)
        if HAS_BIAS:
            bsum += tl.sum(dp, axis=0)
    tl.store(dw_ptr + e * D * H + offs_d[:, None] * H + offs_h[None, :], acc, mask=mask_d[:, None] & mask_h[None, :])
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + e * H + offs_h, bsum, mask=mask_h)


def routed_experts_bwd_triton(grad_out, x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation,
                              pre, order, offsets, xs, block_m=None, tile=None, tile_k=None):
    """Same contract as `torch.ops.mbrec_fast.routed_experts_bwd`: [dx, dw, db, droute_weight, dln_weight, dln_bias]
    (empty where absent). Three launches over the sorted rows saved by the forward: fused elementwise (route-weight
    gradient, d(pre) through activation and LayerNorm), grouped dX (atomic scatter to samples), grouped dW/db."""
    if x.dtype == torch.float64:  # fp64 (gradcheck): the kernels accumulate in fp32, use the torch path
        return routed_experts_bwd_torch(grad_out, x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps,
                                        activation, pre, order, offsets, xs)
    E, D, H = weight.shape
    B, k = route.shape
    N = B * k
    dev = x.device
    ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (ln_weight, ln_bias))
    ln = ln_weight is not None or ln_bias is not None
    bh = max(16, triton.next_power_of_2(H))
    if _INTERPRET:
        bm, bt, bk = 16, 16, 16
    else:
        bm, bt, bk = (32 if bh <= 256 else 16), 64, 32
    bm, bt, bk = block_m or bm, tile or bt, tile_k or bk
    go = grad_out.contiguous()
    dpre = torch.empty_like(pre)
    drw = torch.zeros(N, dtype=torch.float32, device=dev) if route_weight is not None else None
    dlnw = torch.zeros((E, H), dtype=torch.float32, device=dev) if ln_weight is not None else None
    dlnb = torch.zeros((E, H), dtype=torch.float32, device=dev) if ln_bias is not None else None
    dx = torch.zeros((B, D), dtype=torch.float32, device=dev)
    dw = torch.zeros((E, D, H), dtype=torch.float32, device=dev)
    db = torch.zeros((E, H), dtype=torch.float32, device=dev) if bias is not None else None
    ieee = x.dtype in (torch.float32, torch.float64)
    if N > 0:
        _routed_experts_bwd_elem_kernel[(triton.cdiv(N, bm),)](
            pre, go, route.contiguous().reshape(-1),
            route_weight.contiguous() if route_weight is not None else dpre,
            ln_weight if ln_weight is not None else dpre, ln_bias if ln_bias is not None else dpre, order,
            dpre, drw if drw is not None else dpre, dlnw if dlnw is not None else dpre,
            dlnb if dlnb is not None else dpre, N, H, k, float(ln_eps), go.stride(0), go.stride(1),
            HAS_RW=route_weight is not None, HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, LN=ln,
            ACT=ACT_CODES[activation], BLOCK_M=bm, BLOCK_H=bh)
        tile_off = _tile_offsets(offsets, bt)
        _routed_experts_dx_kernel[(triton.cdiv(N, bt) + E, triton.cdiv(D, bt))](
            dpre, weight, order, offsets, tile_off, dx, D, H, E, k, *weight.stride(), IEEE=ieee,
            BLOCK_M=bt, BLOCK_D=bt, BLOCK_K=bk)
        _routed_experts_dw_kernel[(triton.cdiv(D, bt), triton.cdiv(H, bt), E)](
            x, dpre, order, offsets, dw, db if db is not None else dw, D, H, k, x.stride(0), x.stride(1),
            HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_D=bt, BLOCK_H=bt, BLOCK_K=bk)
    def empty():  # a fresh tensor per absent output: outputs of a custom op must not alias each other
        return x.new_empty((0,))
    return [dx.to(x.dtype), dw.to(weight.dtype), empty() if db is None else db.to(bias.dtype),
            empty() if drw is None else drw.view(B, k).to(route_weight.dtype),
            empty() if dlnw is None else dlnw.to(ln_weight.dtype), empty() if dlnb is None else dlnb.to(ln_bias.dtype)]
