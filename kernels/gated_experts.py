"""Triton forward of `mbrec_fast::gated_experts_fwd`: one kernel per layer computes, for a [BLOCK_B, BLOCK_H] tile,
every expert's GEMM tile (fp32 accumulation), bias, LayerNorm (then BLOCK_H covers H), activation, stores the
fp32 pre-activation (what the backward needs) and accumulates the T gated mixtures in fp32; the [E, B, H]
activations never reach global memory. Gate probabilities (softmax of X·Wg, masked) are computed with torch
before the launch when the op is given gate weights. Runs under TRITON_INTERPRET=1 on CPU tensors too.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["gated_experts_fwd_triton"]

ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def _gated_experts_fwd_kernel(
        x_ptr, w_ptr, b_ptr, g_ptr, lnw_ptr, lnb_ptr, out_ptr, pre_ptr,
        B, D, H, E, T, ln_eps,
        s_xe, s_xb, s_xd, s_we, s_wd, s_wh, s_gt, s_gb, s_ge, s_pe, s_pb, s_ph,
        HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, LN: tl.constexpr,
        ACT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    for e in range(E):
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            xt = tl.load(x_ptr + e * s_xe + offs_b[:, None] * s_xb + dd[None, :] * s_xd,
                         mask=mask_b[:, None] & (dd[None, :] < D), other=0.0)
            wt = tl.load(w_ptr + e * s_we + dd[:, None] * s_wd + offs_h[None, :] * s_wh,
                         mask=(dd[:, None] < D) & mask_h[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xt, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        tl.store(pre_ptr + e * s_pe + offs_b[:, None] * s_pb + offs_h[None, :] * s_ph, acc, mask=mask_bh)
        y = acc
        if LN:
            mean = tl.sum(tl.where(mask_h[None, :], y, 0.0), axis=1) / H
            cen = tl.where(mask_h[None, :], y - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(cen * cen, axis=1) / H + ln_eps)
            y = cen * rstd[:, None]
            if HAS_LNW:
                y = y * tl.load(lnw_ptr + e * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
            if HAS_LNB:
                y = y + tl.load(lnb_ptr + e * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        a = _activate(y, ACT)
        for t in range(T):
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
    from mbrec_fast._experts_ops import _gate_probs, _check_finite_value
    E, D, H = weight.shape
    B = x.shape[-2]
    # bias / LayerNorm params are indexed as dense [E, H] rows
    bias, ln_weight, ln_bias = (None if t is None else t.contiguous() for t in (bias, ln_weight, ln_bias))
    shared = x.dim() == 2
    if gates is None:
        probs = _gate_probs(x.float(), gate_weight, gate_bias, gate_mask).permute(1, 0, 2).contiguous()  # [T,B,E]
        g = probs
    else:
        _check_finite_value(gates, "gates")
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
    grid = (triton.cdiv(B, bb), triton.cdiv(H, bh))
    if B > 0:
        _gated_experts_fwd_kernel[grid](
            x, weight, bias if bias is not None else dummy, g,
            ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
            out32, pre, B, D, H, E, T, float(ln_eps),
            s_xe, s_xb, s_xd, *weight.stride(), *g.stride(), s_pe, s_pb, s_ph,
            HAS_BIAS=bias is not None, HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, LN=ln,
            ACT=ACT_CODES[activation], IEEE=x.dtype in (torch.float32, torch.float64),
            BLOCK_B=bb, BLOCK_H=bh, BLOCK_D=bd)
    return out32.to(x.dtype), pre, probs
