// Bounds checks of CSR offsets shared by the evaluator and sampler op families (host side, ATen).
//
// A kernel reads indices[indptr[r] : indptr[r + 1]] for the rows it is given; offsets beyond `indices`, negative
// or decreasing ones would read out of bounds. The ops check every offset row themselves, in O(rows), so that no
// call below the Python wrappers (which check more) can read outside the tensors. CPU tensors are scanned in
// place; tensors on another device are checked with a few reductions there (one synchronisation).
#pragma once
#include <ATen/ATen.h>

namespace mbrec {

// Every row of `indptr` (1-D, or 2-D: each row a separate offset sequence) is non-decreasing and lies in
// [0, nnz]. indptr must be int64 and contiguous.
inline void check_csr_offsets(const at::Tensor& indptr, int64_t nnz, const char* name) {
  TORCH_CHECK(indptr.scalar_type() == at::kLong && indptr.is_contiguous() && (indptr.dim() == 1 || indptr.dim() == 2),
              name, " must be a contiguous 1-D or 2-D int64 tensor");
  if (indptr.numel() == 0) return;
  const int64_t rows = indptr.dim() == 2 ? indptr.size(0) : 1;
  const int64_t len = indptr.size(indptr.dim() - 1);
  if (indptr.device().is_cpu()) {
    const int64_t* p = indptr.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* q = p + r * len;
      TORCH_CHECK(q[0] >= 0 && q[len - 1] <= nnz, name, ": offsets must lie in [0, ", nnz, "] (the length of the ",
                  "indices), found ", q[0], " .. ", q[len - 1]);
      for (int64_t i = 1; i < len; ++i) {
        TORCH_CHECK(q[i - 1] <= q[i], name, " must be non-decreasing, found ", q[i - 1], " > ", q[i], " at ", i);
      }
    }
    return;
  }
  const at::Tensor m = indptr.reshape({rows, len});
  bool ok = (m.min().item<int64_t>() >= 0) && (m.max().item<int64_t>() <= nnz);
  if (ok && len > 1) ok = !(m.narrow(1, 1, len - 1) < m.narrow(1, 0, len - 1)).any().item<bool>();
  TORCH_CHECK(ok, name, " must be non-decreasing offsets in [0, ", nnz, "] (the length of the indices)");
}

// Every value of the int64 tensor t lies in [lo, hi].
inline void check_values_in(const at::Tensor& t, int64_t lo, int64_t hi, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), name, " must be a contiguous int64 tensor");
  if (t.numel() == 0) return;
  if (t.device().is_cpu()) {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.numel(); ++i) {
      TORCH_CHECK(p[i] >= lo && p[i] <= hi, name, ": value ", p[i], " at ", i, " outside [", lo, ", ", hi, "]");
    }
    return;
  }
  const int64_t mn = t.min().item<int64_t>(), mx = t.max().item<int64_t>();
  TORCH_CHECK(mn >= lo && mx <= hi, name, ": values must lie in [", lo, ", ", hi, "], found ", mn, " .. ", mx);
}

}  // namespace mbrec
