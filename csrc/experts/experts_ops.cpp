// Schemas of the experts op family's fused C++ passes (kernels: experts_cpu.cpp; fakes: mbrec_fast/_experts_ops.py).
// The expert layers themselves (gated_experts_* / routed_experts_*) are Python custom ops (mbrec_fast/_experts_ops.py);
// their CPU kernels call these passes around the big GEMMs, so that each direction makes one pass over [B, E, H].
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mbrec_fast, m) {
  // Forward of the gate mixture on the expert GEMM output act [B, E, H] (bias already added by the GEMM):
  // applies relu in place when `relu` (act then holds the activation) and returns out [T, B, H] with
  // out[t, b] = sum_e gates[t, b, e] * act[b, e]. gates [T, B, E], same dtype as act (fp32 or fp64).
  m.def("gated_mix_fwd(Tensor(a!) act, Tensor gates, bool relu) -> Tensor");
  // Backward of gated_mix_fwd from grad_out [T, B, H] and the saved activation act [B, E, H]: returns
  // (grad of the pre-activation [B, E, H] (relu's backward applied when `relu`), grad of gates [T, B, E],
  // bias gradient [E, H] = the pre-activation gradient summed over B, or an empty tensor unless `with_bias`).
  m.def("gated_mix_bwd(Tensor grad_out, Tensor act, Tensor gates, bool relu, bool with_bias) "
        "-> (Tensor, Tensor, Tensor)");
  // Combine of the routed layer's expert-sorted rows src [N, C] (N = B*k; row i belongs to the flat (sample, slot)
  // pair order[i], a permutation of [0, N)) back into out [B, C]: out[b] = sum_j w[b, j] * src[i(b, j)], the sum
  // over slots j in order (no zeros fill, no index_add). w [B, k] of src's dtype, or None (all ones).
  m.def("routed_combine(Tensor src, Tensor order, Tensor? route_weight, int batch) -> Tensor");
  // Backward of the routed layer's route-weight scale and relu on the sorted activation act [N, H] from
  // grad_out [B, H], with the gather of grad_out fused in: returns (grad of the pre-activation [N, H] =
  // w[pair] * grad_out[sample] (masked where act <= 0 when `relu`), grad of route_weight [B, k] = <grad_out[sample],
  // act[i]> or an empty tensor when route_weight is None).
  m.def("routed_mix_bwd(Tensor grad_out, Tensor act, Tensor order, Tensor? route_weight, bool relu) "
        "-> (Tensor, Tensor)");
  // LayerNorm experts (per-expert affine ln_weight / ln_bias [E, H], each optional) with an activation ("none",
  // "relu", "gelu", "silu") and the gate mixture, on the GEMM output pre ([B, E, H], or [E, B, H] when
  // `expert_major`, bias already added): out[t, b] = sum_e gates[t, b, e] * act(LayerNorm_e(pre[b, e])), [T, B, H].
  // pre is not modified (it is what the backward reads).
  m.def("gated_ln_mix_fwd(Tensor pre, Tensor gates, Tensor? ln_weight, Tensor? ln_bias, float eps, str activation, "
        "bool expert_major) -> Tensor");
  // Backward of gated_ln_mix_fwd from grad_out [T, B, H] (the LayerNorm statistics recomputed from pre): returns
  // (grad of pre (pre's layout), grad of gates [T, B, E], grad of the GEMM bias [E, H] (the grad of pre summed
  // over B) or empty unless `with_bias`, grad of ln_weight, grad of ln_bias (each [E, H], or empty when absent)).
  m.def("gated_ln_mix_bwd(Tensor grad_out, Tensor pre, Tensor gates, Tensor? ln_weight, Tensor? ln_bias, float eps, "
        "str activation, bool expert_major, bool with_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Routed LayerNorm experts: the combine of the expert-sorted GEMM output pre [N, H] (rows of expert e at
  // offsets[e] .. offsets[e + 1]) with the per-expert LayerNorm (ln_weight / ln_bias [E, H], each optional) and
  // the activation applied to each row on the way: out[b] = sum_j w[b, j] * act(LayerNorm_e(pre[i(b, j)])), [B, H].
  m.def("routed_ln_combine(Tensor pre, Tensor order, Tensor? route_weight, int batch, Tensor offsets, "
        "Tensor? ln_weight, Tensor? ln_bias, float eps, str activation) -> Tensor");
  // Its backward from grad_out [B, H], the statistics recomputed from pre: returns (grad of pre [N, H], grad of
  // route_weight [B, k] or empty, grad of ln_weight, grad of ln_bias ([E, H] each, or empty when absent)).
  m.def("routed_ln_mix_bwd(Tensor grad_out, Tensor pre, Tensor order, Tensor? route_weight, Tensor offsets, "
        "Tensor? ln_weight, Tensor? ln_bias, float eps, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
  // Segment GEMMs (kernels: segment_mm_cpu.cpp), the routed experts' per-expert products on expert-sorted rows:
  // segment e is rows offsets[e] .. offsets[e + 1] (int64 [E + 1], non-decreasing from 0 to a.size(0)).
  // segment_mm: out [N, M], out[s:t] = a[s:t] @ b[e] (+ bias[e]); a [N, K], b [E, K, M] or, when transpose_b,
  // [E, M, K] used as b[e]^T (the backward's dX = dY W^T); bias [E, M] or None.
  m.def("segment_mm(Tensor a, Tensor b, Tensor offsets, Tensor? bias, bool transpose_b) -> Tensor");
  // segment_mm_tn: out [E, P, M], out[e] = a[s:t]^T @ c[s:t] (the backward's dW = X^T dY; zeros for an empty
  // segment); a [N, P], c [N, M].
  m.def("segment_mm_tn(Tensor a, Tensor c, Tensor offsets) -> Tensor");
}
