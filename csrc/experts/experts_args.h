// Argument checks of the experts op family's fused passes (host side, on common/checks.h).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "common/checks.h"

namespace mbrec_fast {
namespace experts {

// act [B, E, H] fp32/fp64, gates [T, B, E] of act's dtype, grad_out (if defined) [T, B, H]; all contiguous, on
// act's device.
inline void check_mix_args(const at::Tensor& act, const at::Tensor& gates, const at::Tensor* grad_out) {
  TORCH_CHECK(act.scalar_type() == at::kFloat || act.scalar_type() == at::kDouble,
              "act must be float32 or float64, got ", act.scalar_type());
  const auto dev = act.device();
  check_tensor(act, "act", act.scalar_type(), 3, dev);
  check_tensor(gates, "gates", act.scalar_type(), 3, dev);
  TORCH_CHECK(gates.size(1) == act.size(0) && gates.size(2) == act.size(1), "gates must be [T, B, E] = [T, ",
              act.size(0), ", ", act.size(1), "], got ", gates.sizes());
  if (grad_out != nullptr) {
    check_tensor(*grad_out, "grad_out", act.scalar_type(), 3, dev);
    TORCH_CHECK(grad_out->size(0) == gates.size(0) && grad_out->size(1) == act.size(0) &&
                    grad_out->size(2) == act.size(2),
                "grad_out must be [T, B, H] = [", gates.size(0), ", ", act.size(0), ", ", act.size(2), "], got ",
                grad_out->sizes());
  }
}

// pre [B, E, H] ([E, B, H] when expert_major) fp32/fp64, gates [T, B, E], ln_weight / ln_bias (if given) [E, H],
// grad_out (if given) [T, B, H]; all of pre's dtype and device, contiguous.
inline void check_ln_mix_args(const at::Tensor& pre, const at::Tensor& gates,
                              const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                              const at::Tensor* grad_out, bool expert_major) {
  TORCH_CHECK(pre.scalar_type() == at::kFloat || pre.scalar_type() == at::kDouble,
              "pre must be float32 or float64, got ", pre.scalar_type());
  const auto dev = pre.device();
  check_tensor(pre, "pre", pre.scalar_type(), 3, dev);
  check_tensor(gates, "gates", pre.scalar_type(), 3, dev);
  const int64_t B = expert_major ? pre.size(1) : pre.size(0), E = expert_major ? pre.size(0) : pre.size(1);
  const int64_t H = pre.size(2);
  TORCH_CHECK(gates.size(1) == B && gates.size(2) == E, "gates must be [T, B, E] = [T, ", B, ", ", E, "], got ",
              gates.sizes());
  for (const auto* p : {&ln_weight, &ln_bias}) {
    if (!p->has_value()) continue;
    const char* name = p == &ln_weight ? "ln_weight" : "ln_bias";
    check_tensor(**p, name, pre.scalar_type(), 2, dev);
    TORCH_CHECK((*p)->size(0) == E && (*p)->size(1) == H, name, " must be [E, H] = [", E, ", ", H, "], got ",
                (*p)->sizes());
  }
  if (grad_out != nullptr) {
    check_tensor(*grad_out, "grad_out", pre.scalar_type(), 3, dev);
    TORCH_CHECK(grad_out->size(0) == gates.size(0) && grad_out->size(1) == B && grad_out->size(2) == H,
                "grad_out must be [T, B, H] = [", gates.size(0), ", ", B, ", ", H, "], got ", grad_out->sizes());
  }
}

// order: int64 [N] on src's device, a permutation of [0, N) with N = batch * k; returns its inverse (pos[order[i]]
// = i), built on the host side of a CPU tensor. route_weight (if defined): [batch, k] of src's dtype, contiguous.
inline std::vector<int64_t> check_route_args(const at::Tensor& src, const at::Tensor& order,
                                             const c10::optional<at::Tensor>& route_weight, int64_t batch) {
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble,
              "src must be float32 or float64, got ", src.scalar_type());
  const auto dev = src.device();
  check_tensor(src, "src", src.scalar_type(), 2, dev);
  check_tensor(order, "order", at::kLong, 1, dev);
  const int64_t N = src.size(0);
  TORCH_CHECK(order.size(0) == N, "order must have ", N, " entries (one per row of src), got ", order.size(0));
  TORCH_CHECK(batch >= 0, "batch must be >= 0, got ", batch);
  TORCH_CHECK((batch == 0 && N == 0) || (batch > 0 && N % batch == 0),
              "the rows of src (", N, ") must be batch (", batch, ") times k");
  const int64_t k = batch > 0 ? N / batch : 0;
  if (route_weight.has_value()) {
    check_tensor(*route_weight, "route_weight", src.scalar_type(), 2, dev);
    // with no samples, k cannot be read off src: any [0, k] route_weight fits
    TORCH_CHECK(route_weight->size(0) == batch && (batch == 0 || route_weight->size(1) == k), "route_weight must be [",
                batch, ", ", k, "], got ", route_weight->sizes());
  }
  std::vector<int64_t> pos(N, -1);
  const int64_t* o = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(o[i] >= 0 && o[i] < N && pos[o[i]] < 0, "order must be a permutation of [0, ", N, ")");
    pos[o[i]] = i;
  }
  return pos;
}

