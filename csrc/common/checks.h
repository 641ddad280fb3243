// Argument checks shared by every op family's CPU and CUDA units (host side, ATen): the ops' second line of
// defense behind the Python wrappers, so that no call can make a kernel read outside its tensors.
//
// CSR offsets: a kernel reads indices[indptr[r] : indptr[r + 1]] for the rows it is given; offsets beyond
// `indices`, negative or decreasing ones would read out of bounds, so every offset row is checked, in O(rows).
// CPU tensors are scanned in place; tensors on another device are checked with a few reductions there (one
// synchronisation).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

namespace mbrec_fast {

// One tensor argument: dtype, number of dimensions, device and contiguity, each named in the message.
inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t ndim,
                         const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Every id of the contiguous int64 tensor `ids` lies in [0, n) (ids used as row or item indices). CPU tensors
// are scanned in parallel; on another device, and to report a failure, one aminmax.
inline void check_ids_in_range(const at::Tensor& ids, const char* name, int64_t n) {
  if (ids.numel() == 0) return;
  if (ids.device().is_cpu()) {
    const int64_t* p = ids.data_ptr<int64_t>();
    std::atomic<bool> bad{false};
    at::parallel_for(0, ids.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (p[i] < 0 || p[i] >= n) {
          bad = true;
          return;
        }
      }
    });
    if (!bad) return;
  }
  const auto mm = at::aminmax(ids);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n, name, " out of range: ids must lie in [0, ", n, "), found [", lo, ", ", hi, "]");
}

// Every row of `indptr` (1-D, or 2-D: each row a separate offset sequence) is non-decreasing and lies in
// [0, nnz]; with `exact_span`, every row also starts at 0 and ends at nnz. indptr must be int64 and contiguous.
// On a GPU the whole check costs one device-to-host copy.
inline void check_csr_offsets(const at::Tensor& indptr, int64_t nnz, const char* name, bool exact_span = false) {
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
      TORCH_CHECK(!exact_span || (q[0] == 0 && q[len - 1] == nnz), name, " must run from 0 to the number of ",
                  "nonzeros (", nnz, "), got ", q[0], " .. ", q[len - 1]);
    }
    return;
  }
  const at::Tensor m = indptr.reshape({rows, len});
  const at::Tensor first = m.select(1, 0), last = m.select(1, len - 1);
  std::vector<at::Tensor> parts = {m.min().reshape({1}), m.max().reshape({1}), first.narrow(0, 0, 1),
                                   last.narrow(0, 0, 1)};
  if (len > 1) parts.push_back((m.narrow(1, 1, len - 1) < m.narrow(1, 0, len - 1)).any().to(at::kLong).reshape({1}));
  if (exact_span) parts.push_back((first.ne(0) | last.ne(nnz)).any().to(at::kLong).reshape({1}));
  const at::Tensor v = at::cat(parts).cpu();  // the one sync
  const int64_t* s = v.data_ptr<int64_t>();
  bool ok = s[0] >= 0 && s[1] <= nnz && (len == 1 || s[4] == 0);
  TORCH_CHECK(ok, name, " must be non-decreasing offsets in [0, ", nnz, "] (the length of the indices)");
  TORCH_CHECK(!exact_span || s[parts.size() - 1] == 0, name, " must run from 0 to the number of nonzeros (", nnz,
              "), got ", s[2], " .. ", s[3]);
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

}  // namespace mbrec_fast
