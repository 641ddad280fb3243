"""The torch implementation of the expert ops (their CPU kernels, and the CUDA kernels' fp64 path) and the
helpers the Triton launchers share (route sorting, value checks).

A leaf module: apart from the package's checks (`_checks`), it imports neither `mbrec_fast._experts_ops` (which registers these functions as the ops' default
kernels) nor `mbrec_fast.kernels` (the Triton launchers, which import from here), so there is no import circle.

The default implementation of every op is the "concatenated-weights" path: all experts share X, so the E small
GEMMs become ONE GEMM of X[B, D] against the expert weights laid side by side [D, E*H]; bias is folded into that
GEMM (addmm), then LayerNorm, activation and the gated reduction run on the [B, E, H] block. The forward stores one
fp32 [B, E, H] tensor (the size of the expert outputs) and the gate probabilities [T, B, E]: for relu/none without
LayerNorm it is the activation itself (relu applied in place to the GEMM output; its derivative follows from it, so
the backward recomputes nothing), otherwise the pre-activation, from which the backward recomputes
LayerNorm/activation.

Computation is always in fp32 (fp16/bf16 inputs are upcast; fp32 accumulation), outputs and gradients are cast
back to the dtype of the tensor they belong to.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_finite

__all__ = ["ACTIVATIONS", "EMPTY_SHAPE", "activate", "compute_dtype", "check_finite_value", "sort_routes",
           "check_route", "saves_gathered_x", "gated_experts_fwd_torch", "gated_experts_bwd_torch",
           "routed_experts_fwd_torch", "routed_experts_bwd_torch"]


ACTIVATIONS = ("none", "relu", "gelu", "silu")
EMPTY_SHAPE = (0,)  # the shape of an absent gradient / absent gate probabilities


def activate(y: Tensor, activation: str) -> Tensor:
    """The expert activation by name: "relu", "gelu" (exact erf), "silu" or "none" (identity)."""
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "silu":
        return F.silu(y)
    return y


def _act_grad(y: Tensor, activation: str) -> Optional[Tensor]:
    """Derivative of the activation at y (None for the identity)."""
    if activation == "relu":
        return (y > 0).to(y.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(y * 0.7071067811865476))
        pdf = torch.exp(-0.5 * y * y) * 0.3989422804014327
        return cdf + y * pdf
    if activation == "silu":
        s = torch.sigmoid(y)
        return s * (1.0 + y * (1.0 - s))
    return None


def _layer_norm_stats(pre: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Normalized values and 1/std over the last dim (fp32)."""
    # native_layer_norm is one fused pass; var_mean + arithmetic was ~4x slower on CPU.
    normed, _, rstd = torch.native_layer_norm(pre, [pre.shape[-1]], None, None, eps)
    return normed, rstd


def _has_ln(ln_weight: Optional[Tensor], ln_bias: Optional[Tensor]) -> bool:
    return ln_weight is not None or ln_bias is not None


def _empty_like_dtype(ref: Tensor) -> Tensor:
    return ref.new_empty(EMPTY_SHAPE)


def compute_dtype(t: Tensor) -> torch.dtype:
    """Compute dtype: fp64 stays fp64 (gradcheck), everything else runs in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_finite_value(t: Optional[Tensor], name: str) -> None:
    """An optional tensor through the package's one finiteness check (`mbrec_fast._checks.check_finite`)."""
    if t is not None:
        check_finite(t, name)


def _gate_probs(x32: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], gate_mask: Optional[Tensor]) -> Tensor:
    """Masked softmax gate probabilities [B, T, E] (fp32) from X[B, D], Wg[T, D, E], bg[T, E]."""
    T, D, E = gate_weight.shape
    x = x32
    wg = gate_weight.to(compute_dtype(x)).permute(1, 0, 2).reshape(D, T * E)
    if gate_bias is not None:
        logits = torch.addmm(gate_bias.to(compute_dtype(x)).reshape(T * E), x32, wg)
    else:
        logits = x32 @ wg
    logits = logits.view(-1, T, E)
    if gate_mask is not None:
        logits = logits.masked_fill(~gate_mask.view(1, T, E), float("-inf"))
    return torch.softmax(logits, dim=-1)


