"""Triton forward of `mbrec_fast::gated_experts_fwd`: one kernel per layer computes, for a [BLOCK_B, BLOCK_H] tile,
every expert's GEMM tile (fp32 accumulation), bias, LayerNorm (then BLOCK_H covers H), activation, stores the
fp32 pre-activation (what the backward needs) and accumulates the T gated mixtures in fp32; the [E, B, H]
activations never reach global memory. Given gate weights, the gate (X·Wg_t + bg_t, masked softmax) is computed in
the same kernel, so the forward is one launch per layer. The backward of `mbrec_fast::gated_experts_bwd` is three
launches: a fused elementwise kernel (gate gradients, d(pre) through activation and LayerNorm), dX and dW/db.
Runs under TRITON_INTERPRET=1 on CPU tensors too.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mbrec_fast._experts_torch import check_finite_value, gated_experts_bwd_torch

from .common import ACT_CODES, _activate_grad, _dot, _layer_norm_backward, _normalize_activate, _saved_state

__all__ = ["gated_experts_fwd_triton", "gated_experts_bwd_triton", "experts_dx_dw_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gated_experts_fwd_kernel(
        x_ptr, w_ptr, b_ptr, g_ptr, lnw_ptr, lnb_ptr, out_ptr, pre_ptr, gw_ptr, gbias_ptr, gmask_ptr, probs_ptr,
        B, D, H, E, T, ln_eps,
        s_xe, s_xb, s_xd, s_we, s_wd, s_wh, s_gt, s_gb, s_ge, s_pe, s_pb, s_ph, s_wgt, s_wgd, s_wge,
        HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, LN: tl.constexpr,
        ACT: tl.constexpr, IEEE: tl.constexpr,
        FUSED_GATE: tl.constexpr, HAS_GBIAS: tl.constexpr, HAS_GMASK: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    if FUSED_GATE:
        # gate logits of every task at once: column c = t * BLOCK_E + e of x[b] @ [Wg_0 | Wg_1 | ...] (padded)
        cols = tl.arange(0, BLOCK_T * BLOCK_E)
        col_t = cols // BLOCK_E
        col_e = cols % BLOCK_E
        col_ok = (col_t < T) & (col_e < E)
        logits = tl.zeros((BLOCK_B, BLOCK_T * BLOCK_E), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            xt = tl.load(x_ptr + offs_b[:, None] * s_xb + dd[None, :] * s_xd,
                         mask=mask_b[:, None] & (dd[None, :] < D), other=0.0)
            wg = tl.load(gw_ptr + col_t[None, :] * s_wgt + dd[:, None] * s_wgd + col_e[None, :] * s_wge,
                         mask=(dd[:, None] < D) & col_ok[None, :], other=0.0).to(xt.dtype)
            logits = _dot(xt, wg, logits, IEEE)
        if HAS_GBIAS:
            logits += tl.load(gbias_ptr + col_t * E + col_e, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        allowed = col_ok
        if HAS_GMASK:
            allowed = allowed & (tl.load(gmask_ptr + col_t * E + col_e, mask=col_ok, other=0) != 0)
        logits = tl.where(allowed[None, :], logits, float("-inf"))
        l3 = tl.reshape(logits, (BLOCK_B, BLOCK_T, BLOCK_E))
        mx = tl.max(l3, axis=2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # padded tasks: all -inf, keep them 0 instead of NaN
        ex = tl.exp(l3 - mx[:, :, None])
        den = tl.sum(ex, axis=2)
        den = tl.where(den == 0.0, 1.0, den)
        probs = tl.reshape(ex / den[:, :, None], (BLOCK_B, BLOCK_T * BLOCK_E))
        if pid_h == 0:
            tl.store(probs_ptr + col_t[None, :] * B * E + offs_b[:, None] * E + col_e[None, :], probs,
                     mask=mask_b[:, None] & col_ok[None, :])
    for e in range(E):
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            xt = tl.load(x_ptr + e * s_xe + offs_b[:, None] * s_xb + dd[None, :] * s_xd,
                         mask=mask_b[:, None] & (dd[None, :] < D), other=0.0)
            wt = tl.load(w_ptr + e * s_we + dd[:, None] * s_wd + offs_h[None, :] * s_wh,
                         mask=(dd[:, None] < D) & mask_h[None, :], other=0.0)
            acc = _dot(xt, wt, acc, IEEE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        tl.store(pre_ptr + e * s_pe + offs_b[:, None] * s_pb + offs_h[None, :] * s_ph, _saved_state(acc, ACT, LN),
                 mask=mask_bh)
        a, _, _, _, _ = _normalize_activate(acc, mask_h[None, :], lnw_ptr, lnb_ptr, e * H + offs_h, mask_h, H, ln_eps,
                                            LN, HAS_LNW, HAS_LNB, ACT)
        for t in range(T):
            if FUSED_GATE:
                g = tl.sum(tl.where(cols[None, :] == t * BLOCK_E + e, probs, 0.0), axis=1)
            else:
                g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + e * s_ge, mask=mask_b, other=0.0).to(tl.float32)
            o_ptrs = out_ptr + t * B * H + offs_b[:, None] * H + offs_h[None, :]
            if e == 0:
                o = g[:, None] * a
            else:
                o = tl.load(o_ptrs, mask=mask_bh, other=0.0) + g[:, None] * a
            tl.store(o_ptrs, o, mask=mask_bh)


def _pick_blocks(B: int, H: int, ln: bool):
    if _INTERPRET:
        block_h = max(16, triton.next_power_of_2(H)) if ln else 16
        return 16, block_h, 16
    block_h = max(16, triton.next_power_of_2(H)) if ln else min(128, max(16, triton.next_power_of_2(H)))
    block_b = 64 if block_h <= 128 else 32
    return block_b, block_h, 32


def gated_experts_fwd_triton(x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias, ln_eps,
                             activation, block_b=None, block_h=None, block_d=None):
    """Same contract as `torch.ops.mbrec_fast.gated_experts_fwd`: (out [T, B, H], pre fp32, probs fp32 or empty)."""
    E, D, H = weight.shape
    B = x.shape[-2]
    # bias / LayerNorm params are indexed as dense [E, H] rows
    bias, ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (bias, ln_weight, ln_bias))
    shared = x.dim() == 2
    fused_gate = gates is None
    if fused_gate:  # softmax gate computed inside the kernel (gate_weight= needs a shared x)
        T = gate_weight.shape[0]
        gate_bias = None if gate_bias is None else gate_bias.contiguous()
        gate_mask = None if gate_mask is None else gate_mask.contiguous().view(torch.uint8)
        probs = torch.empty((T, B, E), dtype=torch.float32, device=x.device)
        g = probs
    else:
        check_finite_value(gates, "gates")
        probs = x.new_empty((0,), dtype=torch.float32)
        g = gates
    T = g.shape[0]
    ln = ln_weight is not None or ln_bias is not None
    bb, bh, bd = _pick_blocks(B, H, ln)
    bb, bh, bd = block_b or bb, block_h or bh, block_d or bd
    if ln and bh < H:
        raise ValueError(f"LayerNorm needs block_h >= H ({H})")
    out32 = torch.empty((T, B, H), dtype=torch.float32, device=x.device)
    pre = torch.empty((B, E, H) if shared else (E, B, H), dtype=torch.float32, device=x.device)
    if shared:
        s_xe, s_xb, s_xd = 0, x.stride(0), x.stride(1)
        s_pe, s_pb, s_ph = pre.stride(1), pre.stride(0), pre.stride(2)
    else:
        s_xe, s_xb, s_xd = x.stride()
        s_pe, s_pb, s_ph = pre.stride()
    dummy = pre
    block_e = triton.next_power_of_2(E)
    block_t = max(triton.next_power_of_2(T), triton.cdiv(16, block_e))  # tl.dot needs N = BLOCK_T*BLOCK_E >= 16
    s_wg = gate_weight.stride() if fused_gate else (0, 0, 0)
    grid = (triton.cdiv(B, bb), triton.cdiv(H, bh))
    if B > 0:
        _gated_experts_fwd_kernel[grid](
            x, weight, bias if bias is not None else dummy, g,
            ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
            out32, pre, gate_weight if fused_gate else dummy,
            gate_bias if gate_bias is not None else dummy, gate_mask if gate_mask is not None else dummy, probs,
            B, D, H, E, T, float(ln_eps),
            s_xe, s_xb, s_xd, *weight.stride(), *g.stride(), s_pe, s_pb, s_ph, *s_wg,
            HAS_BIAS=bias is not None, HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, LN=ln,
            ACT=ACT_CODES[activation], IEEE=x.dtype in (torch.float32, torch.float64),
            FUSED_GATE=fused_gate, HAS_GBIAS=gate_bias is not None, HAS_GMASK=gate_mask is not None,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_B=bb, BLOCK_H=bh, BLOCK_D=bd)
    return out32.to(x.dtype), pre, probs


# ------------------------------------------------------------------------------------------------------ backward
@triton.jit
def _gated_experts_bwd_elem_kernel(
        pre_ptr, g_ptr, go_ptr, lnw_ptr, lnb_ptr, dpre_ptr, dg_ptr, dlnw_ptr, dlnb_ptr,
        B, H, E, T, ln_eps,
        s_pe, s_pb, s_ph, s_gt, s_gb, s_ge, s_got, s_gob, s_goh,
        HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, LN: tl.constexpr, ACT: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """One [BLOCK_B, H] row block, every expert: recompute LN/activation from the saved pre-activation, then
    d(gates)[t, b, e] = <grad_out[t, b], a[b, e]>, d(a) = Σ_t g[t, b, e] grad_out[t, b], back through the activation
    and LayerNorm to d(pre) (stored fp32, same layout as pre); LN parameter gradients are atomically summed."""
    pid_b = tl.program_id(0)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    for e in range(E):
        p_ptrs = e * s_pe + offs_b[:, None] * s_pb + offs_h[None, :] * s_ph
        pre = tl.load(pre_ptr + p_ptrs, mask=mask_bh, other=0.0)
        a, y, xhat, rstd, lnw = _normalize_activate(pre, mask_bh, lnw_ptr, lnb_ptr, e * H + offs_h, mask_h, H, ln_eps,
                                                    LN, HAS_LNW, HAS_LNB, ACT)
        d_a = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for t in range(T):
            go = tl.load(go_ptr + t * s_got + offs_b[:, None] * s_gob + offs_h[None, :] * s_goh,
                         mask=mask_bh, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + t * s_gt + offs_b * s_gb + e * s_ge, mask=mask_b, other=0.0).to(tl.float32)
            d_a += g[:, None] * go
            tl.store(dg_ptr + t * B * E + offs_b * E + e, tl.sum(go * a, axis=1), mask=mask_b)
        dy = d_a * _activate_grad(y, ACT)
        if LN:
            if HAS_LNW:
                tl.atomic_add(dlnw_ptr + e * H + offs_h, tl.sum(dy * xhat, axis=0), mask=mask_h)
            if HAS_LNB:
                tl.atomic_add(dlnb_ptr + e * H + offs_h, tl.sum(dy, axis=0), mask=mask_h)
            dy = _layer_norm_backward(dy, xhat, rstd, lnw, H, HAS_LNW)
        tl.store(dpre_ptr + p_ptrs, dy, mask=mask_bh)


@triton.jit
def _experts_dx_kernel(
        dpre_ptr, w_ptr, dx_ptr, B, D, H, E,
        s_pe, s_pb, s_ph, s_we, s_wd, s_wh, s_xe, s_xb, s_xd,
        SHARED: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """dX = d(pre) · Wᵀ: shared X sums over all experts (K = E·H), per-expert X gets one expert per program axis 2."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_e = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_d = offs_d < D
    if SHARED:
        e_lo = 0
        e_hi = E
    else:
        e_lo = pid_e
        e_hi = pid_e + 1
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for e in range(e_lo, e_hi):
        for h0 in range(0, H, BLOCK_K):
            hh = h0 + offs_k
            dp = tl.load(dpre_ptr + e * s_pe + offs_b[:, None] * s_pb + hh[None, :] * s_ph,
                         mask=mask_b[:, None] & (hh[None, :] < H), other=0.0)
            wt = tl.load(w_ptr + e * s_we + hh[:, None] * s_wh + offs_d[None, :] * s_wd,
                         mask=(hh[:, None] < H) & mask_d[None, :], other=0.0).to(tl.float32)
            acc = _dot(dp, wt, acc, IEEE)
    tl.store(dx_ptr + pid_e * s_xe + offs_b[:, None] * s_xb + offs_d[None, :] * s_xd, acc,
             mask=mask_b[:, None] & mask_d[None, :])


