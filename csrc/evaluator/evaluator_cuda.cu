// CUDA kernels of the full-ranking evaluator: a cuBLAS GEMM (at::mm) per block of users x items,
// then a selection kernel with one warp per user. Lanes read the score row coalesced; a ballot
// gathers the few scores that beat the heap threshold, and lane 0 offers them to the user's heap
// (csrc/common/topk_heap.h, the same code the CPU kernel runs). Excluded items are rejected with
// the binary search of csrc/common/csr.h, only for candidates that passed the threshold.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/csr.h"
#include "common/rank_metrics.h"
#include "common/topk_heap.h"
#include "evaluator/evaluator_args.h"

namespace mbrec_fast {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__global__ void heap_init_kernel(float* hs, int64_t* hi, int64_t b, int k) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < b) topk_heap_init(hs + r * k, hi + r * k, k);
}

__global__ void heap_load_kernel(const float* old_s, const int64_t* old_i, float* hs, int64_t* hi, int64_t b, int k) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < b) topk_heap_load_sorted(old_s + r * k, old_i + r * k, hs + r * k, hi + r * k, k);
}

__global__ void heap_finalize_kernel(float* hs, int64_t* hi, int64_t b, int k) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < b) topk_heap_finalize(hs + r * k, hi + r * k, k);
}

// Offers scores[r, 0:ni) (items item0 + j) to heap r for r < nu. users[r] selects the exclude row.
__global__ void select_block_kernel(const float* __restrict__ scores, int64_t ld, int64_t nu, int64_t ni,
                                    int64_t item0, const int64_t* __restrict__ users,
                                    const int64_t* __restrict__ ex_ptr, const int64_t* __restrict__ ex_idx,
                                    float* hs_all, int64_t* hi_all, int k) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= nu) return;  // uniform per warp
  float* hs = hs_all + r * k;
  int64_t* hi = hi_all + r * k;
  const float* row = scores + r * ld;
  const int64_t user = users[r];
  const int64_t ex_lo = ex_ptr[user], ex_hi = ex_ptr[user + 1];
  float thr_s = hs[0];
  int64_t thr_i = hi[0];
  for (int64_t base = 0; base < ni; base += kWarp) {
    const int64_t j = base + lane;
    const bool in_range = j < ni;
    const float s = in_range ? row[j] : thr_s;
    const int64_t id = item0 + j;
    bool pass = in_range && topk_worse(thr_s, thr_i, s, id);
    if (pass && ex_lo < ex_hi && contains(ex_idx, ex_lo, ex_hi, id)) pass = false;
    unsigned mask = __ballot_sync(kFullMask, pass);
    if (mask == 0) continue;
    while (mask) {
      const int src = __ffs(mask) - 1;
      mask &= mask - 1;
      const float cs = __shfl_sync(kFullMask, s, src);
      const long long cid = __shfl_sync(kFullMask, static_cast<long long>(id), src);
      if (lane == 0) topk_heap_offer(hs, hi, k, cs, static_cast<int64_t>(cid));
    }
    float root_s = 0.f;
    long long root_i = 0;
    if (lane == 0) {
      root_s = hs[0];
      root_i = static_cast<long long>(hi[0]);
    }
    thr_s = __shfl_sync(kFullMask, root_s, 0);
    thr_i = static_cast<int64_t>(__shfl_sync(kFullMask, root_i, 0));
  }
}

__global__ void rank_metrics_kernel(const int64_t* __restrict__ top, int64_t b, int64_t kmax,
                                    const int64_t* __restrict__ users, const int64_t* __restrict__ ptr,
                                    const int64_t* __restrict__ tgt, const int64_t* __restrict__ labels,
                                    int64_t n_groups, const int64_t* __restrict__ cutoffs, int64_t n_ks,
                                    double* val, int64_t* cnt) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= b) return;
  rank_metrics_row(top + r * kmax, r, b, tgt, labels, ptr[users[r]], ptr[users[r] + 1], n_groups, cutoffs,
                          n_ks, val, cnt);
}

