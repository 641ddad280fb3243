// Body of the experts' GEMM micro-kernel (see gemm_tile.h), included once by each variant's file
// (csrc/cpu_kernels_<isa>.cpp) after it defined, inside an anonymous namespace and under its target pragma, a traits
// struct `Isa`: kName, W (lanes), MR (rows per tile), NV (vectors per tile row; nr = W * NV), V, zero(), loadu(p),
// bcast(x), fma(a, b, acc) = a * b + acc, add(a, b), store(p, v) (unaligned). Internal linkage only and no standard
// library templates (see evaluator/score_kernel_impl.h).

#define MBREC_UNROLL _Pragma("GCC unroll 32")

template <class I, bool kRowsA>
void gemm_tile_impl(const GemmTileArgs& g) {
  constexpr int W = I::W, MR = I::MR, NV = I::NV, NR = W * NV;
  using V = typename I::V;
  alignas(64) float tile[NR];  // a partial last panel: C rows go through a row buffer, only valid columns touched
  V acc[MR][NV];
  MBREC_UNROLL for (int r = 0; r < MR; ++r) {
    MBREC_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = I::zero();
  }
  if (g.load_c) {
    MBREC_UNROLL for (int r = 0; r < MR; ++r) {
      if (r >= g.m_valid) break;
      const float* row = g.c + r * g.ldc;
      if (g.n_valid == NR) {
        MBREC_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = I::loadu(row + v * W);
      } else {
        for (int n = 0; n < NR; ++n) tile[n] = n < g.n_valid ? row[n] : 0.0f;
        MBREC_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = I::loadu(tile + v * W);
      }
    }
  }
  const float* A = g.a;
  const float* B = g.b;
  const int64_t a_step = kRowsA ? 1 : g.lda, a_row = kRowsA ? g.lda : 1;
  for (int64_t kk = 0; kk < g.k; ++kk, A += a_step, B += g.ldb) {
    V b[NV];
    MBREC_UNROLL for (int v = 0; v < NV; ++v) b[v] = I::loadu(B + v * W);
    MBREC_UNROLL for (int r = 0; r < MR; ++r) {
      const V x = I::bcast(A[r * a_row]);
      MBREC_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = I::fma(x, b[v], acc[r][v]);
    }
  }
  if (g.n_valid == NR) {
    V bias[NV];
    MBREC_UNROLL for (int v = 0; v < NV; ++v) bias[v] = g.bias != nullptr ? I::loadu(g.bias + v * W) : I::zero();
    MBREC_UNROLL for (int r = 0; r < MR; ++r) {
      if (r >= g.m_valid) break;
      float* row = g.c + r * g.ldc;
      MBREC_UNROLL for (int v = 0; v < NV; ++v) {
        I::store(row + v * W, g.bias != nullptr ? I::add(acc[r][v], bias[v]) : acc[r][v]);
      }
    }
    return;
  }
  MBREC_UNROLL for (int r = 0; r < MR; ++r) {
    if (r >= g.m_valid) break;
    MBREC_UNROLL for (int v = 0; v < NV; ++v) I::store(tile + v * W, acc[r][v]);
    float* row = g.c + r * g.ldc;
    for (int n = 0; n < g.n_valid; ++n) row[n] = g.bias != nullptr ? tile[n] + g.bias[n] : tile[n];
  }
}

#undef MBREC_UNROLL

void gemm_tile(const GemmTileArgs& g) { gemm_tile_impl<Isa, false>(g); }
void gemm_tile_rows(const GemmTileArgs& g) { gemm_tile_impl<Isa, true>(g); }
constexpr GemmTileKernel kGemmTileKernel{Isa::kName, Isa::MR, Isa::W * Isa::NV, &gemm_tile, &gemm_tile_rows};
