// Counter-based Philox-4x32-10 RNG (Salmon et al., SC'11), shared by CPU and CUDA.
// A stream is keyed by (seed, offset, index): the same triple gives the same numbers on
// any thread count and any device, which is what makes sampling reproducible.
#pragma once
#include "hd.h"

namespace mbrec_fast {

struct Philox4 {
  uint32_t v[4];
};

MBREC_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Ten rounds of Philox-4x32 on counter ctr with key (k0, k1).
MBREC_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, ctr.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(kM1, ctr.v[2], &hi1);
    Philox4 next;
    next.v[0] = hi1 ^ ctr.v[1] ^ k0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ ctr.v[3] ^ k1;
    next.v[3] = lo0;
    ctr = next;
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// The key of the streams of (seed, offset). The high word of the offset is folded into the key;
// offsets below 2^32 (the usual "epoch * steps + step" counters) therefore give disjoint counter
// ranges under one key.
MBREC_HD uint32_t philox_key0(uint64_t seed, uint64_t) { return static_cast<uint32_t>(seed); }
MBREC_HD uint32_t philox_key1(uint64_t seed, uint64_t offset) {
  return static_cast<uint32_t>(seed >> 32) ^ (static_cast<uint32_t>(offset >> 32) * 0x9E3779B9u);
}

// Counter of block `block` of stream `index`.
MBREC_HD Philox4 philox_counter(uint64_t index, uint32_t block, uint64_t offset) {
  Philox4 ctr;
  ctr.v[0] = static_cast<uint32_t>(index);
  ctr.v[1] = static_cast<uint32_t>(index >> 32);
  ctr.v[2] = block;
  ctr.v[3] = static_cast<uint32_t>(offset);
  return ctr;
}

// A stream of 32-bit draws for one logical sample: key = seed, counter = (index, block, offset).
// Each call to next() consumes one 32-bit word; a fresh Philox block is computed every 4 words.
class PhiloxStream {
 public:
  // pre[0, n_pre): the stream's first blocks computed ahead (e.g. for many streams at once with
  // SIMD); they must equal what philox4x32_10 gives for those counters.
  MBREC_HD PhiloxStream(uint64_t seed, uint64_t offset, uint64_t index, const Philox4* pre = nullptr,
                        uint32_t n_pre = 0)
      : k0_(philox_key0(seed, offset)), k1_(philox_key1(seed, offset)), index_(index), offset_(offset),
        block_(0), used_(4), pre_(pre), n_pre_(n_pre) {}

  MBREC_HOT uint32_t next_u32() {
    if (used_ == 4) {
      buf_ = block_ < n_pre_ ? pre_[block_] : philox4x32_10(philox_counter(index_, block_, offset_), k0_, k1_);
      ++block_;
      used_ = 0;
    }
    return buf_.v[used_++];
  }

  // Uniform integer in [0, n) for n >= 1, without modulo bias (Lemire's method with rejection).
  MBREC_HOT uint64_t uniform_below(uint64_t n) {
    if (n <= 0xFFFFFFFFull) {
      const uint32_t n32 = static_cast<uint32_t>(n);
      uint64_t m = static_cast<uint64_t>(next_u32()) * n32;
      uint32_t low = static_cast<uint32_t>(m);
      if (low < n32) {
        const uint32_t threshold = static_cast<uint32_t>(-n32) % n32;
        while (low < threshold) {
          m = static_cast<uint64_t>(next_u32()) * n32;
          low = static_cast<uint32_t>(m);
        }
      }
      return m >> 32;
    }
    // 64-bit range: rejection on the smallest covering power of two.
    uint64_t mask = n - 1;
    mask |= mask >> 1; mask |= mask >> 2; mask |= mask >> 4;
    mask |= mask >> 8; mask |= mask >> 16; mask |= mask >> 32;
    while (true) {
      const uint64_t r = ((static_cast<uint64_t>(next_u32()) << 32) | next_u32()) & mask;
      if (r < n) return r;
    }
  }

  // Uniform float in [0, 1) with 24 bits of precision.
  MBREC_HD float uniform_float() {
    return static_cast<float>(next_u32() >> 8) * (1.0f / 16777216.0f);
  }

 private:
  uint32_t k0_, k1_;
  uint64_t index_, offset_;
  uint32_t block_;
  uint32_t used_;
  const Philox4* pre_;
  uint32_t n_pre_;
  Philox4 buf_;
};

}  // namespace mbrec_fast
