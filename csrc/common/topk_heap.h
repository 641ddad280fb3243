// Bounded top-k selection of the CUDA evaluator (one heap per user, offered by a warp). The CPU ops select
// with a candidate reservoir instead (evaluator_cpu.cpp); both follow the order below.
//
// A heap of k (score, id) slots is a binary min-heap on "worse": the root holds the worst kept
// entry, so rejecting a candidate costs one compare against the root ("threshold reject").
// Order of "better": higher score first, equal scores by lower item id. Empty slots hold
// (-inf, kEmptyId) and are worse than any real item; finalize turns them into (-inf, -1).
#pragma once
#include "hd.h"

namespace mbrec_fast {

constexpr int64_t kEmptyId = INT64_MAX;

// True when (sa, ia) ranks strictly after (sb, ib).
MBREC_HD bool topk_worse(float sa, int64_t ia, float sb, int64_t ib) {
  return sa < sb || (sa == sb && ia > ib);
}

// Fills a heap of k slots with empty entries (a valid heap: all equal).
MBREC_HD void topk_heap_init(float* hs, int64_t* hi, int k) {
  for (int j = 0; j < k; ++j) {
    hs[j] = -__builtin_huge_valf();
    hi[j] = kEmptyId;
  }
}

// Restores the heap property below position pos.
MBREC_HD void topk_heap_sift_down(float* hs, int64_t* hi, int n, int pos) {
  const float s = hs[pos];
  const int64_t id = hi[pos];
  while (true) {
    int child = 2 * pos + 1;
    if (child >= n) break;
    if (child + 1 < n && topk_worse(hs[child + 1], hi[child + 1], hs[child], hi[child])) ++child;
    if (!topk_worse(hs[child], hi[child], s, id)) break;
    hs[pos] = hs[child];
    hi[pos] = hi[child];
    pos = child;
  }
  hs[pos] = s;
  hi[pos] = id;
}

// Offers one candidate; keeps it when it beats the root (the current k-th best). Any id order.
MBREC_HD bool topk_heap_offer(float* hs, int64_t* hi, int k, float score, int64_t id) {
  if (!topk_worse(hs[0], hi[0], score, id)) return false;
  hs[0] = score;
  hi[0] = id;
  topk_heap_sift_down(hs, hi, k, 0);
  return true;
}

// Loads a best-first sorted list (as produced by topk_heap_finalize) back into heap form:
// reversed, it is worst-first, which is a valid min-heap on "worse".
MBREC_HD void topk_heap_load_sorted(const float* sorted_s, const int64_t* sorted_i, float* hs, int64_t* hi, int k) {
  for (int j = 0; j < k; ++j) {
    hs[j] = sorted_s[k - 1 - j];
    hi[j] = sorted_i[k - 1 - j] < 0 ? kEmptyId : sorted_i[k - 1 - j];
  }
}

// Sorts the heap in place best-first and turns empty slots into (-inf, -1).
MBREC_HD void topk_heap_finalize(float* hs, int64_t* hi, int k) {
  for (int n = k - 1; n > 0; --n) {
    const float s = hs[0];
    const int64_t id = hi[0];
    hs[0] = hs[n];
    hi[0] = hi[n];
    hs[n] = s;
    hi[n] = id;
    topk_heap_sift_down(hs, hi, n, 0);
  }
  for (int j = 0; j < k; ++j) {
    if (hi[j] == kEmptyId) {
      hi[j] = -1;
      hs[j] = -__builtin_huge_valf();
    }
  }
}

}  // namespace mbrec_fast