// Segment offsets of the rows of `rows_of` (named `name`): int64 [E + 1] on its device (CPU: read here), non-decreasing
// from 0 to rows_of.size(0); segment e is rows offsets[e] .. offsets[e + 1]. Returns E.
inline int64_t check_segment_offsets(const at::Tensor& offsets, const at::Tensor& rows_of, const char* name) {
  check_tensor(offsets, "offsets", at::kLong, 1, rows_of.device());
  TORCH_CHECK(offsets.size(0) >= 1, "offsets must have E + 1 >= 1 entries");
  const int64_t E = offsets.size(0) - 1, N = rows_of.size(0);
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[E] == N, "offsets must run from 0 to the rows of ", name, " (", N, "), got ", o[0], " .. ",
              o[E]);
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(o[e] <= o[e + 1], "offsets must be non-decreasing");
  return E;
}

// The routed LayerNorm passes' extra arguments: offsets int64 [E + 1] on pre's device, non-decreasing from 0 to
// pre.size(0); ln_weight / ln_bias (if given) [E, H] of pre's dtype, contiguous. Returns E.
inline int64_t check_routed_ln_args(const at::Tensor& pre, const at::Tensor& offsets,
                                    const c10::optional<at::Tensor>& ln_weight,
                                    const c10::optional<at::Tensor>& ln_bias) {
  const int64_t E = check_segment_offsets(offsets, pre, "pre"), H = pre.size(1);
  for (const auto* p : {&ln_weight, &ln_bias}) {
    if (!p->has_value()) continue;
    const char* name = p == &ln_weight ? "ln_weight" : "ln_bias";
    check_tensor(**p, name, pre.scalar_type(), 2, pre.device());
    TORCH_CHECK((*p)->size(0) == E && (*p)->size(1) == H, name, " must be [E, H] = [", E, ", ", H, "], got ",
                (*p)->sizes());
  }
  return E;
}

// segment_mm: a [N, K] fp32/fp64, b [E, K, M] ([E, M, K] when transpose_b) and bias (if given) [E, M] of a's dtype,
// offsets as check_segment_offsets with E = b.size(0). Returns (E, K, M).
inline std::array<int64_t, 3> check_segment_mm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                                    const c10::optional<at::Tensor>& bias, bool transpose_b) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "a must be float32 or float64, got ", a.scalar_type());
  check_tensor(a, "a", a.scalar_type(), 2, a.device());
  check_tensor(b, "b", a.scalar_type(), 3, a.device());
  const int64_t E = check_segment_offsets(offsets, a, "a"), K = a.size(1);
  TORCH_CHECK(b.size(0) == E, "b must have one matrix per segment (E = offsets.size(0) - 1 = ", E, "), got ", b.size(0));
  TORCH_CHECK(b.size(transpose_b ? 2 : 1) == K, "b must be [E, ", transpose_b ? "M, K" : "K, M", "] with K = a.size(1) = ",
              K, ", got ", b.sizes());
  const int64_t M = b.size(transpose_b ? 1 : 2);
  if (bias.has_value()) {
    check_tensor(*bias, "bias", a.scalar_type(), 2, a.device());
    TORCH_CHECK(bias->size(0) == E && bias->size(1) == M, "bias must be [E, M] = [", E, ", ", M, "], got ",
                bias->sizes());
  }
  return {E, K, M};
}

// segment_mm_tn: a [N, P] and c [N, M] of one dtype (fp32/fp64), offsets as check_segment_offsets. Returns E.
inline int64_t check_segment_mm_tn_args(const at::Tensor& a, const at::Tensor& c, const at::Tensor& offsets) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "a must be float32 or float64, got ", a.scalar_type());
  check_tensor(a, "a", a.scalar_type(), 2, a.device());
  check_tensor(c, "c", a.scalar_type(), 2, a.device());
  TORCH_CHECK(c.size(0) == a.size(0), "c must have the rows of a (", a.size(0), "), got ", c.size(0));
  return check_segment_offsets(offsets, a, "a");
}

}  // namespace experts
}  // namespace mbrec_fast
