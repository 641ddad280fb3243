// The experts' CPU GEMM micro-kernel: interface shared by its variants (csrc/cpu_kernels_<isa>.cpp, body in
// gemm_tile_impl.h) and segment_mm_cpu.cpp.
//
// One call computes an mr x nr tile of C = A B (+ bias) in vector accumulators: A comes k-major (mr values per step,
// packed or in place; rows past the tile's zero), B as rows of nr floats (element (kk, n) at b[kk * ldb + n]), and
// each output element is one FMA chain over kk in order (a later block of k continues the chain from C), so a value
// depends neither on the tiling nor on the thread count nor on the variant (AVX2 and AVX-512 both fuse every step,
// so they agree bit for bit). The routed experts' per-expert GEMMs run on it (see docs/experts.md).
#pragma once
#include <cstdint>

namespace mbrec_fast {

struct GemmTileArgs {
  const float* a;     // A: tile row r's value of step kk at a[kk * lda + r] (tile), a[r * lda + kk] (tile_rows)
  int64_t lda;
  const float* b;     // B rows of nr readable floats, row stride ldb
  int64_t ldb;
  int64_t k;          // k == 0: the tile is bias (or zero)
  float* c;           // C tile origin, row stride ldc
  int64_t ldc;
  int m_valid;        // rows [0, m_valid) and columns [0, n_valid) of the tile are stored
  int n_valid;
  bool load_c;        // start each sum from the tile's current C (a later block of k): one FMA chain across blocks
  const float* bias;  // nullptr, or n_valid floats added to every row after the sum
};

struct GemmTileKernel {
  const char* name;
  int mr, nr;
  void (*tile)(const GemmTileArgs& args);       // A k-major (packed, or X^T of a row-major X in place)
  void (*tile_rows)(const GemmTileArgs& args);  // A row-major in place (rows of A contiguous in k)
};

// Variants; nullptr where the compiler cannot build them (non-x86). Select with cpu_isa.h.
const GemmTileKernel* gemm_tile_avx2();
const GemmTileKernel* gemm_tile_avx512();

}  // namespace mbrec_fast
