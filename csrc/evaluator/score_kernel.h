// The evaluator's CPU scoring micro-kernel: interface shared by its variants (csrc/cpu_kernels_<isa>.cpp,
// score_kernel_portable.cpp; body in score_kernel_impl.h) and the op.
//
// A block of users is scored against a range of items without writing scores to memory: the kernel holds
// an mr items x nr users tile in vector accumulators (users along the vector lanes), summing over the
// embedding dim in order (one FMA chain per score, so a score does not depend on blocking, threads or the
// variant's tile shape; the portable variant may round without FMA), compares the tile with the users'
// current k-th best scores (one vector of thresholds) and calls back only for the items that beat one.
// Users are packed d-major once per block ([panel][d][nr]); items are read in place from the row-major
// table (each value is broadcast to the lanes), so the table is never copied for fp32 inputs.
#pragma once
#include <cstdint>

namespace mbrec_fast {

struct ScoreBlockArgs {
  const float* users;   // packed users [n_user_panels][d][nr]; lanes past the block are zero
  int64_t n_user_panels;
  const float* items;   // row-major items [n_items][d]
  int64_t n_items;
  int64_t item0;        // id of items[0] (passed to on_hit)
  int64_t d;
  const float* threshold;  // [n_user_panels * nr]: a user's score counts only when > threshold (+inf on padding)
  float* tail;             // scratch of mr * d floats (the last, partial tile of items)
  // Called for item `item` (an id) and user panel `panel` when the item beats some user's threshold:
  // scores[0, nr) of users panel * nr + j and the lanes j that beat theirs (bit j). May raise thresholds.
  void (*on_hit)(void* ctx, int64_t item, int64_t panel, const float* scores, uint32_t bits);
  void* ctx;
};

struct ScoreKernel {
  const char* name;
  int mr, nr;  // tile: mr items x nr users (nr <= 32)
  void (*score_block)(const ScoreBlockArgs& args);
  // First j' >= j, in steps of 16, whose 16 scores row[j', j' + 16) hold one > threshold (>= with
  // admit_ties); returns the first j' with j' + 16 > n when none does. The top-k merge's pre-filter.
  int64_t (*next_hit_chunk)(const float* row, int64_t j, int64_t n, float threshold, bool admit_ties);
};

// Variants; avx2/avx512 are nullptr where the compiler cannot build them (non-x86). Select with cpu_isa.h.
const ScoreKernel* score_kernel_portable();
const ScoreKernel* score_kernel_avx2();
const ScoreKernel* score_kernel_avx512();

}  // namespace mbrec_fast
