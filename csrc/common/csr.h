// Binary search over sorted CSR rows, shared by CPU and CUDA kernels.
#pragma once
#include "hd.h"

namespace mbrec {

// First position p in [lo, hi) with col[p] >= key (hi if none).
template <typename IdxT, typename KeyT>
MBREC_HD int64_t lower_bound(const IdxT* col, int64_t lo, int64_t hi, KeyT key) {
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (static_cast<KeyT>(col[mid]) < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
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

}  // namespace mbrec
