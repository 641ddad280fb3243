// Argument checks of the full-ranking evaluator ops, shared by their CPU and CUDA units (host side, built on
// common/checks.h).
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <string>

#include "common/checks.h"

namespace mbrec_fast {

// float32, float16 or bfloat16: the embedding dtypes the ops score (in fp32).
inline bool is_float_type(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// A CSR argument pair (int64 indptr [rows + 1], int64 indices) named `name` ("exclude", "targets").
inline void check_csr_args(const at::Tensor& indptr, const at::Tensor& indices, const char* name,
                           const at::Device& device) {
  check_tensor(indptr, (std::string(name) + ".indptr").c_str(), at::kLong, 1, device);
  check_tensor(indices, (std::string(name) + ".indices").c_str(), at::kLong, 1, device);
  check_csr_offsets(indptr, indices.numel(), name);
}

inline void check_topk_dot_args(const at::Tensor& user_emb, const at::Tensor& item_emb, const at::Tensor& users,
                                const at::Tensor& excl_indptr, const at::Tensor& excl_indices, int64_t k,
                                int64_t block_users, int64_t block_items) {
  TORCH_CHECK(user_emb.dim() == 2 && is_float_type(user_emb), "user_emb must be a 2-D float/half/bfloat16 tensor");
  TORCH_CHECK(item_emb.dim() == 2 && item_emb.scalar_type() == user_emb.scalar_type(),
              "item_emb must be 2-D with the dtype of user_emb");
  TORCH_CHECK(item_emb.size(1) == user_emb.size(1), "item_emb and user_emb must have the same embedding dim");
  TORCH_CHECK(item_emb.device() == user_emb.device(), "item_emb must be on the device of user_emb");
  TORCH_CHECK(user_emb.is_contiguous() && item_emb.is_contiguous(), "user_emb and item_emb must be contiguous");
  check_tensor(users, "users", at::kLong, 1, user_emb.device());
  check_csr_args(excl_indptr, excl_indices, "exclude", user_emb.device());
  TORCH_CHECK(excl_indptr.numel() == user_emb.size(0) + 1, "exclude.indptr must have user_emb.size(0) + 1 entries");
  TORCH_CHECK(k >= 1 && k <= item_emb.size(0), "k must satisfy 1 <= k <= n_items");
  TORCH_CHECK(k <= std::numeric_limits<int>::max(), "k too large");
  TORCH_CHECK(item_emb.size(0) < (int64_t{1} << 32) - 1, "topk_dot supports fewer than 2^32 - 1 items");
  TORCH_CHECK(block_users >= 1 && block_items >= 1, "block_users and block_items must be >= 1");
}

inline void check_topk_merge_args(const at::Tensor& block_scores, const at::Tensor& users, int64_t item_start,
                                  const at::Tensor& excl_indptr, const at::Tensor& excl_indices,
                                  const at::Tensor& top_scores, const at::Tensor& top_ids) {
  TORCH_CHECK(block_scores.dim() == 2 && block_scores.scalar_type() == at::kFloat && block_scores.is_contiguous(),
              "block_scores must be a contiguous 2-D float32 tensor");
  const auto device = block_scores.device();
  check_tensor(users, "users", at::kLong, 1, device);
  check_csr_args(excl_indptr, excl_indices, "exclude", device);
  TORCH_CHECK(users.size(0) == block_scores.size(0), "users must have one id per row of block_scores");
  TORCH_CHECK(item_start >= 0, "item_start must be >= 0");
  TORCH_CHECK(top_scores.dim() == 2 && top_scores.scalar_type() == at::kFloat && top_scores.is_contiguous() &&
                  top_scores.size(0) == block_scores.size(0) && top_scores.device() == device,
              "top_scores must be a contiguous float32 [b, k] tensor on the device of block_scores");
  TORCH_CHECK(top_ids.scalar_type() == at::kLong && top_ids.is_contiguous() && top_ids.sizes() == top_scores.sizes() &&
                  top_ids.device() == device,
              "top_ids must be a contiguous int64 tensor shaped like top_scores");
  TORCH_CHECK(top_scores.size(1) >= 1, "top_scores must have k >= 1 columns");
}

inline void check_rank_metrics_args(const at::Tensor& top_ids, const at::Tensor& users, const at::Tensor& tgt_indptr,
                                    const at::Tensor& tgt_indices, const at::Tensor& tgt_groups, int64_t n_groups,
                                    at::IntArrayRef ks) {
  TORCH_CHECK(top_ids.dim() == 2 && top_ids.scalar_type() == at::kLong && top_ids.is_contiguous(),
              "top_ids must be a contiguous 2-D int64 tensor");
  const auto device = top_ids.device();
  check_tensor(users, "users", at::kLong, 1, device);
  TORCH_CHECK(users.size(0) == top_ids.size(0), "users must have one id per row of top_ids");
  check_csr_args(tgt_indptr, tgt_indices, "targets", device);
  TORCH_CHECK(n_groups >= 0, "n_groups must be >= 0");
  TORCH_CHECK(tgt_groups.dim() == 1 && tgt_groups.scalar_type() == at::kLong && tgt_groups.is_contiguous() &&
                  tgt_groups.device() == device,
              "target_groups must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(n_groups == 0 || tgt_groups.numel() == tgt_indices.numel(),
              "target_groups must have one label per target when n_groups > 0");
  TORCH_CHECK(!ks.empty(), "ks must not be empty");
  for (const int64_t k : ks) {
    TORCH_CHECK(k >= 1 && k <= top_ids.size(1), "ks: every K must satisfy 1 <= K <= top_ids.size(1)");
  }
}

}  // namespace mbrec_fast
