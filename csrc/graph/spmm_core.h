// The sparse x dense product's per-element core, shared by the CPU kernels (portable and SIMD variants) and the
// CUDA kernel: y[r, c] = sum over k in [crow[r], crow[r + 1]) of val[k] * x[col[k], c], one fused multiply-add per
// nonzero in storage order, starting from zero. Every backend keeps that order and fuses every step, so a value
// depends neither on the backend, the instruction set nor the thread count. Torch-free.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/hd.h"

namespace mbrec_fast {

template <typename scalar_t>
MBREC_HD scalar_t spmm_fma(scalar_t a, scalar_t b, scalar_t c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// y[r, c] of y = A x, A in CSR (crow, col, val), x [n_x, ldx] row-major. A column index outside [0, n_x) is
// skipped and clears *ok (the caller raises the error; nothing is read out of bounds).
template <typename scalar_t>
MBREC_HD scalar_t spmm_element(const int64_t* crow, const int64_t* col, const scalar_t* val, const scalar_t* x,
                               int64_t n_x, int64_t ldx, int64_t r, int64_t c, bool* ok) {
  scalar_t acc = scalar_t(0);
  for (int64_t k = crow[r], e = crow[r + 1]; k < e; ++k) {
    const int64_t j = col[k];
    if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(n_x)) {
      *ok = false;
      continue;
    }
    acc = spmm_fma(val[k], x[j * ldx + c], acc);
  }
  return acc;
}

}  // namespace mbrec_fast
