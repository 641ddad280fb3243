// The AVX-512 variants of the CPU micro-kernels: the evaluator's scoring kernel (evaluator/score_kernel.h) and the
// experts' GEMM tile (experts/gemm_tile.h), both on 12 x 32 tiles in 24 zmm accumulators, and the graph
// product's row kernel (graph/spmm_rows.h), from one traits struct.
// Compiled for the instruction set by the target pragma below (not by build flags); run only where cpu_isa.h says so.
#include "evaluator/score_kernel.h"
#include "experts/gemm_tile.h"
#include "graph/spmm_rows.h"

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
  using M = __mmask16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static V bcast(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M mor(M a, M b) { return static_cast<M>(a | b); }
  static uint32_t bits(M m) { return static_cast<uint32_t>(m); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
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
const ScoreKernel* score_kernel_avx512() { return &kScoreKernel; }
const GemmTileKernel* gemm_tile_avx512() { return &kGemmTileKernel; }
const SpmmRowsKernel* spmm_rows_avx512() { return &kSpmmRowsKernel; }
}  // namespace mbrec_fast

#else
namespace mbrec_fast {
const ScoreKernel* score_kernel_avx512() { return nullptr; }
const GemmTileKernel* gemm_tile_avx512() { return nullptr; }
const SpmmRowsKernel* spmm_rows_avx512() { return nullptr; }
}  // namespace mbrec_fast
#endif
