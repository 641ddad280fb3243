// CPU kernels of the sampler family: graph construction (counting sort) and the samplers, which call the
// shared logic in common/sampler_core.h once per row under at::parallel_for (so torch.set_num_threads
// applies; the output does not depend on it).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu_isa.h"
#include "sampler/philox_batch_cpu.h"
#include "sampler/sampler_args.h"

namespace mbrec_fast {
namespace {

using at::Tensor;

// Union of several sorted, distinct rows into dst (returns its length); buf is scratch.
int64_t union_rows(const std::vector<std::pair<const int32_t*, int64_t>>& rows, std::vector<int32_t>& a,
                   std::vector<int32_t>& b) {
  a.clear();
  for (const auto& r : rows) {
    if (r.second == 0) continue;
    b.resize(a.size() + r.second);
    auto end = std::set_union(a.begin(), a.end(), r.first, r.first + r.second, b.begin());
    b.resize(end - b.begin());
    a.swap(b);
  }
  return static_cast<int64_t>(a.size());
}

std::tuple<Tensor, Tensor> build_interaction_graph_cpu(const Tensor& users, const Tensor& items,
                                                       const Tensor& behaviors, int64_t n_users, int64_t n_items,
                                                       int64_t n_behaviors) {
  const auto cpu = at::Device(at::kCPU);
  check_tensor(users, "users", at::kLong, 1, cpu);
  check_tensor(items, "items", at::kLong, 1, cpu);
  check_tensor(behaviors, "behaviors", at::kLong, 1, cpu);
  TORCH_CHECK(users.numel() == items.numel() && items.numel() == behaviors.numel(),
              "users, items and behaviors must have the same length");
  TORCH_CHECK(n_users >= 0 && n_users < (int64_t(1) << 31), "n_users out of range: ", n_users);
  TORCH_CHECK(n_items >= 0 && n_items < (int64_t(1) << 31), "n_items out of range: ", n_items);
  TORCH_CHECK(n_behaviors >= 1 && n_behaviors <= 64, "n_behaviors must be in [1, 64], got ", n_behaviors);
  check_ids_in_range(users, "users", n_users);
  check_ids_in_range(items, "items", n_items);
  check_ids_in_range(behaviors, "behaviors", n_behaviors);
  const int64_t N = users.numel(), U = n_users, R = n_behaviors, stride = U + 1;
  const int64_t* pu = users.data_ptr<int64_t>();
  const int64_t* pi = items.data_ptr<int64_t>();
  const int64_t* pb = behaviors.data_ptr<int64_t>();

  // 1. counting sort by (behavior, user)
  std::vector<int64_t> start(R * U + 1, 0);
  for (int64_t i = 0; i < N; ++i) ++start[pb[i] * U + pu[i] + 1];
  for (int64_t k = 0; k < R * U; ++k) start[k + 1] += start[k];
  std::vector<int32_t> tmp(N);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < N; ++i) tmp[fill[pb[i] * U + pu[i]]++] = static_cast<int32_t>(pi[i]);
  }
  // 2. sort and deduplicate every row in place
  std::vector<int64_t> len(R * U);
  at::parallel_for(0, R * U, 4096, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      int32_t* lo = tmp.data() + start[k];
      int32_t* hi = tmp.data() + start[k + 1];
      std::sort(lo, hi);
      len[k] = std::unique(lo, hi) - lo;
    }
  });
  // 3. union lengths per user (touched: all behaviors; aux: all but the target)
  std::vector<int64_t> len_touched(U), len_aux(U);
  auto rows_of = [&](int64_t u, int64_t upto) {
    std::vector<std::pair<const int32_t*, int64_t>> rows;
    for (int64_t r = 0; r < upto; ++r) rows.emplace_back(tmp.data() + start[r * U + u], len[r * U + u]);
    return rows;
  };
  at::parallel_for(0, U, 1024, [&](int64_t b, int64_t e) {
    std::vector<int32_t> x, y;
    for (int64_t u = b; u < e; ++u) {
      len_touched[u] = R == 1 ? len[u] : union_rows(rows_of(u, R), x, y);
      len_aux[u] = R <= 2 ? (R == 2 ? len[u] : 0) : union_rows(rows_of(u, R - 1), x, y);
    }
  });
  // 4. packed offsets
  Tensor indptr = at::empty({R + 2, stride}, users.options());
  int64_t* ip = indptr.data_ptr<int64_t>();
  int64_t pos = 0;
  for (int64_t slot = 0; slot < R + 2; ++slot) {
    for (int64_t u = 0; u < U; ++u) {
      ip[slot * stride + u] = pos;
      pos += slot < R ? len[slot * U + u] : (slot == R ? len_touched[u] : len_aux[u]);
    }
    ip[slot * stride + U] = pos;
  }
  Tensor indices = at::empty({pos}, users.options().dtype(at::kInt));
  int32_t* out = indices.data_ptr<int32_t>();
  // 5. copy rows and write unions
  at::parallel_for(0, U, 1024, [&](int64_t b, int64_t e) {
    std::vector<int32_t> x, y;
    for (int64_t u = b; u < e; ++u) {
      for (int64_t r = 0; r < R; ++r) {
        std::copy_n(tmp.data() + start[r * U + u], len[r * U + u], out + ip[r * stride + u]);
      }
      if (R == 1) {
        std::copy_n(tmp.data() + start[u], len[u], out + ip[R * stride + u]);
      } else {
        union_rows(rows_of(u, R), x, y);
        std::copy(x.begin(), x.end(), out + ip[R * stride + u]);
      }
      if (R == 2) {
        std::copy_n(tmp.data() + start[u], len[u], out + ip[(R + 1) * stride + u]);
      } else if (R > 2) {
        union_rows(rows_of(u, R - 1), x, y);
        std::copy(x.begin(), x.end(), out + ip[(R + 1) * stride + u]);
      }
    }
  });
  return {indptr, indices};
}

