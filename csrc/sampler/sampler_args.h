// Argument checks and parameter packing of the sampler ops, shared by their CPU and CUDA units (host side,
// built on common/checks.h).
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/sampler_core.h"

namespace mbrec_fast {
namespace sampler {

// Validates the sample_negatives arguments and fills the row parameters (pointers into the tensors).
inline RowParams make_row_params(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& users,
                                 const at::Tensor& behaviors, const at::Tensor& level_thr,
                                 const at::Tensor& alias_thr, const at::Tensor& alias_idx,
                                 const at::Tensor& weights_q, const at::Tensor& prefix, int64_t n_items,
                                 int64_t num_neg, int64_t mode, bool replacement, int64_t seed,
                                 int64_t offset) {
  const auto dev = indices.device();
  check_tensor(indptr, "indptr", at::kLong, 2, dev);
  check_tensor(indices, "indices", at::kInt, 1, dev);
  check_tensor(users, "users", at::kLong, 1, dev);
  check_tensor(behaviors, "behaviors", at::kLong, 1, dev);
  check_tensor(level_thr, "level_thresholds", at::kLong, 2, dev);
  TORCH_CHECK(indptr.size(0) >= 3, "indptr must have R + 2 >= 3 slots, got ", indptr.size(0));
  const int64_t R = indptr.size(0) - 2;
  TORCH_CHECK(level_thr.size(0) == R && level_thr.size(1) == R, "level_thresholds must be [R, R] = [", R, ", ", R, "]");
  TORCH_CHECK(users.numel() == behaviors.numel(), "users and behaviors must have the same length");
  TORCH_CHECK(num_neg >= 1, "num_neg must be >= 1, got ", num_neg);
  TORCH_CHECK(mode >= 0 && mode <= 4, "mode must be in [0, 4], got ", mode);
  TORCH_CHECK(n_items >= 0 && n_items < (int64_t(1) << 31), "n_items out of range: ", n_items);
  TORCH_CHECK(seed >= 0 && offset >= 0, "seed and offset must be non-negative");
  check_csr_offsets(indptr, indices.numel(), "indptr");
  const bool weighted = alias_thr.numel() > 0;
  if (weighted) {
    check_tensor(alias_thr, "alias_threshold", at::kLong, 1, dev);
    check_tensor(alias_idx, "alias_index", at::kInt, 1, dev);
    check_tensor(weights_q, "weights_q", at::kLong, 1, dev);
    check_tensor(prefix, "weight_prefix", at::kLong, 1, dev);
    TORCH_CHECK(alias_thr.numel() == n_items && alias_idx.numel() == n_items && weights_q.numel() == n_items &&
                    prefix.numel() == n_items + 1,
                "popularity tables must have n_items (prefix: n_items + 1) entries");
  }
  RowParams P;
  P.g.indptr = indptr.data_ptr<int64_t>();
  P.g.stride = indptr.size(1);
  P.g.indices = indices.data_ptr<int32_t>();
  P.g.R = static_cast<int>(R);
  P.g.n_items = n_items;
  P.level_thr = level_thr.data_ptr<int64_t>();
  P.w.thr = weighted ? alias_thr.data_ptr<int64_t>() : nullptr;
  P.w.alias = weighted ? alias_idx.data_ptr<int32_t>() : nullptr;
  P.w.wq = weighted ? weights_q.data_ptr<int64_t>() : nullptr;
  P.w.prefix = weighted ? prefix.data_ptr<int64_t>() : nullptr;
  P.mode = static_cast<int>(mode);
  P.replacement = replacement;
  P.num_neg = num_neg;
  P.seed = static_cast<uint64_t>(seed);
  P.offset = static_cast<uint64_t>(offset);
  return P;
}

inline SeqParams make_seq_params(const at::Tensor& excl, const at::Tensor& excl_len, const at::Tensor& pos_dom,
                                 const at::Tensor& dom_indptr, const at::Tensor& dom_items, int64_t n_items,
                                 int64_t num_neg, int64_t pad, int64_t seed, int64_t offset) {
  const auto dev = pos_dom.device();
  check_tensor(excl, "excl", at::kInt, 2, dev);
  check_tensor(excl_len, "excl_len", at::kLong, 1, dev);
  check_tensor(pos_dom, "pos_domain", at::kLong, 2, dev);
  TORCH_CHECK(excl.size(0) == pos_dom.size(0) && excl_len.numel() == pos_dom.size(0),
              "excl, excl_len and pos_domain must have one row per sequence");
  TORCH_CHECK(num_neg >= 1, "num_neg must be >= 1, got ", num_neg);
  TORCH_CHECK(n_items >= 0 && n_items < (int64_t(1) << 31), "n_items out of range: ", n_items);
  TORCH_CHECK(seed >= 0 && offset >= 0, "seed and offset must be non-negative");
  const bool has_dom = dom_indptr.numel() > 0;
  if (has_dom) {
    check_tensor(dom_indptr, "dom_indptr", at::kLong, 1, dev);
    check_tensor(dom_items, "dom_items", at::kInt, 1, dev);
    check_csr_offsets(dom_indptr, dom_items.numel(), "dom_indptr");
  }
  check_values_in(excl_len, 0, excl.size(1), "excl_len");
  SeqParams S;
  S.excl = excl.data_ptr<int32_t>();
  S.excl_stride = excl.size(1);
  S.excl_len = excl_len.data_ptr<int64_t>();
  S.pos_dom = pos_dom.data_ptr<int64_t>();
  S.dom_indptr = has_dom ? dom_indptr.data_ptr<int64_t>() : nullptr;
  S.dom_items = has_dom ? dom_items.data_ptr<int32_t>() : nullptr;
  S.L = pos_dom.size(1);
  S.n_items = n_items;
  S.num_neg = num_neg;
  S.pad = pad;
  S.seed = static_cast<uint64_t>(seed);
  S.offset = static_cast<uint64_t>(offset);
  return S;
}

}  // namespace sampler
}  // namespace mbrec_fast