@triton.jit
def _experts_dw_kernel(
        x_ptr, dpre_ptr, dw_ptr, db_ptr, B, D, H,
        s_xe, s_xb, s_xd, s_pe, s_pb, s_ph,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[e] = X_eᵀ · d(pre)[e] (K = B) into a contiguous fp32 [E, D, H]; db[e] = Σ_b d(pre)[e] (programs of d-tile 0)."""
    pid_d = tl.program_id(0)
    pid_h = tl.program_id(1)
    e = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < D
    mask_h = offs_h < H
    acc = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_K):
        bb = b0 + offs_k
        mask_k = bb < B
        xt = tl.load(x_ptr + e * s_xe + offs_d[:, None] * s_xd + bb[None, :] * s_xb,
                     mask=mask_d[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        dp = tl.load(dpre_ptr + e * s_pe + bb[:, None] * s_pb + offs_h[None, :] * s_ph,
                     mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        acc = _dot(xt, dp, acc, IEEE)
        if HAS_BIAS:
            bsum += tl.sum(dp, axis=0)
    tl.store(dw_ptr + e * D * H + offs_d[:, None] * H + offs_h[None, :], acc, mask=mask_d[:, None] & mask_h[None, :])
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + e * H + offs_h, bsum, mask=mask_h)


def _bwd_blocks(H: int):
    """(elementwise BLOCK_B, BLOCK_H >= H, GEMM tile M/N, GEMM tile K)."""
    bh = max(16, triton.next_power_of_2(H))
    if _INTERPRET:
        return 16, bh, 16, 16
    return (32 if bh <= 256 else 16), bh, 64, 32


def experts_dx_dw_triton(x, weight, dpre, shared: bool, has_bias: bool, tile=None, tile_k=None):
    """dX (fp32, [B, D] shared or [E, B, D]), dW (fp32 [E, D, H]) and db (fp32 [E, H] or None) from d(pre) laid out
    like the forward's saved pre-activation ([B, E, H] shared, [E, B, H] per-expert)."""
    E, D, H = weight.shape
    B = x.shape[-2]
    _, _, bm, bk = _bwd_blocks(H)
    bm, bk = tile or bm, tile_k or bk
    ieee = x.dtype in (torch.float32, torch.float64)
    if shared:
        s_xe, s_xb, s_xd = 0, x.stride(0), x.stride(1)
        s_pe, s_pb, s_ph = dpre.stride(1), dpre.stride(0), dpre.stride(2)
        dx = torch.empty((B, D), dtype=torch.float32, device=x.device)
        s_dxe, s_dxb, s_dxd = 0, dx.stride(0), dx.stride(1)
    else:
        s_xe, s_xb, s_xd = x.stride()
        s_pe, s_pb, s_ph = dpre.stride()
        dx = torch.empty((E, B, D), dtype=torch.float32, device=x.device)
        s_dxe, s_dxb, s_dxd = dx.stride()
    dw = torch.zeros((E, D, H), dtype=torch.float32, device=x.device)
    db = torch.zeros((E, H), dtype=torch.float32, device=x.device) if has_bias else None
    if B == 0:
        dx.zero_()
        return dx, dw, db
    _experts_dx_kernel[(triton.cdiv(B, bm), triton.cdiv(D, bm), 1 if shared else E)](
        dpre, weight, dx, B, D, H, E, s_pe, s_pb, s_ph, *weight.stride(), s_dxe, s_dxb, s_dxd,
        SHARED=shared, IEEE=ieee, BLOCK_B=bm, BLOCK_D=bm, BLOCK_K=bk)
    _experts_dw_kernel[(triton.cdiv(D, bm), triton.cdiv(H, bm), E)](
        x, dpre, dw, db if db is not None else dw, B, D, H, s_xe, s_xb, s_xd, s_pe, s_pb, s_ph,
        HAS_BIAS=has_bias, IEEE=ieee, BLOCK_D=bm, BLOCK_H=bm, BLOCK_K=bk)
    return dx, dw, db


def gated_experts_bwd_triton(grad_out, x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias,
                             ln_eps, activation, pre, probs, block_b=None, tile=None, tile_k=None):
    """Same contract as `torch.ops.mbrec_fast.gated_experts_bwd`: [dx, dw, db, dgates, dgate_weight, dgate_bias,
    dln_weight, dln_bias] (empty where absent). Three launches: the fused elementwise kernel (gate gradients and
    d(pre) through activation and LayerNorm), dX and dW/db. The gate-weight gradients (softmax Jacobian on the small
    [B, T, E] block, then two GEMMs of size D×T·E) run as torch ops."""
    if x.dtype == torch.float64:  # fp64 (gradcheck): the kernels accumulate in fp32, use the torch path
        return gated_experts_bwd_torch(grad_out, x, weight, bias, gates, gate_weight, gate_bias, gate_mask,
                                       ln_weight, ln_bias, ln_eps, activation, pre, probs)
    E, D, H = weight.shape
    B = x.shape[-2]
    shared = x.dim() == 2
    ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (ln_weight, ln_bias))
    ln = ln_weight is not None or ln_bias is not None
    g = probs if gates is None else gates  # [T, B, E]
    T = g.shape[0]
    go = grad_out.contiguous()
    bb, bh, _, _ = _bwd_blocks(H)
    bb = block_b or bb
    dev = x.device
    dpre = torch.empty_like(pre)
    dg = torch.empty((T, B, E), dtype=torch.float32, device=dev)
    dlnw = torch.zeros((E, H), dtype=torch.float32, device=dev) if ln_weight is not None else None
    dlnb = torch.zeros((E, H), dtype=torch.float32, device=dev) if ln_bias is not None else None
    s_pe, s_pb, s_ph = (pre.stride(1), pre.stride(0), pre.stride(2)) if shared else pre.stride()
    if B > 0:
        _gated_experts_bwd_elem_kernel[(triton.cdiv(B, bb),)](
            pre, g, go, ln_weight if ln_weight is not None else pre, ln_bias if ln_bias is not None else pre,
            dpre, dg, dlnw if dlnw is not None else dg, dlnb if dlnb is not None else dg,
            B, H, E, T, float(ln_eps), s_pe, s_pb, s_ph, *g.stride(), *go.stride(),
            HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, LN=ln, ACT=ACT_CODES[activation],
            BLOCK_B=bb, BLOCK_H=bh)
    dx, dw, db = experts_dx_dw_triton(x, weight, dpre, shared, bias is not None, tile, tile_k)
    def empty():  # a fresh tensor per absent output: outputs of a custom op must not alias each other
        return x.new_empty((0,))
    d_gates, d_gw, d_gb = empty(), empty(), empty()
    if gates is None:
        p = probs.permute(1, 0, 2)  # [B, T, E]
        d_p = dg.permute(1, 0, 2)
        d_logits = p * (d_p - (p * d_p).sum(-1, keepdim=True))  # masked experts have p = 0
        d_logits2 = d_logits.reshape(B, T * E)
        wg = gate_weight.float().permute(1, 0, 2).reshape(D, T * E)
        dx.addmm_(d_logits2, wg.t())
        d_gw = (x.float().t() @ d_logits2).view(D, T, E).permute(1, 0, 2).contiguous().to(gate_weight.dtype)
        if gate_bias is not None:
            d_gb = d_logits.sum(0).to(gate_bias.dtype)
    else:
        d_gates = dg.to(gates.dtype)
    return [dx.to(x.dtype), dw.to(weight.dtype), empty() if db is None else db.to(bias.dtype), d_gates, d_gw, d_gb,
            empty() if dlnw is None else dlnw.to(ln_weight.dtype), empty() if dlnb is None else dlnb.to(ln_bias.dtype)]
