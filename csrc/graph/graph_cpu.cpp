// CPU kernels of the graph family (schemas: graph_ops.cpp). row_l2_normalize and its backward: rows split over
// threads, each by the per-row core of row_norm_core.h. csr_spmm: rows of y = A x split over threads, each row computed by one
// thread. fp32 runs the SIMD row kernel of spmm_rows.h (AVX-512 or AVX2 + FMA, chosen at run time from the CPU's
// features); fp64 and CPUs without AVX2 the portable loop of spmm_core.h. Every variant computes each element as
// the same FMA chain, so results are bit-identical across variants and thread counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "cpu_isa.h"
#include "graph/graph_args.h"
#include "graph/row_norm_core.h"
#include "graph/spmm_core.h"
#include "graph/spmm_rows.h"

namespace mbrec_fast {
namespace {

// Rows per parallel task: about 16 K units of work at `work_per_row` units per row.
int64_t rows_per_task(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(work_per_row, 1));
}

const SpmmRowsKernel* spmm_kernel() {
  switch (cpu_isa_selected()) {
    case CpuIsa::kAvx512: return spmm_rows_avx512();
    case CpuIsa::kAvx2: return spmm_rows_avx2();
    default: return nullptr;
  }
}

// Rows [r0, r1) of y by the portable loop; false when some column index was out of range.
template <typename scalar_t>
bool spmm_rows_portable(const int64_t* crow, const int64_t* col, const scalar_t* val, const scalar_t* x, int64_t n,
                        int64_t d, scalar_t* y, int64_t r0, int64_t r1) {
  bool ok = true;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < d; ++c) y[r * d + c] = spmm_element(crow, col, val, x, n, d, r, c, &ok);
  }
  return ok;
}

bool spmm_rows_any(const SpmmRowsKernel* kern, const int64_t* crow, const int64_t* col, const float* val,
                   const float* x, int64_t n, int64_t d, float* y, int64_t r0, int64_t r1) {
  if (kern != nullptr) return kern->rows(SpmmRowsArgs{crow, col, val, x, n, y, d, r0, r1});
  return spmm_rows_portable(crow, col, val, x, n, d, y, r0, r1);
}

bool spmm_rows_any(const SpmmRowsKernel*, const int64_t* crow, const int64_t* col, const double* val,
                   const double* x, int64_t n, int64_t d, double* y, int64_t r0, int64_t r1) {
  return spmm_rows_portable(crow, col, val, x, n, d, y, r0, r1);
}

at::Tensor csr_spmm_cpu(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val, const at::Tensor& x,
                        const c10::optional<at::Tensor>& t_crow, const c10::optional<at::Tensor>& t_col,
                        const c10::optional<at::Tensor>& t_val) {
  const int64_t rows = check_csr_spmm_args(crow, col, val, x, t_crow, t_col, t_val);
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor y = at::empty({rows, d}, x.options());
  if (d == 0) {  // nothing is read: check the indices in one pass instead
    check_ids_in_range(col, "col", n);
    return y;
  }
  const int64_t* cp = crow.data_ptr<int64_t>();
  const int64_t* kp = col.data_ptr<int64_t>();
  const SpmmRowsKernel* kern = x.scalar_type() == at::kFloat ? spmm_kernel() : nullptr;
  std::atomic<bool> bad{false};
  // grain: work is nonzero-columns, at the mean row length
  const int64_t grain = rows_per_task(std::max<int64_t>(1, col.numel() / std::max<int64_t>(rows, 1)) * d);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_spmm_cpu", [&] {
    const scalar_t* vp = val.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      if (!spmm_rows_any(kern, cp, kp, vp, xp, n, d, yp, r0, r1)) bad = true;
    });
  });
  if (bad) csr_col_error(col, n);
  return y;
}

std::tuple<at::Tensor, at::Tensor> row_l2_normalize_cpu(const at::Tensor& x, double eps) {
  check_row_l2_normalize_args(x, eps);
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x), norm = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_l2_normalize_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* np = norm.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, n, rows_per_task(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) np[r] = row_l2_normalize_row(xp + r * d, yp + r * d, d, e);
    });
  });
  return {y, norm};
}

at::Tensor row_l2_normalize_backward_cpu(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& norm,
                                         double eps) {
  check_row_l2_normalize_backward_args(grad, y, norm, eps);
  const int64_t n = grad.size(0), d = grad.size(1);
  at::Tensor dx = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "row_l2_normalize_backward_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* np = norm.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, n, rows_per_task(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        row_l2_normalize_backward_row(gp + r * d, yp + r * d, np[r], e, dp + r * d, d);
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mbrec_fast, CPU, m) {
  m.impl("csr_spmm", &csr_spmm_cpu);
  m.impl("row_l2_normalize", &row_l2_normalize_cpu);
  m.impl("row_l2_normalize_backward", &row_l2_normalize_backward_cpu);
}

}  // namespace mbrec_fast
