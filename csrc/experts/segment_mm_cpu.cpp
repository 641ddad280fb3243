// CPU kernels of the segment GEMMs (schemas: experts_ops.cpp): one GEMM per segment of rows, the routed experts'
// per-expert products. fp32 runs on the register-blocked micro-kernel of gemm_tile.h (AVX-512 or AVX2 + FMA,
// chosen at run time from the CPU's features); fp64 and CPUs without AVX2 run one at::mm per segment. Work is split
// into (segment, block of output rows, block of output columns) tasks over threads; each output element is one FMA
// chain over k in order, so results are bit-identical on any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "experts/experts_args.h"
#include "experts/gemm_tile.h"

namespace mbrec_fast {
namespace {

// Blocking: a task computes up to kTileRowsPerTask micro-tile rows x kTilePanelsPerTask column panels of one segment's
// output, k in blocks of kBlockK. A and B are read in place where their layout allows (see gemm_block); what is
// packed is packed once per task and k block ([k][mr] for an A tile, [panel][k][nr] for B panels).
constexpr int64_t kTileRowsPerTask = 16, kTilePanelsPerTask = 8, kBlockK = 256;

const GemmTileKernel* gemm_kernel() {
  switch (cpu_isa_selected()) {
    case CpuIsa::kAvx512: return gemm_tile_avx512();
    case CpuIsa::kAvx2: return gemm_tile_avx2();
    default: return nullptr;
  }
}

// A strided matrix view: element (i, j) at p[i * si + j * sj].
struct View {
  const float* p;
  int64_t si, sj;
  float at(int64_t i, int64_t j) const { return p[i * si + j * sj]; }
};

struct Task {
  int64_t segment, m0, m1, n0, n1;
};

// One segment's product C = A B (+ bias) over rows [m0, m1) and columns [n0, n1) of C: A (m, kk), B (kk, n), C's row
// m at c + m * ldc. apack / bpack: the calling thread's scratch.
void gemm_block(const GemmTileKernel& kern, View A, View B, int64_t K, const Task& t, float* c, int64_t ldc,
                const float* bias, std::vector<float>& apack, std::vector<float>& bpack) {
  const int MR = kern.mr, NR = kern.nr;
  const int64_t panels = (t.n1 - t.n0 + NR - 1) / NR;
  const int64_t kc_max = std::max<int64_t>(std::min(K, kBlockK), 1);
  apack.resize(kc_max * MR);
  bpack.resize(panels * kc_max * NR);
  float* ap = apack.data();
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kBlockK) {  // K == 0: one pass that writes bias (or zeros)
    const int64_t kc = std::min(kBlockK, K - k0);
    // B's panels: read in place when its rows are contiguous in n and the panel is full, else packed [kk][NR]
    // (a transposed B, the partial last panel) with zeros past n1
    for (int64_t q = 0; q < panels; ++q) {
      const int64_t n = t.n0 + q * NR, nv = std::min<int64_t>(NR, t.n1 - n);
      if (B.sj == 1 && nv == NR) continue;
      float* dst = bpack.data() + q * kc * NR;
      for (int64_t kk = 0; kk < kc; ++kk, dst += NR) {
        for (int64_t j = 0; j < NR; ++j) dst[j] = j < nv ? B.at(k0 + kk, n + j) : 0.0f;
      }
    }
    const bool last = k0 + kBlockK >= K;
    for (int64_t m = t.m0; m < t.m1; m += MR) {
      const int mv = static_cast<int>(std::min<int64_t>(MR, t.m1 - m));
      const float* a_tile = ap;
      int64_t lda = MR;
      auto tile = kern.tile;
      if (A.si == 1 && mv == MR) {  // A = X^T of a row-major X: already k-major, read in place
        a_tile = A.p + m + k0 * A.sj;
        lda = A.sj;
      } else if (A.sj == 1 && mv == MR) {  // rows of A contiguous in k: read in place
        a_tile = A.p + m * A.si + k0;
        lda = A.si;
        tile = kern.tile_rows;
      } else {  // the partial last tile: packed [kk][MR], zeros past its rows
        if (mv < MR) std::fill(ap, ap + kc * MR, 0.0f);
        for (int r = 0; r < mv; ++r) {
          for (int64_t kk = 0; kk < kc; ++kk) ap[kk * MR + r] = A.at(m + r, k0 + kk);
        }
      }
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t n = t.n0 + q * NR, nv = std::min<int64_t>(NR, t.n1 - n);
        const bool in_place = B.sj == 1 && nv == NR;
        GemmTileArgs g{a_tile, lda, in_place ? B.p + k0 * B.si + n : bpack.data() + q * kc * NR, in_place ? B.si : NR,
                       kc, c + m * ldc + n, ldc, mv, static_cast<int>(nv), k0 > 0,
                       last && bias != nullptr ? bias + n : nullptr};
        tile(g);
      }
    }
  }
}

