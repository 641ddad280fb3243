// AVX-512 variant of the experts' GEMM micro-kernel: 12 rows x 32 columns per tile (24 zmm accumulators).
// Compiled for its instruction set by the target pragma below (not by build flags); only run where cpu_isa.h says so.
#include "experts/gemm_tile.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif

namespace mbrec_fast {
namespace {

struct Isa {
  static constexpr const char* kName = "avx512";
  static constexpr int W = 16, MR = 12, NV = 2;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static V bcast(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
};

#include "experts/gemm_tile_impl.h"

}  // namespace
}  // namespace mbrec_fast

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mbrec_fast {
const GemmTileKernel* gemm_tile_avx512() { return &kGemmTileKernel; }
}  // namespace mbrec_fast

#else
namespace mbrec_fast {
const GemmTileKernel* gemm_tile_avx512() { return nullptr; }
}  // namespace mbrec_fast
#endif
