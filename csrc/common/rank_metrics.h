// RecBole top-K metrics of one ranked list, shared by the CPU and CUDA evaluators.
//
// The user's targets are a sorted slice tgt[lo, hi) (duplicates allowed, counted once); an optional
// label per target selects a group (a duplicated id keeps the label of its first occurrence).
#pragma once
#include <cmath>

#include "csr.h"
#include "hd.h"

namespace mbrec_fast {

enum RankMetric { kHR = 0, kNDCG = 1, kRecall = 2, kPrecision = 3, kMRR = 4, kNumRankMetrics = 5 };

// Label of target slot p (the first occurrence of its id), or 0 without labels.
MBREC_HD int64_t target_label(const int64_t* labels, int64_t p) { return labels ? labels[p] : 0; }

// Distinct targets of the slice that belong to group (group < 0: all groups).
MBREC_HD int64_t count_distinct_targets(const int64_t* tgt, const int64_t* labels, int64_t lo, int64_t hi, int64_t group) {
  int64_t n = 0;
  for (int64_t p = lo; p < hi; ++p) {
    if (p > lo && tgt[p] == tgt[p - 1]) continue;  // duplicate: counted with its first occurrence
    if (group < 0 || target_label(labels, p) == group) ++n;
  }
  return n;
}

// Metrics at cutoff k of ranked ids top[0, k) (id -1 = empty slot, never a hit) against the group's
// n_targets >= 1 distinct targets; writes kNumRankMetrics doubles to out.
MBREC_HD void rank_metrics_at(const int64_t* top, int k, const int64_t* tgt, const int64_t* labels, int64_t lo,
                              int64_t hi, int64_t group, int64_t n_targets, double* out) {
  int64_t hits = 0, first_rank = 0;
  double dcg = 0.0;
  for (int r = 0; r < k; ++r) {
    const int64_t id = top[r];
    if (id < 0) continue;
    const int64_t p = lower_bound(tgt, lo, hi, id);
    if (p >= hi || tgt[p] != id) continue;
    if (group >= 0 && target_label(labels, p) != group) continue;
    ++hits;
    dcg += 1.0 / log2(static_cast<double>(r + 2));
    if (first_rank == 0) first_rank = r + 1;
  }
  const int64_t ideal = n_targets < k ? n_targets : k;
  double idcg = 0.0;
  for (int64_t r = 1; r <= ideal; ++r) idcg += 1.0 / log2(static_cast<double>(r + 1));
  out[kHR] = hits > 0 ? 1.0 : 0.0;
  out[kNDCG] = dcg / idcg;
  out[kRecall] = static_cast<double>(hits) / static_cast<double>(n_targets);
  out[kPrecision] = static_cast<double>(hits) / static_cast<double>(k);
  out[kMRR] = first_rank ? 1.0 / static_cast<double>(first_rank) : 0.0;
}

// Every metric of row r (ranked ids top_row[0, kmax)) whose targets are tgt[lo, hi): for the whole row
// (group -1) and each label group, the distinct target count goes to cnt[slot] and, when non-zero, the
// metrics at each cutoff to val[(slot * n_ks + j) * kNumRankMetrics], with slot = (group + 1) * b + r.
MBREC_HD void rank_metrics_row(const int64_t* top_row, int64_t r, int64_t b, const int64_t* tgt,
                               const int64_t* labels, int64_t lo, int64_t hi, int64_t n_groups,
                               const int64_t* cutoffs, int64_t n_ks, double* val, int64_t* cnt) {
  for (int64_t g = -1; g < n_groups; ++g) {
    const int64_t slot = (g + 1) * b + r;
    const int64_t n = count_distinct_targets(tgt, labels, lo, hi, g);
    cnt[slot] = n;
    if (n == 0) continue;
    for (int64_t j = 0; j < n_ks; ++j) {
      rank_metrics_at(top_row, static_cast<int>(cutoffs[j]), tgt, labels, lo, hi, g, n,
                      val + (slot * n_ks + j) * kNumRankMetrics);
    }
  }
}

}  // namespace mbrec_fast
