// Argument checks of the graph op family (csr_spmm), run by its CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"

namespace mbrec_fast {

// One sparse matrix in CSR (crow [rows + 1], col [nnz], val [nnz]) with `cols` columns, on `device`, values of
// `dtype`: int64 contiguous indices, offsets non-decreasing from 0 to nnz (O(rows)). The column indices are checked
// by the kernels as they read them (a separate pass over nnz indices cost as much as the product at d = 32), see
// csr_col_error. `which` prefixes the argument names ("" or "t_"). Returns rows.
inline int64_t check_csr_matrix(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                                at::ScalarType dtype, const at::Device& device, const std::string& which) {
  const std::string n_crow = which + "crow", n_col = which + "col", n_val = which + "val";
  check_tensor(crow, n_crow.c_str(), at::kLong, 1, device);
  check_tensor(col, n_col.c_str(), at::kLong, 1, device);
  check_tensor(val, n_val.c_str(), dtype, 1, device);
  TORCH_CHECK(crow.numel() >= 1, n_crow, " must have rows + 1 >= 1 entries");
  TORCH_CHECK(val.numel() == col.numel(), n_val, " must have one value per entry of ", n_col, " (", col.numel(),
              "), got ", val.numel());
  check_csr_offsets(crow, col.numel(), n_crow.c_str(), /*exact_span=*/true);
  return crow.numel() - 1;
}

// The error a kernel raises when it met a column index outside [0, cols) (after the product, which skipped it).
[[noreturn]] inline void csr_col_error(const at::Tensor& col, int64_t cols) {
  const auto mm = at::aminmax(col);
  TORCH_CHECK(false, "col out of range: column indices must lie in [0, ", cols, ") (the rows of x), found [",
              std::get<0>(mm).item<int64_t>(), ", ", std::get<1>(mm).item<int64_t>(), "]");
}

// csr_spmm: x [n, d] fp32 or fp64, contiguous; A (crow, col, val) [rows, n]; its transpose (t_crow, t_col, t_val),
// all given or none: dtypes, devices and sizes ([n + 1] offsets, as many nonzeros) only, since the forward does not
// read it (the backward, which multiplies by it, checks it as its A). Returns rows.
inline int64_t check_csr_spmm_args(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                                   const at::Tensor& x, const c10::optional<at::Tensor>& t_crow,
                                   const c10::optional<at::Tensor>& t_col, const c10::optional<at::Tensor>& t_val) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64, got ", x.scalar_type());
  check_tensor(x, "x", x.scalar_type(), 2, x.device());
  const int64_t rows = check_csr_matrix(crow, col, val, x.scalar_type(), x.device(), "");
  const int given = int(t_crow.has_value()) + int(t_col.has_value()) + int(t_val.has_value());
  TORCH_CHECK(given == 0 || given == 3, "t_crow, t_col and t_val (the transpose) must be given together or not at all");
  if (given == 3) {
    check_tensor(*t_crow, "t_crow", at::kLong, 1, x.device());
    check_tensor(*t_col, "t_col", at::kLong, 1, x.device());
    check_tensor(*t_val, "t_val", x.scalar_type(), 1, x.device());
    TORCH_CHECK(t_crow->numel() == x.size(0) + 1, "t_crow must have x.size(0) + 1 = ", x.size(0) + 1,
                " entries (the transpose has one row per row of x), got ", t_crow->numel());
    TORCH_CHECK(t_col->numel() == col.numel() && t_val->numel() == col.numel(),
                "t_col and t_val must have as many nonzeros as col (", col.numel(), "), got ", t_col->numel(), " and ",
                t_val->numel());
  }
  return rows;
}

// row_l2_normalize: x [n, d] fp32 or fp64, contiguous; eps > 0 and finite.
inline void check_row_l2_normalize_args(const at::Tensor& x, double eps, const char* name = "x") {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              name, " must be float32 or float64, got ", x.scalar_type());
  check_tensor(x, name, x.scalar_type(), 2, x.device());
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "eps must be positive and finite, got ", eps);
}

// row_l2_normalize_backward: grad and y of one shape [n, d], norm [n], all of grad's dtype and device.
inline void check_row_l2_normalize_backward_args(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& norm,
                                                 double eps) {
  check_row_l2_normalize_args(grad, eps, "grad");
  check_tensor(y, "y", grad.scalar_type(), 2, grad.device());
  check_tensor(norm, "norm", grad.scalar_type(), 1, grad.device());
  TORCH_CHECK(y.sizes() == grad.sizes(), "y must have grad's shape ", grad.sizes(), ", got ", y.sizes());
  TORCH_CHECK(norm.numel() == grad.size(0), "norm must have one entry per row of grad (", grad.size(0), "), got ",
              norm.numel());
}

}  // namespace mbrec_fast