Tensor sample_negatives_cpu(const Tensor& indptr, const Tensor& indices, const Tensor& users, const Tensor& behaviors,
                            const Tensor& level_thr, const Tensor& alias_thr, const Tensor& alias_idx,
                            const Tensor& weights_q, const Tensor& prefix, int64_t n_items, int64_t num_neg,
                            int64_t mode, bool replacement, int64_t seed, int64_t offset) {
  const auto P = sampler::make_row_params(indptr, indices, users, behaviors, level_thr, alias_thr,
                                          alias_idx, weights_q, prefix, n_items, num_neg, mode,
                                          replacement, seed, offset);
  check_ids_in_range(users, "users", indptr.size(1) - 1);
  check_ids_in_range(behaviors, "behaviors", P.g.R);
  const int64_t n = users.numel();
  Tensor out = at::empty({n, num_neg}, users.options());
  int64_t* po = out.data_ptr<int64_t>();
  const int64_t* pu = users.data_ptr<int64_t>();
  const int64_t* pb = behaviors.data_ptr<int64_t>();
  // The first Philox blocks of each row's stream (enough for num_neg draws without rejections, at
  // most 4) are computed ahead for 64 rows at a time, 8 streams per AVX2 vector where the CPU has AVX2.
  constexpr int64_t kGroup = 64;
  const bool simd = cpu_isa_selected() != CpuIsa::kPortable;
  const uint32_t n_pre = static_cast<uint32_t>(std::min<int64_t>(4, (num_neg + 3) / 4));
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    std::vector<Philox4> pre(kGroup * n_pre);
    for (int64_t g0 = b; g0 < e; g0 += kGroup) {
      const int64_t g1 = std::min(e, g0 + kGroup);
      philox_blocks_batch(P.seed, P.offset, g0, g1 - g0, n_pre, pre.data(), simd);
      for (int64_t row = g0; row < g1; ++row) {
        // Two-stage prefetch for graphs beyond the caches (random users are two dependent misses each):
        // the row offsets 16 rows ahead, the row's items 8 rows ahead (their offsets arrived by then).
        if (row + 16 < e) {
          const int64_t* at = P.g.indptr + sampler::primary_slot(P, static_cast<int>(pb[row + 16])) * P.g.stride +
                              pu[row + 16];
          __builtin_prefetch(at);
          __builtin_prefetch(at + 1);
        }
        if (row + 8 < e) {
          const auto ahead = sampler::graph_row(
              P.g, sampler::primary_slot(P, static_cast<int>(pb[row + 8])), pu[row + 8]);
          __builtin_prefetch(ahead.p);
          __builtin_prefetch(ahead.p + 16);
        }
        sampler::sample_row(P, row, pu[row], static_cast<int>(pb[row]), po + row * num_neg,
                                   pre.data() + (row - g0) * n_pre, n_pre);
      }
    }
  });
  return out;
}

Tensor sample_sequence_negatives_cpu(const Tensor& excl, const Tensor& excl_len, const Tensor& pos_dom,
                                     const Tensor& dom_indptr, const Tensor& dom_items, int64_t n_items,
                                     int64_t num_neg, int64_t pad, int64_t seed, int64_t offset) {
  const auto S = sampler::make_seq_params(excl, excl_len, pos_dom, dom_indptr, dom_items, n_items,
                                          num_neg, pad, seed, offset);
  const int64_t B = pos_dom.size(0), L = pos_dom.size(1);
  Tensor out = at::empty({B, L, num_neg}, pos_dom.options());
  if (B * L == 0) return out;
  if (S.dom_indptr != nullptr) {
    const int64_t D = dom_indptr.numel() - 1;
    const int64_t* pd = S.pos_dom;
    for (int64_t i = 0; i < B * L; ++i) TORCH_CHECK(pd[i] < D, "pos_domain out of range: ", pd[i], " >= ", D);
  }
  int64_t* po = out.data_ptr<int64_t>();
  at::parallel_for(0, B * L, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sampler::sample_sequence_position(S, i, po + i * num_neg);
  });
  return out;
}

}  // namespace
}  // namespace mbrec_fast

TORCH_LIBRARY_IMPL(mbrec_fast, CPU, m) {
  m.impl("build_interaction_graph", &mbrec_fast::build_interaction_graph_cpu);
  m.impl("sample_negatives", &mbrec_fast::sample_negatives_cpu);
  m.impl("sample_sequence_negatives", &mbrec_fast::sample_sequence_negatives_cpu);
}