void launch_select(const at::Tensor& scores, int64_t item0, const int64_t* users, const at::Tensor& excl_indptr,
                   const at::Tensor& excl_indices, float* hs, int64_t* hi, int k, cudaStream_t stream) {
  const int64_t nu = scores.size(0), ni = scores.size(1);
  if (nu == 0 || ni == 0) return;
  const int64_t grid = ceil_div(nu, kWarpsPerBlock);
  select_block_kernel<<<static_cast<unsigned>(grid), kWarpsPerBlock * kWarp, 0, stream>>>(
      scores.data_ptr<float>(), scores.stride(0), nu, ni, item0, users, excl_indptr.data_ptr<int64_t>(),
      excl_indices.data_ptr<int64_t>(), hs, hi, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_dot_cuda(const at::Tensor& user_emb, const at::Tensor& item_emb,
                                                 const at::Tensor& users, const at::Tensor& excl_indptr,
                                                 const at::Tensor& excl_indices, int64_t k, int64_t block_users,
                                                 int64_t block_items) {
  check_topk_dot_args(user_emb, item_emb, users, excl_indptr, excl_indices, k, block_users, block_items);
  const c10::cuda::CUDAGuard guard(user_emb.device());
  check_ids_in_range(users, "users", user_emb.size(0));
  const int64_t b = users.size(0), n_items = item_emb.size(0);
  auto top_scores = at::empty({b, k}, user_emb.options().dtype(at::kFloat));
  auto top_ids = at::empty({b, k}, user_emb.options().dtype(at::kLong));
  if (b == 0) return {top_scores, top_ids};
  const int kk = static_cast<int>(k);
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid_b = static_cast<unsigned>(ceil_div(b, 128));
  heap_init_kernel<<<grid_b, 128, 0, stream>>>(top_scores.data_ptr<float>(), top_ids.data_ptr<int64_t>(), b, kk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t bu = std::min(block_users, b), bi = std::min(block_items, n_items);
  for (int64_t u0 = 0; u0 < b; u0 += bu) {
    const int64_t nu = std::min(bu, b - u0);
    const at::Tensor rows = users.narrow(0, u0, nu);
    const at::Tensor user_tile = user_emb.index_select(0, rows).to(at::kFloat);
    for (int64_t i0 = 0; i0 < n_items; i0 += bi) {
      const int64_t ni = std::min(bi, n_items - i0);
      const at::Tensor item_tile = item_emb.narrow(0, i0, ni).to(at::kFloat);
      const at::Tensor scores = at::mm(user_tile, item_tile.t()).contiguous();
      launch_select(scores, i0, rows.data_ptr<int64_t>(), excl_indptr, excl_indices,
                    top_scores.data_ptr<float>() + u0 * k, top_ids.data_ptr<int64_t>() + u0 * k, kk, stream);
    }
  }
  heap_finalize_kernel<<<grid_b, 128, 0, stream>>>(top_scores.data_ptr<float>(), top_ids.data_ptr<int64_t>(), b, kk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {top_scores, top_ids};
}

std::tuple<at::Tensor, at::Tensor> topk_merge_cuda(const at::Tensor& block_scores, const at::Tensor& users,
                                                   int64_t item_start, const at::Tensor& excl_indptr,
                                                   const at::Tensor& excl_indices, const at::Tensor& top_scores,
                                                   const at::Tensor& top_ids) {
  check_topk_merge_args(block_scores, users, item_start, excl_indptr, excl_indices, top_scores, top_ids);
  const c10::cuda::CUDAGuard guard(block_scores.device());
  check_ids_in_range(users, "users", excl_indptr.numel() - 1);
  const int64_t b = block_scores.size(0), k = top_scores.size(1);
  auto new_s = at::empty_like(top_scores);
  auto new_i = at::empty_like(top_ids);
  if (b == 0) return {new_s, new_i};
  const int kk = static_cast<int>(k);
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid_b = static_cast<unsigned>(ceil_div(b, 128));
  heap_load_kernel<<<grid_b, 128, 0, stream>>>(top_scores.data_ptr<float>(), top_ids.data_ptr<int64_t>(),
                                               new_s.data_ptr<float>(), new_i.data_ptr<int64_t>(), b, kk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_select(block_scores, item_start, users.data_ptr<int64_t>(), excl_indptr, excl_indices,
                new_s.data_ptr<float>(), new_i.data_ptr<int64_t>(), kk, stream);
  heap_finalize_kernel<<<grid_b, 128, 0, stream>>>(new_s.data_ptr<float>(), new_i.data_ptr<int64_t>(), b, kk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {new_s, new_i};
}

std::tuple<at::Tensor, at::Tensor> rank_metrics_cuda(const at::Tensor& top_ids, const at::Tensor& users,
                                                     const at::Tensor& tgt_indptr, const at::Tensor& tgt_indices,
                                                     const at::Tensor& tgt_groups, int64_t n_groups,
                                                     at::IntArrayRef ks) {
  check_rank_metrics_args(top_ids, users, tgt_indptr, tgt_indices, tgt_groups, n_groups, ks);
  const c10::cuda::CUDAGuard guard(top_ids.device());
  check_ids_in_range(users, "users", tgt_indptr.numel() - 1);
  const int64_t b = top_ids.size(0), n_ks = static_cast<int64_t>(ks.size());
  auto values = at::zeros({n_groups + 1, b, n_ks, kNumRankMetrics}, top_ids.options().dtype(at::kDouble));
  auto counts = at::zeros({n_groups + 1, b}, top_ids.options().dtype(at::kLong));
  if (b == 0) return {values, counts};
  const at::Tensor cutoffs = at::tensor(std::vector<int64_t>(ks.begin(), ks.end()), at::kLong).to(top_ids.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  rank_metrics_kernel<<<static_cast<unsigned>(ceil_div(b, 128)), 128, 0, stream>>>(
      top_ids.data_ptr<int64_t>(), b, top_ids.size(1), users.data_ptr<int64_t>(), tgt_indptr.data_ptr<int64_t>(),
      tgt_indices.data_ptr<int64_t>(), n_groups > 0 ? tgt_groups.data_ptr<int64_t>() : nullptr, n_groups,
      cutoffs.data_ptr<int64_t>(), n_ks, values.data_ptr<double>(), counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, counts};
}

}  // namespace mbrec_fast

TORCH_LIBRARY_IMPL(mbrec_fast, CUDA, m) {
  m.impl("topk_dot", &mbrec_fast::topk_dot_cuda);
  m.impl("topk_merge", &mbrec_fast::topk_merge_cuda);
  m.impl("rank_metrics", &mbrec_fast::rank_metrics_cuda);
}