// Tasks covering rows [0, rows(e)) x columns [0, N) of every segment e's output.
template <typename RowsOf>
std::vector<Task> make_tasks(const GemmTileKernel& kern, int64_t E, int64_t N, const RowsOf& rows_of) {
  std::vector<Task> tasks;
  const int64_t mb = kTileRowsPerTask * kern.mr, nb = kTilePanelsPerTask * kern.nr;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t m = 0; m < rows_of(e); m += mb) {
      for (int64_t n = 0; n < N; n += nb) tasks.push_back({e, m, std::min(rows_of(e), m + mb), n, std::min(N, n + nb)});
    }
  }
  return tasks;
}

template <typename F>
void run_tasks(const std::vector<Task>& tasks, const F& body) {
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> apack, bpack;
    for (int64_t t = t0; t < t1; ++t) body(tasks[t], apack, bpack);
  });
}

at::Tensor segment_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                          const c10::optional<at::Tensor>& bias, bool transpose_b) {
  const auto [E, K, M] = experts::check_segment_mm_args(a, b, offsets, bias, transpose_b);
  const int64_t N = a.size(0);
  at::Tensor out = at::empty({N, M}, a.options());
  const int64_t* o = offsets.data_ptr<int64_t>();
  const GemmTileKernel* kern = a.scalar_type() == at::kFloat ? gemm_kernel() : nullptr;
  if (kern == nullptr) {  // fp64, or a CPU without AVX2: one at::mm per segment
    for (int64_t e = 0; e < E; ++e) {
      if (o[e + 1] == o[e]) continue;
      const at::Tensor be = transpose_b ? b[e].t() : b[e];
      at::Tensor oe = out.narrow(0, o[e], o[e + 1] - o[e]);
      if (bias.has_value()) {
        at::addmm_out(oe, (*bias)[e], a.narrow(0, o[e], o[e + 1] - o[e]), be);
      } else {
        at::mm_out(oe, a.narrow(0, o[e], o[e + 1] - o[e]), be);
      }
    }
    return out;
  }
  // b[e]^T is copied once ([E, K, M]) so that every task reads B's rows in place (cheaper than a strided pack per task)
  const at::Tensor bk = transpose_b ? b.transpose(1, 2).contiguous() : b;
  const float* ap = a.data_ptr<float>();
  const float* bp = bk.data_ptr<float>();
  const float* biasp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  const auto tasks = make_tasks(*kern, E, M, [&](int64_t e) { return o[e + 1] - o[e]; });
  run_tasks(tasks, [&](const Task& t, std::vector<float>& apack, std::vector<float>& bpack) {
    const int64_t e = t.segment, s0 = o[e];
    gemm_block(*kern, View{ap + s0 * K, K, 1}, View{bp + e * K * M, M, 1}, K, t, outp + s0 * M, M,
               biasp != nullptr ? biasp + e * M : nullptr, apack, bpack);
  });
  return out;
}

at::Tensor segment_mm_tn_cpu(const at::Tensor& a, const at::Tensor& c, const at::Tensor& offsets) {
  const int64_t E = experts::check_segment_mm_tn_args(a, c, offsets);
  const int64_t P = a.size(1), M = c.size(1);
  at::Tensor out = at::empty({E, P, M}, a.options());
  const int64_t* o = offsets.data_ptr<int64_t>();
  const GemmTileKernel* kern = a.scalar_type() == at::kFloat ? gemm_kernel() : nullptr;
  if (kern == nullptr) {
    for (int64_t e = 0; e < E; ++e) {
      at::Tensor oe = out[e];
      if (o[e + 1] == o[e]) {
        oe.zero_();
      } else {
        at::mm_out(oe, a.narrow(0, o[e], o[e + 1] - o[e]).t(), c.narrow(0, o[e], o[e + 1] - o[e]));
      }
    }
    return out;
  }
  const float* ap = a.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const auto tasks = make_tasks(*kern, E, M, [&](int64_t) { return P; });
  run_tasks(tasks, [&](const Task& t, std::vector<float>& apack, std::vector<float>& bpack) {
    const int64_t s0 = o[t.segment], rows = o[t.segment + 1] - s0;
    // out[e] = a[s:t]^T c[s:t]: A(m, kk) = a[s + kk, m], B = the segment's rows of c; no rows gives zeros
    gemm_block(*kern, View{ap + s0 * P, 1, P}, View{cp + s0 * M, M, 1}, rows, t, outp + t.segment * P * M, M, nullptr,
               apack, bpack);
  });
  return out;
}

}  // namespace
}  // namespace mbrec_fast

TORCH_LIBRARY_IMPL(mbrec_fast, CPU, m) {
  m.impl("segment_mm", &mbrec_fast::segment_mm_cpu);
  m.impl("segment_mm_tn", &mbrec_fast::segment_mm_tn_cpu);
}