FUSED_GEMM = True  # the expert GEMMs on CPU run the C++ segment GEMMs (False: torch.mm / bmm, for comparison)


def _segment_gemms(t: Tensor) -> bool:
    """Whether this call's expert GEMMs run `segment_mm` / `segment_mm_tn` (csrc/experts/segment_mm_cpu.cpp: the
    register-blocked AVX-512 / AVX2 kernel for fp32, at::mm otherwise): CPU tensors, unless FUSED_GEMM is off."""
    return FUSED_GEMM and t.device.type == "cpu"


def _equal_segments(n_segments: int, rows: int) -> Tensor:
    """offsets [n_segments + 1] of n_segments consecutive segments of `rows` rows each."""
    return torch.arange(0, (n_segments + 1) * rows, rows, dtype=torch.int64) if rows > 0 else \
        torch.zeros(n_segments + 1, dtype=torch.int64)


def _w_cat(weight: Tensor, cdt: torch.dtype) -> Tensor:
    """The shared-input experts' weights side by side: [D, E*H] (column e*H + h = weight[e, :, h])."""
    E, D, H = weight.shape
    return weight.to(cdt).permute(1, 0, 2).reshape(D, E * H)


def _expert_pre(x32: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Pre-activation of every expert: [B, E, H] for shared X[B, D], [E, B, H] for per-expert X[E, B, D]."""
    E, D, H = weight.shape
    cdt = x32.dtype
    b32 = None if bias is None else bias.to(cdt)
    if x32.dim() == 2:
        w_cat = _w_cat(weight, cdt)
        if _segment_gemms(x32):  # one segment: all of X times W_cat
            pre = torch.ops.mbrec_fast.segment_mm(x32.contiguous(), w_cat.unsqueeze(0), _equal_segments(1, x32.shape[0]),
                                                  None if b32 is None else b32.reshape(1, E * H), False)
        elif b32 is not None:
            pre = torch.addmm(b32.reshape(E * H), x32, w_cat)
        else:
            pre = x32 @ w_cat
        return pre.view(x32.shape[0], E, H)
    B = x32.shape[1]
    if _segment_gemms(x32):  # segment e: expert e's rows X[e] times weight[e]
        pre = torch.ops.mbrec_fast.segment_mm(x32.reshape(E * B, D).contiguous(), weight.to(cdt).contiguous(),
                                              _equal_segments(E, B), None if b32 is None else b32.contiguous(), False)
        return pre.view(E, B, H)
    if b32 is not None:
        return torch.baddbmm(b32.unsqueeze(1), x32, weight.to(cdt))
    return torch.bmm(x32, weight.to(cdt))


def _expert_input_grads(dpre: Tensor, x32: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(dX, dW) of the gated experts' GEMMs from the pre-activation gradient ([B, E, H] for shared X[B, D], [E, B, H]
    for per-expert X[E, B, D]): dX of X's shape (compute dtype), dW [E, D, H]."""
    E, D, H = weight.shape
    cdt = dpre.dtype
    if x32.dim() == 2:
        B = x32.shape[0]
        dpre2 = dpre.reshape(B, E * H).contiguous()
        if _segment_gemms(x32):
            one = _equal_segments(1, B)
            w_cat_t = weight.to(cdt).transpose(1, 2).reshape(1, E * H, D).contiguous()  # W_cat^T, laid out once
            dx = torch.ops.mbrec_fast.segment_mm(dpre2, w_cat_t, one, None, False)
            dw_cat = torch.ops.mbrec_fast.segment_mm_tn(x32.contiguous(), dpre2, one)[0]
        else:
            dx = dpre2 @ _w_cat(weight, cdt).t()
            dw_cat = x32.t() @ dpre2
        return dx, dw_cat.view(D, E, H).permute(1, 0, 2).contiguous()
    B = x32.shape[1]
    if _segment_gemms(x32):
        segs = _equal_segments(E, B)
        dpre_rows = dpre.reshape(E * B, H).contiguous()
        dx = torch.ops.mbrec_fast.segment_mm(dpre_rows, weight.to(cdt).contiguous(), segs, None, True)
        dw = torch.ops.mbrec_fast.segment_mm_tn(x32.reshape(E * B, D).contiguous(), dpre_rows, segs)
        return dx.view(E, B, D), dw
    return torch.bmm(dpre, weight.to(cdt).transpose(1, 2)), torch.bmm(x32.transpose(1, 2), dpre)


def _normalize_activate(pre_beh: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], ln_eps: float,
                        activation: str) -> Tensor:
    """LayerNorm (per expert, over H) then activation on a [B, E, H] view."""
    y = pre_beh
    if _has_ln(ln_weight, ln_bias):
        y, _ = _layer_norm_stats(y, ln_eps)
        if ln_weight is not None:
            y = y * ln_weight.to(y.dtype)
        if ln_bias is not None:
            y = y + ln_bias.to(y.dtype)
    return activate(y, activation)


