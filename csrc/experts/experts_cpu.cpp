// CPU kernels of the experts op family's fused passes (schemas: experts_ops.cpp). Each pass walks [B, E, H] once,
// in blocks of kRowsPerBlock rows (at::parallel_for over blocks); every float sum has a fixed order whatever the
// thread count: per row over e (forward), t (grad of act) or h (grad of gates), and the bias gradient as one partial
// sum per block, the blocks then added in block order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "experts/experts_args.h"

namespace mbrec_fast {
namespace {

constexpr int64_t kRowsPerBlock = 32;

// Calls body(blk, r0, r1) for every block of kRowsPerBlock rows [r0, r1) of n rows, blocks spread over threads by
// at::parallel_for; what a block computes does not depend on which thread runs it.
template <typename F>
void for_row_blocks(int64_t n, const F& body) {
  const int64_t nblocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) body(blk, blk * kRowsPerBlock, std::min(n, (blk + 1) * kRowsPerBlock));
  });
}

template <typename scalar_t>
void mix_fwd_kernel(scalar_t* act, const scalar_t* gates, scalar_t* out, int64_t B, int64_t E, int64_t H, int64_t T,
                    bool relu) {
  for_row_blocks(B, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      scalar_t* a = act + b * E * H;
      if (relu) {
        for (int64_t i = 0; i < E * H; ++i) a[i] = a[i] > scalar_t(0) ? a[i] : scalar_t(0);
      }
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* g = gates + (t * B + b) * E;
        scalar_t* o = out + (t * B + b) * H;
        const scalar_t g0 = g[0];
        for (int64_t h = 0; h < H; ++h) o[h] = g0 * a[h];
        for (int64_t e = 1; e < E; ++e) {
          const scalar_t ge = g[e];
          const scalar_t* ae = a + e * H;
          for (int64_t h = 0; h < H; ++h) o[h] += ge * ae[h];
        }
      }
    }
  });
}

// <a, b> over n elements, in kLanes interleaved partial sums (a fixed order the compiler can vectorize; a single
// running sum would be neither vectorized nor as accurate), combined pairwise.
constexpr int64_t kLanes = 8;

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int64_t j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

template <typename scalar_t>
void mix_bwd_kernel(const scalar_t* go, const scalar_t* act, const scalar_t* gates, scalar_t* dpre, scalar_t* dgates,
                    scalar_t* dbias, int64_t B, int64_t E, int64_t H, int64_t T, bool relu) {
  const int64_t nblocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t EH = E * H;
  std::vector<scalar_t> partial(dbias != nullptr ? nblocks * EH : 0);
  for_row_blocks(B, [&](int64_t blk, int64_t r0, int64_t r1) {
    scalar_t* part = dbias != nullptr ? partial.data() + blk * EH : nullptr;
    if (part != nullptr) std::fill(part, part + EH, scalar_t(0));
    for (int64_t b = r0; b < r1; ++b) {
      const scalar_t* a = act + b * EH;
      scalar_t* d = dpre + b * EH;
      // grad of gates: dgates[t, b, e] = <go[t, b], act[b, e]>
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* gt = go + (t * B + b) * H;
        scalar_t* dg = dgates + (t * B + b) * E;
        for (int64_t e = 0; e < E; ++e) {
          const scalar_t* ae = a + e * H;
          dg[e] = dot(gt, ae, H);
        }
      }
      // grad of act: sum_t gates[t, b, e] * go[t, b]; then relu's backward and the bias partial sum
      for (int64_t e = 0; e < E; ++e) {
        scalar_t* de = d + e * H;
        const scalar_t g0 = gates[b * E + e];
        const scalar_t* go0 = go + b * H;
        for (int64_t h = 0; h < H; ++h) de[h] = g0 * go0[h];
        for (int64_t t = 1; t < T; ++t) {
          const scalar_t gte = gates[(t * B + b) * E + e];
          const scalar_t* gt = go + (t * B + b) * H;
          for (int64_t h = 0; h < H; ++h) de[h] += gte * gt[h];
        }
        if (relu) {
          const scalar_t* ae = a + e * H;
          for (int64_t h = 0; h < H; ++h) de[h] = ae[h] > scalar_t(0) ? de[h] : scalar_t(0);
        }
        if (part != nullptr) {
          scalar_t* pe = part + e * H;
          for (int64_t h = 0; h < H; ++h) pe[h] += de[h];
        }
      }
    }
  });
  if (dbias != nullptr) {
    at::parallel_for(0, EH, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dbias[i] = 0;
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const scalar_t* p = partial.data() + blk * EH;
        for (int64_t i = i0; i < i1; ++i) dbias[i] += p[i];
      }
    });
  }
}

at::Tensor gated_mix_fwd_cpu(at::Tensor& act, const at::Tensor& gates, bool relu) {
  experts::check_mix_args(act, gates, nullptr);
  const int64_t B = act.size(0), E = act.size(1), H = act.size(2), T = gates.size(0);
  at::Tensor out = at::empty({T, B, H}, act.options());
  if (out.numel() == 0 && !(relu && act.numel() > 0)) return out;
  if (E == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "gated_mix_fwd", [&] {
    mix_fwd_kernel<scalar_t>(act.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, E,
                             H, T, relu);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_mix_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& act,
                                                                 const at::Tensor& gates, bool relu, bool with_bias) {
  experts::check_mix_args(act, gates, &grad_out);
  const int64_t B = act.size(0), E = act.size(1), H = act.size(2), T = gates.size(0);
  at::Tensor dpre = at::empty_like(act);
  at::Tensor dgates = at::empty_like(gates);
  at::Tensor dbias = with_bias ? at::zeros({E, H}, act.options()) : at::empty({0}, act.options());
  if (act.numel() == 0 || T == 0) {  // no rows, no experts, no hidden units or no tasks: all sums are empty
    dpre.zero_();
    dgates.zero_();
    return {dpre, dgates, dbias};
  }
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "gated_mix_bwd", [&] {
    mix_bwd_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                             dpre.data_ptr<scalar_t>(), dgates.data_ptr<scalar_t>(),
                             with_bias ? dbias.data_ptr<scalar_t>() : nullptr, B, E, H, T, relu);
  });
  return {dpre, dgates, dbias};
}

