// The AVX2 + FMA variants of the CPU micro-kernels: the evaluator's scoring kernel (evaluator/score_kernel.h) and the
// experts' GEMM tile (experts/gemm_tile.h), both on 6 x 16 tiles in 12 ymm accumulators, and the graph
// product's row kernel (graph/spmm_rows.h), from one traits struct.
// Compiled for the instruction set by the target pragma below (not by build flags); run only where cpu_isa.h says so.
#include "evaluator/score_kernel.h"
#include "experts/gemm_tile.h"
#include "graph/spmm_rows.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace mbrec_fast {
namespace {

struct Isa {
  static constexpr const char* kName = "avx2";
  static constexpr int W = 8, MR = 6, NV = 2;
  using V = __m256;
  using M = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static V bcast(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M mor(M a, M b) { return _mm256_or_ps(a, b); }
  static uint32_t bits(M m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

#include "evaluator/score_kernel_impl.h"
#include "experts/gemm_tile_impl.h"
#include "graph/spmm_rows_impl.h"

}  // namespace
}  // namespace mbrec_fast

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mbrec_fast {
const ScoreKernel* score_kernel_avx2() { return &kScoreKernel; }
const GemmTileKernel* gemm_tile_avx2() { return &kGemmTileKernel; }
const SpmmRowsKernel* spmm_rows_avx2() { return &kSpmmRowsKernel; }
}  // namespace mbrec_fast

#else
namespace mbrec_fast {
const ScoreKernel* score_kernel_avx2() { return nullptr; }
const GemmTileKernel* gemm_tile_avx2() { return nullptr; }
const SpmmRowsKernel* spmm_rows_avx2() { return nullptr; }
}  // namespace mbrec_fast
#endif
