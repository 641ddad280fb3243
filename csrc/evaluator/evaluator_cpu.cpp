// CPU kernels of the full-ranking evaluator. topk_dot: threads over blocks of users; each block is scored
// against the whole item table by the register-blocked micro-kernel of score_kernel.h, which compares
// each tile with the users' current k-th best scores in registers and hands only the winners to the users'
// candidate reservoirs. Memory: outputs + per thread one packed user block (and, for fp16/bf16 inputs,
// block_items converted item rows). topk_merge / rank_metrics: see docs/evaluator.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "common/csr.h"
#include "common/rank_metrics.h"
#include "common/topk_heap.h"
#include "cpu_isa.h"
#include "evaluator/evaluator_args.h"
#include "evaluator/score_kernel.h"

namespace mbrec_fast {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-user candidate reservoir for the blocked dot-product scan (faiss-style "reservoir top-N"):
// scores above the threshold are appended; when the buffer holds 4k of them, nth_element keeps
// the k best and the k-th best becomes the new threshold. Amortized O(1) per accepted candidate
// instead of a log(k) heap sift, which matters for k ~ 100 over a few thousand items.
// A candidate is one uint64 key ordered exactly like topk_heap.h's "better" (higher score, then
// lower id): the score's order-preserving bits on top, the complemented id (ids < 2^32) below.
struct Reservoir {
  uint64_t* key;
  int64_t n;
  float threshold;
};

inline uint32_t ordered_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float from_ordered_bits(uint32_t u) {
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

inline uint64_t candidate_key(float s, int64_t id) {
  s += 0.0f;  // -0.0 -> +0.0: the two compare equal, so they must tie (then lower id wins)
  return (static_cast<uint64_t>(ordered_bits(s)) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}

// Keeps the k best of the n > k keys and raises the threshold to the k-th best score.
inline void reservoir_shrink(Reservoir& r, int64_t k) {
  std::nth_element(r.key, r.key + (k - 1), r.key + r.n, std::greater<uint64_t>());
  r.n = k;
  r.threshold = from_ordered_bits(static_cast<uint32_t>(r.key[k - 1] >> 32));
}

// Scans scores row[0, n) of items item0 + j (ids increasing, so a tie with the threshold loses and
// the reject test is one compare). The variant's vector pre-filter skips chunks of 16 scores without a
// candidate; a chunk with one is appended branch-free (every key is written, the count advances only for
// scores above the threshold), so unpredictable accept/reject decisions cost no branch mispredictions.
// The buffer has kChunk slots of slack beyond `limit`; it is shrunk to k once it holds >= limit.
constexpr int64_t kChunk = 16;  // the pre-filter (ScoreKernel::next_hit_chunk) works on 16 scores

// kAdmitTies: also keep scores equal to the threshold. Needed when ids do not increase across calls
// (topk_merge takes blocks in any order, so a tie may still win on a lower id); it also admits -inf
// scores while the reservoir is not yet full, as the reference does for non-excluded items.
template <bool kAdmitTies = false>
inline bool passes(float s, float threshold) {
  return kAdmitTies ? s >= threshold : s > threshold;
}

template <bool kAdmitTies = false>
void reservoir_scan(const ScoreKernel& kernel, const float* row, int64_t n, int64_t item0, Reservoir& r,
                    int64_t k, int64_t limit) {
  int64_t j = 0;
  while (true) {
    j = kernel.next_hit_chunk(row, j, n, r.threshold, kAdmitTies);
    if (j + kChunk > n) break;
    const float threshold = r.threshold;
    int64_t m = r.n;
    for (int64_t t = 0; t < kChunk; ++t) {
      const float s = row[j + t];
      r.key[m] = candidate_key(s, item0 + j + t);
      m += static_cast<int64_t>(passes<kAdmitTies>(s, threshold));
    }
    r.n = m;
    if (r.n >= limit) reservoir_shrink(r, k);
    j += kChunk;
  }
  for (; j < n; ++j) {
    const float s = row[j];
    if (passes<kAdmitTies>(s, r.threshold)) {
      r.key[r.n++] = candidate_key(s, item0 + j);
      if (r.n >= limit) reservoir_shrink(r, k);
    }
  }
}

// Writes the k best of the reservoir, best first, padded with (-inf, -1).
void reservoir_finish(Reservoir& r, int64_t k, float* out_s, int64_t* out_i) {
  if (r.n > k) reservoir_shrink(r, k);
  std::sort(r.key, r.key + r.n, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    if (j < r.n) {
      out_s[j] = from_ordered_bits(static_cast<uint32_t>(r.key[j] >> 32));
      out_i[j] = static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(r.key[j]));
    } else {
      out_s[j] = kNegInf;
      out_i[j] = -1;
    }
  }
}

// The scoring micro-kernel variant of this CPU (or the one MBREC_FAST_CPU_ISA forces).
const ScoreKernel& selected_score_kernel() {
  switch (cpu_isa_selected()) {
    case CpuIsa::kAvx512:
      return *score_kernel_avx512();
    case CpuIsa::kAvx2:
      return *score_kernel_avx2();
    default:
      return *score_kernel_portable();
  }
}

// Copies users rows[0, nu) into d-major panels of nr users ([panel][d][nr], zero past nu), in fp32.
template <typename T>
void pack_user_panels(const T* src, const int64_t* rows, int64_t nu, int64_t d, int64_t nr, float* dst) {
  const int64_t n_panels = (nu + nr - 1) / nr;
  for (int64_t q = 0; q < n_panels; ++q) {
    float* panel = dst + q * d * nr;
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t row = q * nr + j;
      if (row < nu) {
        const T* u = src + rows[row] * d;
        for (int64_t kk = 0; kk < d; ++kk) panel[kk * nr + j] = static_cast<float>(u[kk]);
      } else {
        for (int64_t kk = 0; kk < d; ++kk) panel[kk * nr + j] = 0.0f;
      }
    }
  }
}

// One user of a block being scored: its reservoir and its cursor in the sorted exclude row.
struct DotUser {
  Reservoir res;
  int64_t cursor, cursor_end;
};

struct DotBlock {
  DotUser* users;
  float* threshold;  // the kernel's copy of users[r].res.threshold
  const int64_t* ex_idx;
  int64_t k, limit, nr;
};

// The kernel's callback: item `item` beats the thresholds of the users in `bits` (lanes of panel `panel`).
// Items come in increasing id order, so each user's exclude cursor only moves forward and a score equal
// to the threshold never wins (a lower id already holds it).
void dot_block_hit(void* ctx, int64_t item, int64_t panel, const float* scores, uint32_t bits) {
  DotBlock& b = *static_cast<DotBlock*>(ctx);
  while (bits != 0) {
    const int j = __builtin_ctz(bits);
    bits &= bits - 1;
    const int64_t row = panel * b.nr + j;
    DotUser& u = b.users[row];
    const float s = scores[j];
    while (u.cursor < u.cursor_end && b.ex_idx[u.cursor] < item) ++u.cursor;
    if (u.cursor < u.cursor_end && b.ex_idx[u.cursor] == item) continue;
    u.res.key[u.res.n++] = candidate_key(s, item);
    if (u.res.n >= b.limit) {
      reservoir_shrink(u.res, b.k);
      b.threshold[row] = u.res.threshold;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_dot_cpu(const at::Tensor& user_emb, const at::Tensor& item_emb,
                                                const at::Tensor& users, const at::Tensor& excl_indptr,
                                                const at::Tensor& excl_indices, int64_t k, int64_t block_users,
                                                int64_t block_items) {
  check_topk_dot_args(user_emb, item_emb, users, excl_indptr, excl_indices, k, block_users, block_items);
  check_ids_in_range(users, "users", user_emb.size(0));
  const int64_t b = users.size(0), n_items = item_emb.size(0), d = item_emb.size(1);
  auto top_scores = at::empty({b, k}, user_emb.options().dtype(at::kFloat));
  auto top_ids = at::empty({b, k}, user_emb.options().dtype(at::kLong));
  if (b == 0) return {top_scores, top_ids};
  const ScoreKernel& kernel = selected_score_kernel();
  const int64_t mr = kernel.mr, nr = kernel.nr;
  const int64_t bu = std::min(block_users, b);
  const int64_t* uid = users.data_ptr<int64_t>();
  const int64_t* ex_ptr = excl_indptr.data_ptr<int64_t>();
  const int64_t* ex_idx = excl_indices.data_ptr<int64_t>();
  float* out_s = top_scores.data_ptr<float>();
  int64_t* out_i = top_ids.data_ptr<int64_t>();
  const int64_t n_blocks = (b + bu - 1) / bu;
  const auto dtype = user_emb.scalar_type();
  const bool convert = dtype != at::kFloat;
  // fp32 items are read in place; fp16/bf16 ones are converted block_items rows at a time per thread.
  const int64_t chunk = convert ? std::max<int64_t>(mr, std::min(block_items, n_items)) : n_items;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
    const int64_t n_user_panels_max = (bu + nr - 1) / nr;
    at::Tensor user_pack = at::empty({n_user_panels_max * d * nr}, f32);  // 64-byte aligned
    float* upack = user_pack.data_ptr<float>();
    std::vector<float> tail(mr * d);
    at::Tensor item_buf = convert ? at::empty({chunk, d}, f32) : at::Tensor();
    std::vector<float> threshold(n_user_panels_max * nr);
    // Shrink at 2k (topk_merge: 4k): the threshold the kernel compares with stays fresher, which halves the
    // tiles that reach the callback at 100k items, K = 100; nth_element over 2k keys per k appends is cheap.
    const int64_t limit = 2 * k, cap = limit + 1;
    std::vector<uint64_t> res_keys(bu * cap);
    std::vector<DotUser> state(bu);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t u0 = blk * bu, nu = std::min(bu, b - u0);
      const int64_t n_user_panels = (nu + nr - 1) / nr;
      if (dtype == at::kFloat) {
        pack_user_panels(user_emb.data_ptr<float>(), uid + u0, nu, d, nr, upack);
      } else if (dtype == at::kHalf) {
        pack_user_panels(user_emb.data_ptr<at::Half>(), uid + u0, nu, d, nr, upack);
      } else {
        pack_user_panels(user_emb.data_ptr<at::BFloat16>(), uid + u0, nu, d, nr, upack);
      }
      for (int64_t r = 0; r < n_user_panels * nr; ++r) {
        threshold[r] = r < nu ? kNegInf : std::numeric_limits<float>::infinity();
      }
      for (int64_t r = 0; r < nu; ++r) {
        state[r] = DotUser{Reservoir{res_keys.data() + r * cap, 0, kNegInf}, ex_ptr[uid[u0 + r]],
                           ex_ptr[uid[u0 + r] + 1]};
      }
      DotBlock ctx{state.data(), threshold.data(), ex_idx, k, limit, nr};
      for (int64_t i0 = 0; i0 < n_items; i0 += chunk) {
        const int64_t ni = std::min(chunk, n_items - i0);
        const float* items;
        if (convert) {
          item_buf.narrow(0, 0, ni).copy_(item_emb.narrow(0, i0, ni));
          items = item_buf.data_ptr<float>();
        } else {
          items = item_emb.data_ptr<float>() + i0 * d;
        }
        const ScoreBlockArgs args{upack, n_user_panels, items, ni, i0, d, threshold.data(), tail.data(),
                                  &dot_block_hit, &ctx};
        kernel.score_block(args);
      }
      for (int64_t r = 0; r < nu; ++r) {
        reservoir_finish(state[r].res, k, out_s + (u0 + r) * k, out_i + (u0 + r) * k);
      }
    }
  });
  return {top_scores, top_ids};
}

std::tuple<at::Tensor, at::Tensor> topk_merge_cpu(const at::Tensor& block_scores, const at::Tensor& users,
                                                  int64_t item_start, const at::Tensor& excl_indptr,
                                                  const at::Tensor& excl_indices, const at::Tensor& top_scores,
                                                  const at::Tensor& top_ids) {
  check_topk_merge_args(block_scores, users, item_start, excl_indptr, excl_indices, top_scores, top_ids);
  check_ids_in_range(users, "users", excl_indptr.numel() - 1);
  const int64_t b = block_scores.size(0), w = block_scores.size(1), k = top_scores.size(1);
  auto new_s = at::empty_like(top_scores);
  auto new_i = at::empty_like(top_ids);
  const float* bs = block_scores.data_ptr<float>();
  const int64_t* uid = users.data_ptr<int64_t>();
  const int64_t* ex_ptr = excl_indptr.data_ptr<int64_t>();
  const int64_t* ex_idx = excl_indices.data_ptr<int64_t>();
  const float* old_s = top_scores.data_ptr<float>();
  const int64_t* old_i = top_ids.data_ptr<int64_t>();
  float* hs_all = new_s.data_ptr<float>();
  int64_t* hi_all = new_i.data_ptr<int64_t>();
  TORCH_CHECK(item_start + w <= (int64_t(1) << 32) - 1, "item ids must stay below 2^32 - 1, got item_start + width = ",
              item_start + w);
  TORCH_CHECK(top_ids.numel() == 0 || top_ids.max().item<int64_t>() < (int64_t(1) << 32) - 1,
              "top_ids must stay below 2^32 - 1");
  // Reservoir selection (as in topk_dot): the old k best and every passing score of the block become
  // packed (score, id) keys; nth_element trims them to k whenever 4k are buffered. Excluded items are
  // skipped by scanning the block in segments between them (the exclude row is sorted).
  const ScoreKernel& kernel = selected_score_kernel();
  at::parallel_for(0, b, 16, [&](int64_t r0, int64_t r1) {
    const int64_t limit = 4 * k, cap = limit + kChunk + k;
    std::vector<uint64_t> keys(cap);
    for (int64_t r = r0; r < r1; ++r) {
      Reservoir res{keys.data(), 0, kNegInf};
      const float* os = old_s + r * k;
      const int64_t* oi = old_i + r * k;
      for (int64_t j = 0; j < k; ++j) {
        if (oi[j] < 0) continue;  // empty slot
        res.key[res.n++] = candidate_key(os[j], oi[j]);
      }
      if (res.n >= k) reservoir_shrink(res, k);
      const float* row = bs + r * w;
      const int64_t* e = ex_idx + ex_ptr[uid[r]];
      const int64_t* e_end = ex_idx + ex_ptr[uid[r] + 1];
      e = std::lower_bound(e, e_end, item_start);
      int64_t a = 0;
      for (; e != e_end && *e < item_start + w; ++e) {
        const int64_t x = *e - item_start;
        if (x > a) reservoir_scan<true>(kernel, row + a, x - a, item_start + a, res, k, limit);
        a = x + 1;
      }
      if (a < w) reservoir_scan<true>(kernel, row + a, w - a, item_start + a, res, k, limit);
      reservoir_finish(res, k, hs_all + r * k, hi_all + r * k);
    }
  });
  return {new_s, new_i};
}

std::tuple<at::Tensor, at::Tensor> rank_metrics_cpu(const at::Tensor& top_ids, const at::Tensor& users,
                                                    const at::Tensor& tgt_indptr, const at::Tensor& tgt_indices,
                                                    const at::Tensor& tgt_groups, int64_t n_groups,
                                                    at::IntArrayRef ks) {
  check_rank_metrics_args(top_ids, users, tgt_indptr, tgt_indices, tgt_groups, n_groups, ks);
  check_ids_in_range(users, "users", tgt_indptr.numel() - 1);
  const int64_t b = top_ids.size(0), kmax = top_ids.size(1), n_ks = static_cast<int64_t>(ks.size());
  auto values = at::zeros({n_groups + 1, b, n_ks, kNumRankMetrics}, top_ids.options().dtype(at::kDouble));
  auto counts = at::zeros({n_groups + 1, b}, top_ids.options().dtype(at::kLong));
  const int64_t* top = top_ids.data_ptr<int64_t>();
  const int64_t* uid = users.data_ptr<int64_t>();
  const int64_t* ptr = tgt_indptr.data_ptr<int64_t>();
  const int64_t* tgt = tgt_indices.data_ptr<int64_t>();
  const int64_t* labels = n_groups > 0 ? tgt_groups.data_ptr<int64_t>() : nullptr;
  double* val = values.data_ptr<double>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  const std::vector<int64_t> cutoffs(ks.begin(), ks.end());
  at::parallel_for(0, b, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      rank_metrics_row(top + r * kmax, r, b, tgt, labels, ptr[uid[r]], ptr[uid[r] + 1], n_groups,
                              cutoffs.data(), n_ks, val, cnt);
    }
  });
  return {values, counts};
}

}  // namespace mbrec_fast

TORCH_LIBRARY_IMPL(mbrec_fast, CPU, m) {
  m.impl("topk_dot", &mbrec_fast::topk_dot_cpu);
  m.impl("topk_merge", &mbrec_fast::topk_merge_cpu);
  m.impl("rank_metrics", &mbrec_fast::rank_metrics_cpu);
}
