// Philox-4x32-10 blocks of many streams at once on the CPU (AVX2: 8 streams per vector), so that
// the per-row stream setup of the sampler costs a fraction of the scalar rounds. The blocks are the
// ones common/philox.h computes one at a time (same key, same counters); sample_row consumes them
// through PhiloxStream's `pre` blocks and computes any further block itself. The AVX2 loop is compiled
// for AVX2 by a target attribute and only runs when the caller says the CPU has it (cpu_isa.h); the
// words are integers, so both paths give the same bits.
#pragma once
#include <cstdint>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MBREC_PHILOX_AVX2 1
#endif

#include "common/philox.h"

namespace mbrec_fast {

#if defined(MBREC_PHILOX_AVX2)
// Rows [0, i) of philox_blocks_batch by groups of 8 (one stream per lane); returns i.
__attribute__((target("avx2"))) inline int64_t philox_blocks_batch_avx2(uint32_t k0, uint32_t k1, uint64_t offset,
                                                                          int64_t row0, int64_t n_rows,
                                                                          uint32_t n_blocks, Philox4* out) {
  int64_t i = 0;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i + 8 <= n_rows; i += 8) {
    const uint64_t first = static_cast<uint64_t>(row0 + i);
    // rows first..first+7: the low words step by one; the high word is the same unless they straddle 2^32
    const bool same_high = (first >> 32) == ((first + 7) >> 32);
    if (!same_high) break;
    const __m256i idx_lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first))), lane);
    const __m256i idx_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
    for (uint32_t blk = 0; blk < n_blocks; ++blk) {
      __m256i v0 = idx_lo, v1 = idx_hi;
      __m256i v2 = _mm256_set1_epi32(static_cast<int>(blk));
      __m256i v3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
      uint32_t a = k0, b = k1;
      for (int round = 0; round < 10; ++round) {
        // 32x32 -> 64-bit products of the even lanes, then of the odd lanes shifted down
        const __m256i p0e = _mm256_mul_epu32(v0, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(v0, 32), m0);
        const __m256i p1e = _mm256_mul_epu32(v2, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(v2, 32), m1);
        const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
        const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0xAA);
        const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, v1), _mm256_set1_epi32(static_cast<int>(a)));
        const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, v3), _mm256_set1_epi32(static_cast<int>(b)));
        v0 = n0;
        v1 = lo1;
        v2 = n2;
        v3 = lo0;
        a += 0x9E3779B9u;
        b += 0xBB67AE85u;
      }
      alignas(32) uint32_t w[4][8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(w[0]), v0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w[1]), v1);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w[2]), v2);
      _mm256_store_si256(reinterpret_cast<__m256i*>(w[3]), v3);
      for (int l = 0; l < 8; ++l) {
        Philox4& o = out[(i + l) * n_blocks + blk];
        o.v[0] = w[0][l];
        o.v[1] = w[1][l];
        o.v[2] = w[2][l];
        o.v[3] = w[3][l];
      }
    }
  }
  return i;
}
#endif

// out[i * n_blocks + j] = block j of stream (row0 + i), for i < n_rows, j < n_blocks. simd: the CPU runs AVX2.
inline void philox_blocks_batch(uint64_t seed, uint64_t offset, int64_t row0, int64_t n_rows, uint32_t n_blocks,
                                Philox4* out, bool simd) {
  const uint32_t k0 = philox_key0(seed, offset), k1 = philox_key1(seed, offset);
  int64_t i = 0;
#if defined(MBREC_PHILOX_AVX2)
  if (simd) i = philox_blocks_batch_avx2(k0, k1, offset, row0, n_rows, n_blocks, out);
#else
  (void)simd;
#endif
  for (; i < n_rows; ++i) {
    for (uint32_t blk = 0; blk < n_blocks; ++blk) {
      out[i * n_blocks + blk] = philox4x32_10(philox_counter(static_cast<uint64_t>(row0 + i), blk, offset), k0, k1);
    }
  }
}

}  // namespace mbrec_fast
