// Full-ranking top-K evaluator ops: declarations shared by the schema file and the CPU/CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace mbrec_fast {

// Checks shared by the CPU and CUDA kernels (second line of defense behind the Python wrappers).
void check_topk_dot_args(const at::Tensor& user_emb, const at::Tensor& item_emb, const at::Tensor& users,
                         const at::Tensor& excl_indptr, const at::Tensor& excl_indices, int64_t k,
                         int64_t block_users, int64_t block_items);
void check_topk_merge_args(const at::Tensor& block_scores, const at::Tensor& users, int64_t item_start,
                           const at::Tensor& excl_indptr, const at::Tensor& excl_indices,
                           const at::Tensor& top_scores, const at::Tensor& top_ids);
void check_rank_metrics_args(const at::Tensor& top_ids, const at::Tensor& users, const at::Tensor& tgt_indptr,
                             const at::Tensor& tgt_indices, const at::Tensor& tgt_groups, int64_t n_groups,
                             at::IntArrayRef ks);

std::tuple<at::Tensor, at::Tensor> topk_dot_cpu(const at::Tensor& user_emb, const at::Tensor& item_emb,
                                                const at::Tensor& users, const at::Tensor& excl_indptr,
                                                const at::Tensor& excl_indices, int64_t k, int64_t block_users,
                                                int64_t block_items);
std::tuple<at::Tensor, at::Tensor> topk_merge_cpu(const at::Tensor& block_scores, const at::Tensor& users,
                                                  int64_t item_start, const at::Tensor& excl_indptr,
                                                  const at::Tensor& excl_indices, const at::Tensor& top_scores,
                                                  const at::Tensor& top_ids);
std::tuple<at::Tensor, at::Tensor> rank_metrics_cpu(const at::Tensor& top_ids, const at::Tensor& users,
                                                    const at::Tensor& tgt_indptr, const at::Tensor& tgt_indices,
                                                    const at::Tensor& tgt_groups, int64_t n_groups,
                                                    at::IntArrayRef ks);

}  // namespace mbrec_fast
