// CUDA kernels of the sampler family: one thread per row (or sequence position) running the same
// common/sampler_core.h functions as the CPU kernel, so the output is bit-identical to the CPU's.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sampler/sampler_args.h"

namespace mbrec_fast {
namespace {

using at::Tensor;

__global__ void sample_rows_kernel(sampler::RowParams P, const int64_t* users, const int64_t* behaviors,
                                   int64_t n, int64_t* out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  sampler::sample_row(P, row, users[row], static_cast<int>(behaviors[row]), out + row * P.num_neg);
}

__global__ void sample_sequence_kernel(sampler::SeqParams S, int64_t n, int64_t* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  sampler::sample_sequence_position(S, i, out + i * S.num_neg);
}

constexpr int kThreads = 128;

Tensor sample_negatives_cuda(const Tensor& indptr, const Tensor& indices, const Tensor& users, const Tensor& behaviors,
                             const Tensor& level_thr, const Tensor& alias_thr, const Tensor& alias_idx,
                             const Tensor& weights_q, const Tensor& prefix, int64_t n_items, int64_t num_neg,
                             int64_t mode, bool replacement, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(indices.device());
  const auto P = sampler::make_row_params(indptr, indices, users, behaviors, level_thr, alias_thr,
                                          alias_idx, weights_q, prefix, n_items, num_neg, mode,
                                          replacement, seed, offset);
  check_ids_in_range(users, "users", indptr.size(1) - 1);
  check_ids_in_range(behaviors, "behaviors", P.g.R);
  const int64_t n = users.numel();
  Tensor out = at::empty({n, num_neg}, users.options());
  if (n == 0) return out;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  sample_rows_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      P, users.data_ptr<int64_t>(), behaviors.data_ptr<int64_t>(), n, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor sample_sequence_negatives_cuda(const Tensor& excl, const Tensor& excl_len, const Tensor& pos_dom,
                                      const Tensor& dom_indptr, const Tensor& dom_items, int64_t n_items,
                                      int64_t num_neg, int64_t pad, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(pos_dom.device());
  const auto S = sampler::make_seq_params(excl, excl_len, pos_dom, dom_indptr, dom_items, n_items,
                                          num_neg, pad, seed, offset);
  const int64_t B = pos_dom.size(0), L = pos_dom.size(1);
  Tensor out = at::empty({B, L, num_neg}, pos_dom.options());
  if (B * L == 0) return out;
  if (S.dom_indptr != nullptr) {
    const int64_t hi = pos_dom.max().item<int64_t>();
    TORCH_CHECK(hi < dom_indptr.numel() - 1, "pos_domain out of range: ", hi, " >= ", dom_indptr.numel() - 1);
  }
  const int64_t n = B * L;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  sample_sequence_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      S, n, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace mbrec_fast

TORCH_LIBRARY_IMPL(mbrec_fast, CUDA, m) {
  m.impl("sample_negatives", &mbrec_fast::sample_negatives_cuda);
  m.impl("sample_sequence_negatives", &mbrec_fast::sample_sequence_negatives_cuda);
}
