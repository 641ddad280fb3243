// Shared negative-sampling logic: one set of MBREC_HD functions called by the CPU (OpenMP) kernel and
// the CUDA kernel, so that for a given (seed, offset) both produce the same bits.
//
// Every row (one positive) owns one Philox stream keyed by (seed, offset, row index) and consumes it
// sequentially, so the output never depends on the thread count or on the device.
//
// Pools are described by sorted, distinct int32 rows ("spans") of the packed graph storage:
//  * complement pools: [0, n_items) minus an excluded row (exclusive, strict, unvisited, never-touched);
//    drawn by bounded rejection (uniform or alias-table popularity), then an exact fallback
//    (complement indexing, or an integer prefix-sum walk for weights) — exact, and never a hang;
//  * own pools: a user's row A minus a row B (visited, cascade levels): index into A, reject members of
//    B by binary search, then an exact fallback that counts and selects A \ B.
// Without replacement, the draws of a row so far are kept sorted in the output row and excluded as well;
// at the end the row is shuffled (Fisher-Yates) with the same stream.
#pragma once
#include "csr.h"
#include "hd.h"
#include "philox.h"

namespace mbrec_fast {
namespace sampler {

constexpr int kMaxTries = 32;          // rejection attempts before the exact fallback
constexpr int64_t kOwnPoolDirect = 4;  // own pools with at most this many candidates go exact at once

enum Mode : int { kExclusive = 0, kStrict = 1, kCascade = 2, kVisited = 3, kUnvisited = 4 };

// A sorted, duplicate-free slice of item ids.
struct Span {
  const int32_t* p;
  int64_t n;
};

// The draws of the current row so far, sorted, duplicate-free (may overlap the excluded row).
struct Prev {
  const int64_t* p;
  int64_t n;
};

// Rows up to this length are scanned instead of searched: a branch-free compare over every entry has no
// chain of dependent loads (a binary search step waits for the previous one) and vectorizes on the CPU.
constexpr int64_t kScanRowMax = 64;

MBREC_HOT bool in_span(Span s, int64_t x) {
  if (s.n <= 0) return false;
  if (s.n > kScanRowMax) return contains(s.p, 0, s.n, x);
  const int32_t key = static_cast<int32_t>(x);  // item ids fit int32 (the graph stores them so)
  if (s.n < 8) {
    int hit = 0;
    for (int64_t i = 0; i < s.n; ++i) hit |= (s.p[i] == key);
    return hit != 0;
  }
  // Lane-wise accumulation over blocks of 8 plus one last block overlapping the previous ones: fixed-width
  // compares the compiler keeps in one vector register, no scalar remainder loop, one reduction at the end.
  int acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = (s.p[s.n - 8 + j] == key);
  for (int64_t i = 0; i + 8 <= s.n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] |= (s.p[i + j] == key);
  }
  int hit = 0;
  for (int j = 0; j < 8; ++j) hit |= acc[j];
  return hit != 0;
}

MBREC_HOT bool in_prev(Prev s, int64_t x) { return s.n > 0 && contains(s.p, 0, s.n, x); }

// Popularity weights: Vose alias table (thr[k] out of 2^32, alias[k]) and the same weights quantized to
// integers (wq) with their prefix sums (prefix[n_items + 1]) for the exact fallback. thr == nullptr: uniform.
struct Weights {
  const int64_t* thr;
  const int32_t* alias;
  const int64_t* wq;
  const int64_t* prefix;
};

MBREC_HOT int64_t alias_draw(const Weights& w, int64_t n, PhiloxStream& rng) {
  const int64_t k = static_cast<int64_t>(rng.uniform_below(static_cast<uint64_t>(n)));
  const uint64_t coin = rng.next_u32();
  return coin < static_cast<uint64_t>(w.thr[k]) ? k : static_cast<int64_t>(w.alias[k]);
}

// ---- complement pools: [0, n) \ (ex U prev) ------------------------------------------------------------

// The j-th (0-based) id of [0, n) that is not in ex; requires j < n - ex.n.
// ex[k] - k is non-decreasing, so the answer is j + (smallest k with ex[k] - k > j).
MBREC_HD int64_t complement_select(Span ex, int64_t j) {
  int64_t lo = 0, hi = ex.n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (static_cast<int64_t>(ex.p[mid]) - mid <= j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return j + lo;
}

// Number of entries of prev that are not in ex.
MBREC_HD int64_t prev_outside(Span ex, Prev pv) {
  int64_t c = 0;
  for (int64_t i = 0; i < pv.n; ++i) c += in_span(ex, pv.p[i]) ? 0 : 1;
  return c;
}

// The j-th id of [0, n) \ (ex U prev): shift j past the complement indices of prev (sorted), then select.
MBREC_HD int64_t complement_select_excluding(Span ex, Prev pv, int64_t j) {
  for (int64_t i = 0; i < pv.n; ++i) {
    const int64_t p = pv.p[i];
    const int64_t lb = lower_bound(ex.p, 0, ex.n, p);
    if (lb < ex.n && static_cast<int64_t>(ex.p[lb]) == p) continue;
    const int64_t c = p - lb;  // index of p among the ids not in ex
    if (c <= j) {
      ++j;
    } else {
      break;
    }
  }
  return complement_select(ex, j);
}

// Exact popularity draw from [0, n) \ (ex U prev): integer weight total, one integer draw, and a walk over
// the gaps between excluded ids with a binary search on the prefix sums inside the chosen gap.
// The weight sums are unsigned: AliasTable keeps them below 2^62 (no wrap, the same values as signed), and
// tables from elsewhere wrap (defined behaviour) instead of overflowing a signed integer.
// Ids outside [0, n) (graph storage not built by InteractionGraph, passed to the raw op) weigh 0 and are
// skipped by the walk, so they are never used as an index; valid rows never take those branches.
MBREC_HD uint64_t weight_of(const Weights& w, int64_t x, int64_t n) {
  return (x >= 0 && x < n) ? static_cast<uint64_t>(w.wq[x]) : 0;
}

MBREC_HD int64_t weighted_complement_exact(Span ex, Prev pv, int64_t n, const Weights& w, PhiloxStream& rng) {
  uint64_t total = static_cast<uint64_t>(w.prefix[n]);
  for (int64_t i = 0; i < ex.n; ++i) total -= weight_of(w, ex.p[i], n);
  for (int64_t i = 0; i < pv.n; ++i) {
    if (!in_span(ex, pv.p[i])) total -= weight_of(w, pv.p[i], n);
  }
  if (static_cast<int64_t>(total) <= 0) return -1;
  uint64_t t = rng.uniform_below(total);
  int64_t a = 0, ie = 0, ip = 0;
  while (a < n) {
    while (ie < ex.n && ex.p[ie] < a) ++ie;  // only out-of-order ids (not sorted storage) are behind a
    while (ip < pv.n && pv.p[ip] < a) ++ip;
    int64_t b = n;
    if (ie < ex.n && ex.p[ie] < b) b = ex.p[ie];
    if (ip < pv.n && pv.p[ip] < b) b = pv.p[ip];
    const uint64_t seg = static_cast<uint64_t>(w.prefix[b]) - static_cast<uint64_t>(w.prefix[a]);
    if (t < seg) {
      // smallest x in [a, b) with prefix[x + 1] > prefix[a] + t (so wq[x] > 0)
      const int64_t target = static_cast<int64_t>(static_cast<uint64_t>(w.prefix[a]) + t);
      int64_t lo = a, hi = b - 1;
      while (lo < hi) {
        const int64_t mid = lo + ((hi - lo) >> 1);
        if (w.prefix[mid + 1] > target) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      return lo;
    }
    t -= seg;
    if (ie < ex.n && ex.p[ie] == b) ++ie;
    if (ip < pv.n && pv.p[ip] == b) ++ip;
    a = b + 1;
  }
  return -1;  // unreachable when the totals are consistent
}

// One draw from [0, n) \ (ex U prev), uniform or popularity-weighted; -1 when the pool is empty.
MBREC_HOT int64_t complement_draw(Span ex, Prev pv, int64_t n, const Weights& w, PhiloxStream& rng) {
  if (n <= 0) return -1;
  if (w.thr == nullptr) {
    // Rejection only when at least half of the ids are allowed (ex.n + prev.n bounds the excluded count):
    // at most 2 tries on average. Otherwise the exact O(log) complement index is cheaper. The choice
    // depends on sizes only, so it is deterministic.
    if (ex.n + pv.n <= n / 2) {
      for (int tries = 0; tries < kMaxTries; ++tries) {
        const int64_t x = static_cast<int64_t>(rng.uniform_below(static_cast<uint64_t>(n)));
        if (!in_span(ex, x) && !in_prev(pv, x)) return x;
      }
    }
    const int64_t allowed = n - ex.n - prev_outside(ex, pv);
    if (allowed <= 0) return -1;
    return complement_select_excluding(ex, pv, static_cast<int64_t>(rng.uniform_below(static_cast<uint64_t>(allowed))));
  }
  for (int tries = 0; tries < kMaxTries; ++tries) {
    const int64_t x = alias_draw(w, n, rng);
    if (!in_span(ex, x) && !in_prev(pv, x)) return x;
  }
  return weighted_complement_exact(ex, pv, n, w, rng);
}

// ---- own pools: A \ (B U prev) ------------------------------------------------------------------------

MBREC_HOT bool own_allowed(Span B, Prev pv, int64_t x) { return !in_span(B, x) && !in_prev(pv, x); }

MBREC_HD int64_t own_count(Span A, Span B, Prev pv) {
  int64_t c = 0;
  for (int64_t i = 0; i < A.n; ++i) c += own_allowed(B, pv, A.p[i]) ? 1 : 0;
  return c;
}

// The j-th allowed entry of A (requires j < own_count).
MBREC_HD int64_t own_select(Span A, Span B, Prev pv, int64_t j) {
  for (int64_t i = 0; i < A.n; ++i) {
    if (own_allowed(B, pv, A.p[i])) {
      if (j == 0) return A.p[i];
      --j;
    }
  }
  return -1;
}

// One uniform draw from A \ (B U prev); -1 when empty.
MBREC_HOT int64_t own_draw(Span A, Span B, Prev pv, PhiloxStream& rng) {
  if (A.n == 0) return -1;
  if (A.n > kOwnPoolDirect) {
    for (int tries = 0; tries < kMaxTries; ++tries) {
      const int64_t x = A.p[rng.uniform_below(static_cast<uint64_t>(A.n))];
      if (own_allowed(B, pv, x)) return x;
    }
  }
  const int64_t c = own_count(A, B, pv);
  if (c == 0) return -1;
  return own_select(A, B, pv, static_cast<int64_t>(rng.uniform_below(static_cast<uint64_t>(c))));
}

// Own pool A \ (B U prev) when B is a subset of A (visited pool at an auxiliary behavior: the behavior's
// row lies inside the auxiliary union). Then |A \ B| = |A| - |B| and the j-th allowed entry is found by
// complement indexing over the positions of B inside A: exact in O(log^2), no rejection needed.
MBREC_HD int64_t subset_pool_draw(Span A, Span B, Prev pv, PhiloxStream& rng) {
  // previous draws that lie in A \ B (others cannot be drawn anyway)
  int64_t n_prev = 0;
  for (int64_t i = 0; i < pv.n; ++i) n_prev += (in_span(A, pv.p[i]) && !in_span(B, pv.p[i])) ? 1 : 0;
  const int64_t allowed = A.n - B.n - n_prev;
  if (allowed <= 0) return -1;
  int64_t j = static_cast<int64_t>(rng.uniform_below(static_cast<uint64_t>(allowed)));
  for (int64_t i = 0; i < pv.n; ++i) {  // shift past the pool indices of previous draws (sorted)
    const int64_t p = pv.p[i];
    if (!in_span(A, p) || in_span(B, p)) continue;
    const int64_t c = lower_bound(A.p, 0, A.n, p) - lower_bound(B.p, 0, B.n, p);
    if (c <= j) {
      ++j;
    } else {
      break;
    }
  }
  // smallest k with pos(B[k]) - k > j, where pos(B[k]) is B[k]'s index in A
  int64_t lo = 0, hi = B.n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (lower_bound(A.p, 0, A.n, static_cast<int64_t>(B.p[mid])) - mid <= j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return A.p[j + lo];
}

// ---- rows ----------------------------------------------------------------------------------------------

// Packed graph: slot k (0..R-1 behaviors, R touched, R+1 auxiliary union), row u =
// indices[indptr[k * stride + u] : indptr[k * stride + u + 1]].
struct GraphView {
  const int64_t* indptr;
  int64_t stride;  // n_users + 1
  const int32_t* indices;
  int R;
  int64_t n_items;
};

MBREC_HOT Span graph_row(const GraphView& g, int slot, int64_t u) {
  const int64_t lo = g.indptr[slot * g.stride + u];
  const int64_t hi = g.indptr[slot * g.stride + u + 1];
  return Span{g.indices + lo, hi - lo};
}

struct RowParams {
  GraphView g;
  const int64_t* level_thr;  // [R * R] cumulative thresholds out of 2^32 (cascade)
  Weights w;
  int mode;
  bool replacement;
  int64_t num_neg;
  uint64_t seed;
  uint64_t offset;
};

// Cascade level for a positive at behavior r: first l with draw < thr[r][l]; R-1 means never-touched.
MBREC_HD int choose_level(const int64_t* thr_row, int R, uint32_t draw) {
  for (int l = 0; l < R - 1; ++l) {
    if (static_cast<uint64_t>(draw) < static_cast<uint64_t>(thr_row[l])) return l;
  }
  return R - 1;
}

// The slot of the excluded row of the complement modes (exclusive, strict, unvisited); for the other
// modes the slot of the positive's behavior (the row every draw of theirs reads as well).
MBREC_HOT int primary_slot(const RowParams& P, int r) {
  const int R = P.g.R;
  switch (P.mode) {
    case kStrict:
      return R;
    case kUnvisited:  // aux U at_r is the auxiliary union when r is auxiliary, the touched union when r is the target
      return r == R - 1 ? R : R + 1;
    default:
      return r;
  }
}

// The excluded row of the complement modes (exclusive, strict, unvisited).
MBREC_HOT Span complement_row(const RowParams& P, int64_t u, int r) { return graph_row(P.g, primary_slot(P, r), u); }

MBREC_HOT bool is_complement_mode(int mode) { return mode == kExclusive || mode == kStrict || mode == kUnvisited; }

MBREC_HOT int64_t draw_one(const RowParams& P, int64_t u, int r, Prev pv, PhiloxStream& rng) {
  const GraphView& g = P.g;
  const int R = g.R;
  const Span at_r = graph_row(g, r, u);
  switch (P.mode) {
    case kExclusive:
    case kStrict:
    case kUnvisited:
      return complement_draw(complement_row(P, u, r), pv, g.n_items, P.w, rng);
    case kVisited:
      if (r < R - 1) return subset_pool_draw(graph_row(g, R + 1, u), at_r, pv, rng);
      return own_draw(graph_row(g, R + 1, u), at_r, pv, rng);
    default: {  // kCascade
      const int level = choose_level(P.level_thr + static_cast<int64_t>(r) * R, R, rng.next_u32());
      int64_t x = -1;
      if (level < R - 1 && level < r) x = own_draw(graph_row(g, level, u), at_r, pv, rng);
      // documented fallbacks: an empty level pool -> never-touched items -> items not done at r
      if (x < 0) x = complement_draw(graph_row(g, R, u), pv, g.n_items, P.w, rng);
      if (x < 0) x = complement_draw(at_r, pv, g.n_items, P.w, rng);
      return x;
    }
  }
}

// Fills out[0, num_neg) for one row (user u, positive behavior r). -1 marks draws with no allowed item.
// pre/n_pre: the first Philox blocks of the row's stream, when the caller computed them ahead.
MBREC_HD void sample_row(const RowParams& P, int64_t row, int64_t u, int r, int64_t* out,
                         const Philox4* pre = nullptr, uint32_t n_pre = 0) {
  PhiloxStream rng(P.seed, P.offset, static_cast<uint64_t>(row), pre, n_pre);
  if (P.replacement) {
    const Prev none{nullptr, 0};
    // complement modes (the common case): the excluded row is looked up once, not per draw
    const bool complement = is_complement_mode(P.mode);
    const Span ex = complement ? complement_row(P, u, r) : Span{nullptr, 0};
    for (int64_t d = 0; d < P.num_neg; ++d) {
      const int64_t x = complement ? complement_draw(ex, none, P.g.n_items, P.w, rng) : draw_one(P, u, r, none, rng);
      if (x < 0) {  // the allowed set is empty: every further draw would be empty too
        for (int64_t e = d; e < P.num_neg; ++e) out[e] = -1;
        return;
      }
      out[d] = x;
    }
    return;
  }
  int64_t k = 0;  // out[0, k) holds the distinct draws so far, sorted
  for (int64_t d = 0; d < P.num_neg; ++d) {
    const int64_t x = draw_one(P, u, r, Prev{out, k}, rng);
    if (x < 0) break;
    int64_t pos = k;
    while (pos > 0 && out[pos - 1] > x) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = x;
    ++k;
  }
  for (int64_t i = k - 1; i > 0; --i) {  // Fisher-Yates: a uniformly random order of the sample
    const int64_t j = static_cast<int64_t>(rng.uniform_below(static_cast<uint64_t>(i + 1)));
    const int64_t t = out[i];
    out[i] = out[j];
    out[j] = t;
  }
  for (int64_t e = k; e < P.num_neg; ++e) out[e] = -1;
}

// ---- sequences -----------------------------------------------------------------------------------------

struct SeqParams {
  const int32_t* excl;      // [B, excl_stride] sorted distinct items of each sequence (+ pad id when an item)
  int64_t excl_stride;
  const int64_t* excl_len;  // [B]
  const int64_t* pos_dom;   // [B * L]: domain of each position, -1 for padding
  const int64_t* dom_indptr;  // [D + 1] or nullptr (no domain restriction)
  const int32_t* dom_items;   // items sorted by (domain, id)
  int64_t L;
  int64_t n_items;
  int64_t num_neg;
  int64_t pad;
  uint64_t seed;
  uint64_t offset;
};

// Fills out[0, num_neg) for position (b, t) = index; the stream is keyed by b * L + t.
MBREC_HD void sample_sequence_position(const SeqParams& S, int64_t index, int64_t* out) {
  const int64_t b = index / S.L;
  const int64_t d = S.pos_dom[index];
  if (d < 0) {
    for (int64_t e = 0; e < S.num_neg; ++e) out[e] = S.pad;
    return;
  }
  PhiloxStream rng(S.seed, S.offset, static_cast<uint64_t>(index));
  const Span ex{S.excl + b * S.excl_stride, S.excl_len[b]};
  const Prev none{nullptr, 0};
  const Weights uniform{nullptr, nullptr, nullptr, nullptr};
  for (int64_t e = 0; e < S.num_neg; ++e) {
    int64_t x;
    if (S.dom_indptr == nullptr) {
      x = complement_draw(ex, none, S.n_items, uniform, rng);
    } else {
      const Span dom{S.dom_items + S.dom_indptr[d], S.dom_indptr[d + 1] - S.dom_indptr[d]};
      x = own_draw(dom, ex, none, rng);
    }
    if (x < 0) {
      for (int64_t f = e; f < S.num_neg; ++f) out[f] = -1;
      return;
    }
    out[e] = x;
  }
}

}  // namespace sampler
}  // namespace mbrec_fast
