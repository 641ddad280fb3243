// Binary search over sorted CSR rows, shared by CPU and CUDA kernels.
#pragma once
#include "hd.h"

namespace mbrec_fast {

// First position p in [lo, hi) with col[p] >= key (hi if none). Branch-free halving (the compare
// becomes a conditional move), which avoids mispredictions on the short rows that sampling probes.
template <typename IdxT, typename KeyT>
MBREC_HD int64_t lower_bound(const IdxT* col, int64_t lo, int64_t hi, KeyT key) {
  int64_t len = hi - lo;
  if (len <= 0) return lo;
  const IdxT* base = col + lo;
  while (len > 1) {
    const int64_t half = len >> 1;
    base = (static_cast<KeyT>(base[half]) < key) ? base + half : base;
    len -= half;
  }
  return (base - col) + (static_cast<KeyT>(*base) < key ? 1 : 0);
}

// True when key occurs in the sorted slice col[lo, hi).
template <typename IdxT, typename KeyT>
MBREC_HD bool contains(const IdxT* col, int64_t lo, int64_t hi, KeyT key) {
  const int64_t p = lower_bound(col, lo, hi, key);
  return p < hi && static_cast<KeyT>(col[p]) == key;
}

// Number of entries of the sorted slice col[lo, hi) that are < key.
template <typename IdxT, typename KeyT>
MBREC_HD int64_t count_less(const IdxT* col, int64_t lo, int64_t hi, KeyT key) {
  return lower_bound(col, lo, hi, key) - lo;
}

}  // namespace mbrec_fast
