// Body of the sparse x dense row kernel (interface: spmm_rows.h), included by each csrc/cpu_kernels_<isa>.cpp
// inside its target pragma after defining `Isa` (W floats per vector: bcast, loadu, fma, store, zero).
// Columns go in chunks of 4 vectors (each nonzero: one broadcast, four loads and FMAs from one row of x), the
// rest of the full vectors in one more pass, then scalars with a fused multiply-add (the same rounding as one
// vector lane). The scalar tail is written here rather than calling spmm_core.h, so that nothing of this file is
// shared with (and possibly picked by the linker for) code compiled without the instruction set.

template <int NV>
inline bool spmm_chunk(const SpmmRowsArgs& a, int64_t r, int64_t c) {
  bool ok = true;
  typename Isa::V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = Isa::zero();
  const float* x = a.x + c;
  for (int64_t k = a.crow[r], e = a.crow[r + 1]; k < e; ++k) {
    const int64_t j = a.col[k];
    if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(a.n_x)) {
      ok = false;
      continue;
    }
    const typename Isa::V w = Isa::bcast(a.val[k]);
    const float* xr = x + j * a.d;
    for (int v = 0; v < NV; ++v) acc[v] = Isa::fma(w, Isa::loadu(xr + v * Isa::W), acc[v]);
  }
  float* y = a.y + r * a.d + c;
  for (int v = 0; v < NV; ++v) Isa::store(y + v * Isa::W, acc[v]);
  return ok;
}

inline bool spmm_rows_body(const SpmmRowsArgs& a) {
  constexpr int64_t W = Isa::W;
  bool ok = true;
  for (int64_t r = a.r0; r < a.r1; ++r) {
    int64_t c = 0;
    for (; c + 4 * W <= a.d; c += 4 * W) ok &= spmm_chunk<4>(a, r, c);
    switch ((a.d - c) / W) {
      case 3: ok &= spmm_chunk<3>(a, r, c); break;
      case 2: ok &= spmm_chunk<2>(a, r, c); break;
      case 1: ok &= spmm_chunk<1>(a, r, c); break;
      default: break;
    }
    c += (a.d - c) / W * W;
    for (; c < a.d; ++c) {
      float acc = 0.0f;
      for (int64_t k = a.crow[r], e = a.crow[r + 1]; k < e; ++k) {
        const int64_t j = a.col[k];
        if (static_cast<uint64_t>(j) >= static_cast<uint64_t>(a.n_x)) {
          ok = false;
          continue;
        }
        acc = __builtin_fmaf(a.val[k], a.x[j * a.d + c], acc);
      }
      a.y[r * a.d + c] = acc;
    }
  }
  return ok;
}

const SpmmRowsKernel kSpmmRowsKernel = {Isa::kName, &spmm_rows_body};