def _saves_activation(activation: str, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor]) -> bool:
    """The gated forward's saved tensor is the activation itself (relu or none, no LayerNorm: the derivative
    follows from the output, so the backward recomputes nothing), else the pre-activation."""
    return activation in ("relu", "none") and not _has_ln(ln_weight, ln_bias)


def _uses_fused_mix(pre: Tensor, x: Tensor, activation: str, ln_weight: Optional[Tensor],
                    ln_bias: Optional[Tensor]) -> bool:
    """The C++ gate-mixture passes (`mbrec_fast::gated_mix_fwd` / `gated_mix_bwd`, CPU only) serve shared X with
    relu/none and no LayerNorm: the saved tensor is then the activation [B, E, H] they read."""
    return pre.device.type == "cpu" and x.dim() == 2 and _saves_activation(activation, ln_weight, ln_bias)


def _uses_ln_mix(pre: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor]) -> bool:
    """The C++ LayerNorm passes (`mbrec_fast::gated_ln_mix_fwd` / `gated_ln_mix_bwd`, CPU only) serve every
    LayerNorm call (shared or per-expert X, any activation): the saved tensor is the pre-activation, and the
    backward recomputes the row statistics and the activation from it in the same pass."""
    return FUSED_LN and pre.device.type == "cpu" and _has_ln(ln_weight, ln_bias)


FUSED_LN = True  # the LayerNorm C++ passes serve the CPU path (False: the plain torch form, for comparison)


