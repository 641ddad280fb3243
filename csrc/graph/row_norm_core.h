// Row L2 normalisation's per-row core, shared by the CPU kernel (graph_cpu.cpp) and the CUDA kernel
// (graph_cuda.cu): y = x * s with s = 1 / max(|x|, eps), and its backward dx = (g - y <g, y>) * s, where <g, y> is
// taken as 0 on rows whose norm was clamped (there y = x / eps is linear in x). Every sum is eight interleaved
// partial sums (entry j into lane j mod 8, each product rounded before its addition: no fused multiply-add) folded
// in one fixed tree, so a value depends neither on the backend nor on the thread count. Torch-free.
//
// Rounding: the device side uses __fmul_rn / __fadd_rn, which nvcc never contracts; the host side relies on the
// CPU translation unit being compiled for the baseline instruction set (x86-64 has no FMA there, so the compiler
// cannot contract a * b + c).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/hd.h"

namespace mbrec_fast {

template <typename scalar_t>
MBREC_HD scalar_t rn_mul(scalar_t a, scalar_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(scalar_t) == 4) return __fmul_rn(a, b); else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename scalar_t>
MBREC_HD scalar_t rn_add(scalar_t a, scalar_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(scalar_t) == 4) return __fadd_rn(a, b); else return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// <a, b> over d entries in the fixed order above.
template <typename scalar_t>
MBREC_HD scalar_t row_dot(const scalar_t* a, const scalar_t* b, int64_t d) {
  scalar_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int l = 0; l < 8; ++l) lane[l] = rn_add(lane[l], rn_mul(a[j + l], b[j + l]));
  }
  for (int l = 0; j < d; ++j, ++l) lane[l] = rn_add(lane[l], rn_mul(a[j], b[j]));
  return rn_add(rn_add(rn_add(lane[0], lane[4]), rn_add(lane[2], lane[6])),
                rn_add(rn_add(lane[1], lane[5]), rn_add(lane[3], lane[7])));
}

// s = 1 / max(norm, eps), the scale of a row of norm `norm`.
template <typename scalar_t>
MBREC_HD scalar_t row_l2_scale(scalar_t norm, scalar_t eps) {
  return scalar_t(1) / (norm <= eps ? eps : norm);  // a NaN norm stays NaN, as in F.normalize
}

// One row forward: y = x * s; returns the row's norm sqrt(<x, x>) (unclamped).
template <typename scalar_t>
MBREC_HD scalar_t row_l2_normalize_row(const scalar_t* x, scalar_t* y, int64_t d, scalar_t eps) {
#if defined(__CUDA_ARCH__)
  const scalar_t norm = sqrt(row_dot(x, x, d));
#else
  const scalar_t norm = std::sqrt(row_dot(x, x, d));
#endif
  const scalar_t s = row_l2_scale(norm, eps);
  for (int64_t j = 0; j < d; ++j) y[j] = rn_mul(x[j], s);
  return norm;
}

// One row backward from the forward's y and norm: dx = (g - y <g, y>) * s, or g * s where norm <= eps.
template <typename scalar_t>
MBREC_HD void row_l2_normalize_backward_row(const scalar_t* g, const scalar_t* y, scalar_t norm, scalar_t eps,
                                            scalar_t* dx, int64_t d) {
  const scalar_t s = row_l2_scale(norm, eps);
  const scalar_t dot = norm <= eps ? scalar_t(0) : row_dot(g, y, d);
  for (int64_t j = 0; j < d; ++j) dx[j] = rn_mul(rn_add(g[j], -rn_mul(y[j], dot)), s);
}

}  // namespace mbrec_fast
