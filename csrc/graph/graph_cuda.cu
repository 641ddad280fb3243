// CUDA kernel of csr_spmm (schema: graph_ops.cpp): one thread per output element, a warp across 32 columns of one
// row (coalesced reads of each x row), eight rows per block; each element is the FMA chain of spmm_core.h, the
// code the CPU's portable path runs, so CPU and GPU agree bit for bit. A column index out of range sets a flag that
// the host turns into the error after the kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "graph/graph_args.h"
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

}  // namespace

TORCH_LIBRARY_IMPL(mbrec_fast, CUDA, m) { m.impl("csr_spmm", &csr_spmm_cuda); }

}  // namespace mbrec_fast