def _ln_param(t: Optional[Tensor], cdt: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(cdt).contiguous()


def _gate_tensor(x32: Tensor, x: Tensor, gates, gate_weight, gate_bias, gate_mask) -> Tuple[Tensor, Tensor]:
    """(gates [T, B, E] of the compute dtype, contiguous; the saved probabilities or an empty tensor)."""
    if gates is None:
        probs_out = _gate_probs(x32, gate_weight, gate_bias, gate_mask).permute(1, 0, 2).contiguous()
        return probs_out, probs_out
    return gates.to(compute_dtype(x)).contiguous(), x.new_empty(EMPTY_SHAPE, dtype=compute_dtype(x))


def gated_experts_fwd_torch(x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias, ln_eps,
                            activation):
    """Torch implementation of the gated forward (CPU kernel; the CUDA kernel for fp64 inputs)."""
    check_finite_value(gates, "gates")
    x32 = x.to(compute_dtype(x))
    pre = _expert_pre(x32, weight, bias)
    if _uses_ln_mix(pre, ln_weight, ln_bias):
        cdt = compute_dtype(x)
        g, probs_out = _gate_tensor(x32, x, gates, gate_weight, gate_bias, gate_mask)
        # one C++ pass over the rows of pre: LayerNorm, affine, activation and the mixture into [T, B, H]
        out = torch.ops.mbrec_fast.gated_ln_mix_fwd(pre, g, _ln_param(ln_weight, cdt), _ln_param(ln_bias, cdt),
                                                    ln_eps, activation, x.dim() == 3)
        return out.to(x.dtype), pre, probs_out
    if _uses_fused_mix(pre, x, activation, ln_weight, ln_bias):
        g, probs_out = _gate_tensor(x32, x, gates, gate_weight, gate_bias, gate_mask)
        # one C++ pass over [B, E, H]: relu in place (pre becomes the activation) and the mixture into [T, B, H]
        out = torch.ops.mbrec_fast.gated_mix_fwd(pre, g, activation == "relu")
        return out.to(x.dtype), pre, probs_out
    if _saves_activation(activation, ln_weight, ln_bias):
        if activation == "relu":
            pre = pre.relu_()  # the fresh GEMM output becomes the activation: no second [B, E, H] tensor
        a = pre if x.dim() == 2 else pre.permute(1, 0, 2)
    else:
        pre_beh = pre if x.dim() == 2 else pre.permute(1, 0, 2)
        a = _normalize_activate(pre_beh, ln_weight, ln_bias, ln_eps, activation)
    if gates is None:
        probs = _gate_probs(x32, gate_weight, gate_bias, gate_mask)  # [B, T, E]
        g = probs
        probs_out = probs.permute(1, 0, 2).contiguous()
    else:
        g = gates.to(compute_dtype(x)).permute(1, 0, 2)
        probs_out = x.new_empty(EMPTY_SHAPE, dtype=compute_dtype(x))
    out = torch.bmm(g, a)  # [B, T, H]
    out = out.permute(1, 0, 2).to(x.dtype).contiguous()
    return out, pre, probs_out


def gated_experts_bwd_torch(grad_out, x, weight, bias, gates, gate_weight, gate_bias, gate_mask, ln_weight, ln_bias,
                            ln_eps, activation, pre, probs):
    """Torch implementation of the gated backward (CPU kernel; the CUDA kernel's fp64 fallback)."""
    E, D, H = weight.shape
    shared = x.dim() == 2
    x32 = x.to(compute_dtype(x))
    if _uses_fused_mix(pre, x, activation, ln_weight, ln_bias) or _uses_ln_mix(pre, ln_weight, ln_bias):
        return _gated_bwd_fused(grad_out, x32, x, weight, bias, gates, gate_weight, gate_bias, activation, pre, probs,
                                ln_weight, ln_bias, ln_eps)
    g = probs.permute(1, 0, 2) if gates is None else gates.to(compute_dtype(x)).permute(1, 0, 2)  # [B, T, E]
    go = grad_out.to(compute_dtype(x)).permute(1, 0, 2).contiguous()  # [B, T, H]
    pre_beh = pre if shared else pre.permute(1, 0, 2)  # [B, E, H]
    with_ln = _has_ln(ln_weight, ln_bias)
    if with_ln:
        xhat, ln_mean, rstd = torch.native_layer_norm(pre_beh, [H], None, None, ln_eps)
        y = xhat * ln_weight.to(compute_dtype(x)) if ln_weight is not None else xhat
        if ln_bias is not None:
            y = y + ln_bias.to(compute_dtype(x))
    else:
        y = pre_beh
    # relu/none without LayerNorm: `pre` holds the activation already (see _saves_activation)
    a = y if _saves_activation(activation, ln_weight, ln_bias) else activate(y, activation)
    d_a = torch.bmm(g.transpose(1, 2), go)  # [B, E, H]
    d_g = torch.bmm(go, a.transpose(1, 2))  # [B, T, E]
    if activation == "relu":  # one fused pass, in place: d_a where a > 0
        dy = torch.ops.aten.threshold_backward.grad_input(d_a, a, 0, grad_input=d_a)
    else:
        dact = _act_grad(y, activation)
        dy = d_a if dact is None else d_a.mul_(dact)
    del a
    d_lnw, d_lnb = _empty_like_dtype(x), _empty_like_dtype(x)
    if with_ln:
        if ln_weight is not None:
            d_lnw = (dy * xhat).sum(0).to(ln_weight.dtype)
            dxhat = dy * ln_weight.to(compute_dtype(x))
        else:
            dxhat = dy
        if ln_bias is not None:
            d_lnb = dy.sum(0).to(ln_bias.dtype)
        # one fused pass (the loop's F.layer_norm backward uses the same kernel)
        dpre = torch.ops.aten.native_layer_norm_backward(dxhat, pre_beh, [H], ln_mean, rstd, None, None,
                                                         [True, False, False])[0]
    else:
        dpre = dy
    if shared:
        dx, dw = _expert_input_grads(dpre, x32, weight)
        db = dpre.reshape(-1, E * H).sum(0).view(E, H) if bias is not None else None
    else:
        dpre_e = dpre.permute(1, 0, 2)  # [E, B, H]
        dx, dw = _expert_input_grads(dpre_e, x32, weight)
        db = dpre_e.sum(1) if bias is not None else None
    d_gates, d_gw, d_gb = _empty_like_dtype(x), _empty_like_dtype(x), _empty_like_dtype(x)
    if gates is None:
        T = gate_weight.shape[0]
        d_logits = g * (d_g - (g * d_g).sum(-1, keepdim=True))  # softmax backward; masked entries have g = 0
        d_logits2 = d_logits.reshape(-1, T * E)
        wg = gate_weight.to(compute_dtype(x)).permute(1, 0, 2).reshape(D, T * E)
        dx = dx.addmm_(d_logits2, wg.t())
        d_gw = (x32.t() @ d_logits2).view(D, T, E).permute(1, 0, 2).contiguous().to(gate_weight.dtype)
        if gate_bias is not None:
            d_gb = d_logits.sum(0).to(gate_bias.dtype)
    else:
        d_gates = d_g.permute(1, 0, 2).contiguous().to(gates.dtype)
    return [dx.to(x.dtype), dw.to(weight.dtype), _empty_like_dtype(x) if db is None else db.to(bias.dtype), d_gates, d_gw, d_gb,
            d_lnw, d_lnb]


def _gated_bwd_fused(grad_out, x32, x, weight, bias, gates, gate_weight, gate_bias, activation, pre, probs,
                     ln_weight=None, ln_bias=None, ln_eps=1e-5):
    """The gated backward around one C++ pass over the rows of pre (`mbrec_fast::gated_mix_bwd` for relu/none
    without LayerNorm, `gated_ln_mix_bwd` with LayerNorm: the mixture's backward, the activation's and the
    LayerNorm's backward and the bias / affine sums); the two GEMMs and the small gate products stay in torch."""
    E, D, H = weight.shape
    cdt = compute_dtype(x)
    g = (probs if gates is None else gates.to(cdt)).contiguous()  # [T, B, E]
    d_lnw, d_lnb = _empty_like_dtype(x), _empty_like_dtype(x)
    if _has_ln(ln_weight, ln_bias):
        dpre, d_g, db, d_lnw, d_lnb = torch.ops.mbrec_fast.gated_ln_mix_bwd(
            grad_out.to(cdt).contiguous(), pre.contiguous(), g, _ln_param(ln_weight, cdt), _ln_param(ln_bias, cdt),
            ln_eps, activation, x.dim() == 3, bias is not None)
        d_lnw = d_lnw.to(ln_weight.dtype) if ln_weight is not None else _empty_like_dtype(x)
        d_lnb = d_lnb.to(ln_bias.dtype) if ln_bias is not None else _empty_like_dtype(x)
    else:
        dpre, d_g, db = torch.ops.mbrec_fast.gated_mix_bwd(grad_out.to(cdt).contiguous(), pre.contiguous(), g,
                                                           activation == "relu", bias is not None)
    dx, dw = _expert_input_grads(dpre, x32, weight)  # per-expert inputs: pre and dpre are [E, B, H]
    d_gates, d_gw, d_gb = _empty_like_dtype(x), _empty_like_dtype(x), _empty_like_dtype(x)
    if gates is None:
        T = gate_weight.shape[0]
        gb, d_gb_te = g.permute(1, 0, 2), d_g.permute(1, 0, 2)  # [B, T, E] views
        d_logits = (gb * (d_gb_te - (gb * d_gb_te).sum(-1, keepdim=True))).reshape(-1, T * E)  # softmax backward
        wg = gate_weight.to(cdt).permute(1, 0, 2).reshape(D, T * E)
        dx = dx.addmm_(d_logits, wg.t())
        d_gw = (x32.t() @ d_logits).view(D, T, E).permute(1, 0, 2).contiguous().to(gate_weight.dtype)
        if gate_bias is not None:
            d_gb = d_logits.sum(0).view(T, E).to(gate_bias.dtype)
    else:
        d_gates = d_g.to(gates.dtype)
    return [dx.to(x.dtype), dw.to(weight.dtype), _empty_like_dtype(x) if bias is None else db.to(bias.dtype), d_gates,
            d_gw, d_gb, d_lnw, d_lnb]


def sort_routes(route: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """(order [N], offsets [E+1]): flat (sample, slot) pairs sorted by expert id, and each expert's row range."""
    flat = route.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=route.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def _row_ln_params(t: Optional[Tensor], sorted_expert: Tensor) -> Optional[Tensor]:
    return None if t is None else t.to(compute_dtype(t)).index_select(0, sorted_expert)


def check_route(route: Tensor, num_experts: int) -> None:
    if route.numel():
        lo, hi = int(route.min()), int(route.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"route ids must lie in [0, {num_experts}) (num_experts = weight.shape[0]), "
                             f"found [{lo}, {hi}]")


FUSED_ROUTED = True  # the routed C++ passes below serve the CPU path (False: the plain torch form, for comparison)


def saves_gathered_x(x: Tensor, activation: str, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor]) -> bool:
    """Whether the C++ routed passes serve this call (CPU only): `routed_combine` / `routed_mix_bwd` for relu/none
    without LayerNorm (the saved sorted tensor is the activation they read), `routed_ln_combine` /
    `routed_ln_mix_bwd` with LayerNorm (the saved tensor is the pre-activation; they recompute the rest). Then
    routed_experts_fwd also returns the gathered X [B*k, D] (compute dtype) for its backward; elsewhere that output
    is empty (the fake and the Triton launcher use this too). `x`: any tensor on the call's device."""
    return FUSED_ROUTED and x.device.type == "cpu" and (_saves_activation(activation, ln_weight, ln_bias)
                                                        or _has_ln(ln_weight, ln_bias))


def routed_experts_fwd_torch(x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation):
    """Torch implementation of the routed forward (CPU kernel; the CUDA kernel for fp64 inputs)."""
    E, D, H = weight.shape
    B, k = route.shape
    check_route(route, E)
    check_finite_value(route_weight, "route_weight")
    order, offsets = sort_routes(route, E)
    rows = torch.div(order, k, rounding_mode="floor")
    xs = x.to(compute_dtype(x)).index_select(0, rows)
    w32 = weight.to(compute_dtype(x))
    b32 = None if bias is None else bias.to(compute_dtype(x))
    if _segment_gemms(xs):
        # the per-expert GEMMs in one C++ call (csrc/experts/segment_mm_cpu.cpp: the register-blocked kernel)
        pre = torch.ops.mbrec_fast.segment_mm(xs, w32.contiguous(), offsets,
                                              None if b32 is None else b32.contiguous(), False)
    else:
        pre = xs.new_empty((B * k, H))
        bounds = offsets.tolist()
        for e in range(E):
            s, t = bounds[e], bounds[e + 1]
            if t > s:
                if b32 is not None:
                    torch.addmm(b32[e], xs[s:t], w32[e], out=pre[s:t])
                else:
                    torch.mm(xs[s:t], w32[e], out=pre[s:t])
    if saves_gathered_x(pre, activation, ln_weight, ln_bias) and _has_ln(ln_weight, ln_bias):
        cdt = compute_dtype(x)
        rw = None if route_weight is None else route_weight.to(cdt).contiguous()
        # one C++ pass: LayerNorm, affine, activation, route-weight scale and the sum over slots, into out [B, H]
        out = torch.ops.mbrec_fast.routed_ln_combine(pre, order, rw, B, offsets, _ln_param(ln_weight, cdt),
                                                     _ln_param(ln_bias, cdt), ln_eps, activation)
        return out.to(x.dtype), pre, order, offsets, xs
    if saves_gathered_x(pre, activation, ln_weight, ln_bias):
        if activation == "relu":
            pre = pre.relu_()  # the saved tensor is the activation (as gated)
        rw = None if route_weight is None else route_weight.to(compute_dtype(x)).contiguous()
        # one C++ pass: the route-weight scale and the sum over slots, straight into out [B, H] (no zeros, no scatter)
        out = torch.ops.mbrec_fast.routed_combine(pre, order, rw, B)
        return out.to(x.dtype), pre, order, offsets, xs  # xs saved: the backward's dW GEMMs read it, no second gather
    sorted_expert = route.reshape(-1).index_select(0, order)
    if _saves_activation(activation, ln_weight, ln_bias):  # the saved tensor is the activation (as gated)
        a = pre.relu_() if activation == "relu" else pre
    else:
        a = _routed_activate(pre, sorted_expert, ln_weight, ln_bias, ln_eps, activation)
    if route_weight is not None:
        a = a * route_weight.reshape(-1).to(compute_dtype(x)).index_select(0, order).unsqueeze(1)
    out = a.new_zeros((B, H))
    if k == 1:
        out.index_copy_(0, rows, a)
    else:
        out.index_add_(0, rows, a)
    return out.to(x.dtype), pre, order, offsets, xs.new_empty(EMPTY_SHAPE)


def _routed_activate(pre, sorted_expert, ln_weight, ln_bias, ln_eps, activation):
    y = pre
    if _has_ln(ln_weight, ln_bias):
        y, _ = _layer_norm_stats(y, ln_eps)
        if ln_weight is not None:
            y = y * _row_ln_params(ln_weight, sorted_expert)
        if ln_bias is not None:
            y = y + _row_ln_params(ln_bias, sorted_expert)
    return activate(y, activation)


def _routed_group_grads(dpre: Tensor, xs: Tensor, weight: Tensor, offsets: Tensor,
                        with_bias: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The routed backward's per-expert GEMMs on the sorted rows: (dX rows [N, D] (sorted), dW [E, D, H], db [E, H]
    or None); an expert with no rows gets zero dW and db. On CPU the two C++ segment GEMMs, elsewhere (or with
    FUSED_GEMM off) one torch.mm pair per expert."""
    E, D, H = weight.shape
    cdt = dpre.dtype
    w32 = weight.to(cdt)
    bounds = offsets.tolist()
    segments = list(zip(bounds[:-1], bounds[1:]))
    if _segment_gemms(dpre):
        dxs = torch.ops.mbrec_fast.segment_mm(dpre, w32.contiguous(), offsets, None, True)
        dw = torch.ops.mbrec_fast.segment_mm_tn(xs, dpre, offsets)
    else:
        dxs = torch.empty(dpre.shape[0], D, dtype=cdt, device=dpre.device)
        dw = torch.zeros(E, D, H, dtype=cdt, device=dpre.device)
        for e, (s, t) in enumerate(segments):
            if t > s:
                torch.mm(dpre[s:t], w32[e].t(), out=dxs[s:t])
                torch.mm(xs[s:t].t(), dpre[s:t], out=dw[e])
    db = torch.stack([dpre[s:t].sum(0) for s, t in segments]) if with_bias else None  # zeros for no rows
    return dxs, dw, db


def routed_experts_bwd_torch(grad_out, x, weight, bias, route, route_weight, ln_weight, ln_bias, ln_eps, activation,
                             pre, order, offsets, xs):
    """Torch implementation of the routed backward (CPU kernel; the CUDA kernel's fp64 fallback). `xs` is the
    forward's gathered X, or empty (then gathered here)."""
    E, D, H = weight.shape
    B, k = route.shape
    N = B * k
    rows = torch.div(order, k, rounding_mode="floor")
    if saves_gathered_x(pre, activation, ln_weight, ln_bias):
        return _routed_bwd_fused(grad_out, x, weight, bias, route_weight, activation, pre, order, offsets, rows, xs,
                                 ln_weight, ln_bias, ln_eps)
    sorted_expert = route.reshape(-1).index_select(0, order)
    go = grad_out.to(compute_dtype(x)).index_select(0, rows)  # [N, H]
    with_ln = _has_ln(ln_weight, ln_bias)
    if with_ln:
        xhat, ln_mean, rstd = torch.native_layer_norm(pre, [H], None, None, ln_eps)
        lnw_rows = _row_ln_params(ln_weight, sorted_expert)
        y = xhat * lnw_rows if ln_weight is not None else xhat
        if ln_bias is not None:
            y = y + _row_ln_params(ln_bias, sorted_expert)
    else:
        y = pre
    d_rw = _empty_like_dtype(x)
    if route_weight is not None:
        # relu/none without LayerNorm: `pre` holds the activation already (see _saves_activation)
        a = y if _saves_activation(activation, ln_weight, ln_bias) else activate(y, activation)
        d_rw_sorted = (go * a).sum(-1)
        del a
        d_rw = torch.zeros(N, dtype=compute_dtype(x), device=x.device).index_copy_(0, order, d_rw_sorted)
        d_rw = d_rw.view(B, k).to(route_weight.dtype)
        go = go.mul_(route_weight.reshape(-1).to(compute_dtype(x)).index_select(0, order).unsqueeze(1))
    if activation == "relu":  # one fused pass, in place (go is this function's own gathered copy): go where y > 0
        dy = torch.ops.aten.threshold_backward.grad_input(go, y, 0, grad_input=go)
    else:
        dact = _act_grad(y, activation)
        dy = go if dact is None else go * dact
    d_lnw, d_lnb = _empty_like_dtype(x), _empty_like_dtype(x)
    if with_ln:
        if ln_weight is not None:
            d_lnw = torch.zeros(E, H, dtype=compute_dtype(x), device=x.device).index_add_(0, sorted_expert, dy * xhat).to(ln_weight.dtype)
            dxhat = dy * lnw_rows
        else:
            dxhat = dy
        if ln_bias is not None:
            d_lnb = torch.zeros(E, H, dtype=compute_dtype(x), device=x.device).index_add_(0, sorted_expert, dy).to(ln_bias.dtype)
        # one fused pass (the loop's F.layer_norm backward uses the same kernel)
        dpre = torch.ops.aten.native_layer_norm_backward(dxhat, pre, [H], ln_mean, rstd, None, None,
                                                         [True, False, False])[0]
    else:
        dpre = dy
    xs = x.to(compute_dtype(x)).index_select(0, rows)
    dxs, dw, db = _routed_group_grads(dpre, xs, weight, offsets, bias is not None)
    dx = torch.zeros(B, D, dtype=compute_dtype(x), device=x.device)
    if k == 1:
        dx.index_copy_(0, rows, dxs)
    else:
        dx.index_add_(0, rows, dxs)
    return [dx.to(x.dtype), dw.to(weight.dtype), _empty_like_dtype(x) if bias is None else db.to(bias.dtype), d_rw, d_lnw, d_lnb]


def _routed_bwd_fused(grad_out, x, weight, bias, route_weight, activation, pre, order, offsets, rows, xs,
                      ln_weight=None, ln_bias=None, ln_eps=1e-5):
    """The routed backward around two C++ passes: `routed_mix_bwd` (gather of grad_out, route-weight scale and its
    gradient, relu's backward; with LayerNorm `routed_ln_mix_bwd`, which also recomputes the row's LayerNorm and
    activation and returns the affine gradients) before the per-expert GEMMs, `routed_combine` (the sum of the
    slots' dx) after."""
    D = weight.shape[1]
    B = grad_out.shape[0]
    cdt = compute_dtype(x)
    rw = None if route_weight is None else route_weight.to(cdt).contiguous()
    d_lnw, d_lnb = _empty_like_dtype(x), _empty_like_dtype(x)
    if _has_ln(ln_weight, ln_bias):
        dpre, d_rw, d_lnw, d_lnb = torch.ops.mbrec_fast.routed_ln_mix_bwd(
            grad_out.to(cdt).contiguous(), pre.contiguous(), order, rw, offsets, _ln_param(ln_weight, cdt),
            _ln_param(ln_bias, cdt), ln_eps, activation)
        d_lnw = d_lnw.to(ln_weight.dtype) if ln_weight is not None else _empty_like_dtype(x)
        d_lnb = d_lnb.to(ln_bias.dtype) if ln_bias is not None else _empty_like_dtype(x)
    else:
        dpre, d_rw = torch.ops.mbrec_fast.routed_mix_bwd(grad_out.to(cdt).contiguous(), pre.contiguous(), order, rw,
                                                         activation == "relu")
    if xs.numel() != dpre.shape[0] * D or xs.dtype != cdt:  # not saved by the forward (e.g. a direct op call)
        xs = x.to(cdt).index_select(0, rows)
    dxs, dw, db = _routed_group_grads(dpre, xs, weight, offsets, bias is not None)
    dx = torch.ops.mbrec_fast.routed_combine(dxs, order, None, B)
    d_rw = _empty_like_dtype(x) if route_weight is None else d_rw.to(route_weight.dtype)
    return [dx.to(x.dtype), dw.to(weight.dtype), _empty_like_dtype(x) if bias is None else db.to(bias.dtype), d_rw,
            d_lnw, d_lnb]