// out[b] = sum_j w[b, j] * src[pos[b * k + j]] over j in order (w = 1 when absent); one row of out per step.
template <typename scalar_t>
void combine_kernel(const scalar_t* src, const int64_t* pos, const scalar_t* w, scalar_t* out, int64_t B, int64_t k,
                    int64_t C) {
  for_row_blocks(B, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      scalar_t* o = out + b * C;
      const scalar_t* s0 = src + pos[b * k] * C;
      if (w != nullptr) {
        const scalar_t w0 = w[b * k];
        for (int64_t c = 0; c < C; ++c) o[c] = w0 * s0[c];
      } else {
        for (int64_t c = 0; c < C; ++c) o[c] = s0[c];
      }
      for (int64_t j = 1; j < k; ++j) {
        const scalar_t* sj = src + pos[b * k + j] * C;
        if (w != nullptr) {
          const scalar_t wj = w[b * k + j];
          for (int64_t c = 0; c < C; ++c) o[c] += wj * sj[c];
        } else {
          for (int64_t c = 0; c < C; ++c) o[c] += sj[c];
        }
      }
    }
  });
}

// Per sorted row i (pair p = order[i], sample p / k): d[i] = w[p] * go[sample] (relu-masked by act[i] > 0), and
// dw[p] = <go[sample], act[i]>. Each row is independent: no cross-row sum.
template <typename scalar_t>
void routed_mix_bwd_kernel(const scalar_t* go, const scalar_t* act, const int64_t* order, const scalar_t* w,
                           scalar_t* d, scalar_t* dw, int64_t N, int64_t k, int64_t H, bool relu) {
  for_row_blocks(N, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t p = order[i];
      const scalar_t* g = go + (p / k) * H;
      const scalar_t* a = act + i * H;
      scalar_t* di = d + i * H;
      if (w != nullptr) {
        dw[p] = dot(g, a, H);
        const scalar_t wp = w[p];
        for (int64_t h = 0; h < H; ++h) di[h] = wp * g[h];
      } else {
        for (int64_t h = 0; h < H; ++h) di[h] = g[h];
      }
      if (relu) {
        for (int64_t h = 0; h < H; ++h) di[h] = a[h] > scalar_t(0) ? di[h] : scalar_t(0);
      }
    }
  });
}

at::Tensor routed_combine_cpu(const at::Tensor& src, const at::Tensor& order,
                              const c10::optional<at::Tensor>& route_weight, int64_t batch) {
  const std::vector<int64_t> pos = experts::check_route_args(src, order, route_weight, batch);
  const int64_t C = src.size(1);
  at::Tensor out = at::empty({batch, C}, src.options());
  if (batch == 0 || C == 0) return out;
  const int64_t k = src.size(0) / batch;
  if (k == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "routed_combine", [&] {
    combine_kernel<scalar_t>(src.data_ptr<scalar_t>(), pos.data(),
                             route_weight.has_value() ? route_weight->data_ptr<scalar_t>() : nullptr,
                             out.data_ptr<scalar_t>(), batch, k, C);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> routed_mix_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& act,
                                                      const at::Tensor& order,
                                                      const c10::optional<at::Tensor>& route_weight, bool relu) {
  TORCH_CHECK(grad_out.dim() == 2, "grad_out must be 2-D [B, H], got ", grad_out.dim(), "-D");
  const int64_t B = grad_out.size(0), N = act.dim() == 2 ? act.size(0) : 0, H = act.dim() == 2 ? act.size(1) : 0;
  experts::check_route_args(act, order, route_weight, B);
  check_tensor(grad_out, "grad_out", act.scalar_type(), 2, act.device());
  TORCH_CHECK(grad_out.size(1) == H, "grad_out must be [", B, ", ", H, "], got ", grad_out.sizes());
  at::Tensor d = at::empty_like(act);
  at::Tensor dw = route_weight.has_value() ? at::empty_like(*route_weight) : at::empty({0}, act.options());
  if (N == 0) return {d, dw};
  const int64_t k = N / B;
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "routed_mix_bwd", [&] {
    routed_mix_bwd_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(),
                                    order.data_ptr<int64_t>(),
                                    route_weight.has_value() ? route_weight->data_ptr<scalar_t>() : nullptr,
                                    d.data_ptr<scalar_t>(),
                                    route_weight.has_value() ? dw.data_ptr<scalar_t>() : nullptr, N, k, H, relu);
  });
  return {d, dw};
}

}  // namespace
}  // namespace mbrec_fast

TORCH_LIBRARY_IMPL(mbrec_fast, CPU, m) {
  m.impl("gated_mix_fwd", &mbrec_fast::gated_mix_fwd_cpu);
  m.impl("gated_mix_bwd", &mbrec_fast::gated_mix_bwd_cpu);
  m.impl("routed_combine", &mbrec_fast::routed_combine_cpu);
  m.impl("routed_mix_bwd", &mbrec_fast::routed_mix_bwd_cpu);
}
