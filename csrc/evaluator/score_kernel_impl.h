// Body of the scoring micro-kernel (see score_kernel.h), included once by each variant's file after it
// defined, inside an anonymous namespace and under its target pragma, a traits struct `Isa`:
//   kName, W (lanes), MR (items per tile), NV (vectors per tile row; nr = W * NV users), V (vector), M (mask),
//   zero(), load(p) (aligned), loadu(p), bcast(x), fma(a, b, acc) = a * b + acc, gt(a, b) / ge(a, b) -> M,
//   mor(M, M), bits(M) -> lane bits, store(p, v) (unaligned).
// Everything here has internal linkage, so the variants' copies never merge at link time. No standard
// library template is instantiated here (it would be compiled for this file's instruction set and could be
// shared with callers on CPUs that lack it).

#define MBREC_UNROLL _Pragma("GCC unroll 32")

template <class I>
void score_block_impl(const ScoreBlockArgs& a) {
  constexpr int W = I::W, MR = I::MR, NV = I::NV, NR = W * NV;
  using V = typename I::V;
  using M = typename I::M;
  const int64_t d = a.d;
  alignas(64) float tile[NR];
  // Item tile outer (mr rows of d floats, in L1 while every user panel of the block passes over it); the
  // user panels (d x nr floats) come from L2.
  for (int64_t i = 0; i < a.n_items; i += MR) {
    const float* rows = a.items + i * d;
    const int64_t n_rows = a.n_items - i < MR ? a.n_items - i : MR;
    if (n_rows < MR) {  // last tile: copy the rows left and zero the rest (never read past the table)
      for (int64_t x = 0; x < MR * d; ++x) a.tail[x] = x < n_rows * d ? rows[x] : 0.0f;
      rows = a.tail;
    }
    for (int64_t q = 0; q < a.n_user_panels; ++q) {
      const float* U = a.users + q * d * NR;
      const float* R = rows;
      V acc[MR][NV];
      MBREC_UNROLL for (int r = 0; r < MR; ++r) {
        MBREC_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = I::zero();
      }
      for (int64_t kk = 0; kk < d; ++kk, U += NR, ++R) {
        V u[NV];
        MBREC_UNROLL for (int v = 0; v < NV; ++v) u[v] = I::load(U + v * W);
        MBREC_UNROLL for (int r = 0; r < MR; ++r) {
          const V x = I::bcast(R[r * d]);
          MBREC_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = I::fma(x, u[v], acc[r][v]);
        }
      }
      // One compare of the whole tile against the users' thresholds before anything leaves the registers.
      const float* th = a.threshold + q * NR;
      V t[NV];
      MBREC_UNROLL for (int v = 0; v < NV; ++v) t[v] = I::loadu(th + v * W);
      M hit[MR];
      MBREC_UNROLL for (int r = 0; r < MR; ++r) {
        hit[r] = I::gt(acc[r][0], t[0]);
        MBREC_UNROLL for (int v = 1; v < NV; ++v) hit[r] = I::mor(hit[r], I::gt(acc[r][v], t[v]));
      }
      M any = hit[0];
      MBREC_UNROLL for (int r = 1; r < MR; ++r) any = I::mor(any, hit[r]);
      if (I::bits(any) == 0) continue;
      MBREC_UNROLL for (int r = 0; r < MR; ++r) {
        if (r >= n_rows || I::bits(hit[r]) == 0) continue;
        // an earlier callback of this tile may have raised thresholds: compare again
        uint32_t lanes = 0;
        MBREC_UNROLL for (int v = 0; v < NV; ++v) {
          I::store(tile + v * W, acc[r][v]);
          lanes |= I::bits(I::gt(acc[r][v], I::loadu(th + v * W))) << (v * W);
        }
        if (lanes != 0) a.on_hit(a.ctx, a.item0 + i + r, q, tile, lanes);
      }
    }
  }
}

template <class I>
int64_t next_hit_chunk_impl(const float* row, int64_t j, int64_t n, float threshold, bool admit_ties) {
  constexpr int W = I::W;
  static_assert(16 % W == 0, "a chunk is 16 scores");
  using V = typename I::V;
  using M = typename I::M;
  const V t = I::bcast(threshold);
  for (; j + 16 <= n; j += 16) {
    const float* chunk = row + j;
    M m;
    if (admit_ties) {
      m = I::ge(I::loadu(chunk), t);
      MBREC_UNROLL for (int v = 1; v < 16 / W; ++v) m = I::mor(m, I::ge(I::loadu(chunk + v * W), t));
    } else {
      m = I::gt(I::loadu(chunk), t);
      MBREC_UNROLL for (int v = 1; v < 16 / W; ++v) m = I::mor(m, I::gt(I::loadu(chunk + v * W), t));
    }
    if (I::bits(m) != 0) return j;
  }
  return j;
}

#undef MBREC_UNROLL

void score_block(const ScoreBlockArgs& a) { score_block_impl<Isa>(a); }
int64_t next_hit_chunk(const float* row, int64_t j, int64_t n, float threshold, bool admit_ties) {
  return next_hit_chunk_impl<Isa>(row, j, n, threshold, admit_ties);
}
// This variant's entry in the kernel table (the file's score_kernel_<name>() returns it).
constexpr ScoreKernel kScoreKernel{Isa::kName, Isa::MR, Isa::W * Isa::NV, &score_block, &next_hit_chunk};
