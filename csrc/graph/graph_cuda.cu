// CUDA kernels of the graph family (schemas: graph_ops.cpp). row_l2_normalize and its backward: one thread per row
// running row_norm_core.h, as the CPU does. csr_spmm: one thread per output element, a warp across 32 columns of one
// row (coalesced reads of each x row), eight rows per block; each element is the FMA chain of spmm_core.h, the
// code the CPU's portable path runs, so CPU and GPU agree bit for bit. A column index out of range sets a flag that
// the host turns into the error after the kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "graph/graph_args.h"
#include "graph/row_norm_core.h"
#include "graph/spmm_core.h"

namespace mbrec_fast {
namespace {

constexpr int kColsPerBlock = 32, kRowsPerBlock = 8;

template <typename scalar_t>
__global__ void csr_spmm_kernel(const int64_t* crow, const int64_t* col, const scalar_t* val, const scalar_t* x,
                                int64_t n, int64_t d, int64_t rows, scalar_t* y, int* bad) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kColsPerBlock + threadIdx.x;
  if (r >= rows || c >= d) return;
  bool ok = true;
  y[r * d + c] = spmm_element(crow, col, val, x, n, d, r, c, &ok);
  if (!ok) *bad = 1;
}

at::Tensor csr_spmm_cuda(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val, const at::Tensor& x,
                         const c10::optional<at::Tensor>& t_crow, const c10::optional<at::Tensor>& t_col,
                         const c10::optional<at::Tensor>& t_val) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = check_csr_spmm_args(crow, col, val, x, t_crow, t_col, t_val);
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor y = at::empty({rows, d}, x.options());
  if (d == 0) {
    check_ids_in_range(col, "col", n);
    return y;
  }
  if (rows == 0) return y;
  at::Tensor bad = at::zeros({1}, x.options().dtype(at::kInt));
  const dim3 block(kColsPerBlock, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>((d + kColsPerBlock - 1) / kColsPerBlock));
  TORCH_CHECK(grid.y <= 65535, "x: at most ", 65535 * kColsPerBlock, " columns, got ", d);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_spmm_cuda", [&] {
    csr_spmm_kernel<scalar_t><<<grid, block, 0, stream>>>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                                                           val.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), n, d,
                                                           rows, y.data_ptr<scalar_t>(), bad.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (bad.item<int>() != 0) csr_col_error(col, n);
  return y;
}

constexpr int kNormThreads = 256;

template <typename scalar_t>
__global__ void row_l2_normalize_kernel(const scalar_t* x, scalar_t* y, scalar_t* norm, int64_t n, int64_t d,
                                        scalar_t eps) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kNormThreads + threadIdx.x;
  if (r < n) norm[r] = row_l2_normalize_row(x + r * d, y + r * d, d, eps);
}

template <typename scalar_t>
__global__ void row_l2_normalize_backward_kernel(const scalar_t* g, const scalar_t* y, const scalar_t* norm,
                                                 scalar_t* dx, int64_t n, int64_t d, scalar_t eps) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kNormThreads + threadIdx.x;
  if (r < n) row_l2_normalize_backward_row(g + r * d, y + r * d, norm[r], eps, dx + r * d, d);
}

unsigned norm_blocks(int64_t n) { return static_cast<unsigned>((n + kNormThreads - 1) / kNormThreads); }

std::tuple<at::Tensor, at::Tensor> row_l2_normalize_cuda(const at::Tensor& x, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_row_l2_normalize_args(x, eps);
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x), norm = at::empty({n}, x.options());
  if (n == 0) return {y, norm};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_l2_normalize_cuda", [&] {
    row_l2_normalize_kernel<scalar_t><<<norm_blocks(n), kNormThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(), n, d, static_cast<scalar_t>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, norm};
}

at::Tensor row_l2_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& norm,
                                          double eps) {
  const c10::cuda::CUDAGuard guard(grad.device());
  check_row_l2_normalize_backward_args(grad, y, norm, eps);
  const int64_t n = grad.size(0), d = grad.size(1);
  at::Tensor dx = at::empty_like(grad);
  if (n == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "row_l2_normalize_backward_cuda", [&] {
    row_l2_normalize_backward_kernel<scalar_t><<<norm_blocks(n), kNormThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), n, d,
        static_cast<scalar_t>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(mbrec_fast, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("row_l2_normalize", &row_l2_normalize_cuda);
  m.impl("row_l2_normalize_backward", &row_l2_normalize_backward_cuda);
}

}  // namespace mbrec_fast
