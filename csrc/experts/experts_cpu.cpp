// CPU kernels of the experts op family's fused passes (schemas: experts_ops.cpp). Each pass walks [B, E, H] once,
// in blocks of kRowsPerBlock rows (at::parallel_for over blocks); every float sum has a fixed order whatever the
// thread count: per row over e (forward), t (grad of act) or h (grad of gates), and the bias gradient as one partial
// sum per block, the blocks then added in block order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
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

// Per-block partial sums of N gradients of E * H values (bias, LayerNorm weight / bias), each block's partials
// added into the targets in block order once every block ran: a fixed summation order whatever the thread count.
// A null target has no buffer.
template <typename scalar_t, size_t N>
class BlockSums {
 public:
  BlockSums(std::array<scalar_t*, N> targets, int64_t rows, int64_t EH)
      : targets_(targets), EH_(EH), nblocks_((rows + kRowsPerBlock - 1) / kRowsPerBlock) {
    for (scalar_t* t : targets_) nsums_ += t != nullptr;
    partial_.resize(nblocks_ * nsums_ * EH_);
  }
  // Block blk's zeroed partial buffer per target (null for a null target).
  std::array<scalar_t*, N> block(int64_t blk) {
    scalar_t* part = partial_.data() + blk * nsums_ * EH_;
    std::fill(part, part + nsums_ * EH_, scalar_t(0));
    std::array<scalar_t*, N> out{};
    int64_t slot = 0;
    for (size_t s = 0; s < N; ++s) out[s] = targets_[s] != nullptr ? part + (slot++) * EH_ : nullptr;
    return out;
  }
  // targets[s][i] = sum over blocks, in block order, of block partial s.
  void reduce() const {
    int64_t slot = 0;
    for (scalar_t* target : targets_) {
      if (target == nullptr) continue;
      const int64_t off = (slot++) * EH_;
      at::parallel_for(0, EH_, 256, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) target[i] = 0;
        for (int64_t blk = 0; blk < nblocks_; ++blk) {
          const scalar_t* q = partial_.data() + blk * nsums_ * EH_ + off;
          for (int64_t i = i0; i < i1; ++i) target[i] += q[i];
        }
      });
    }
  }

 private:
  std::array<scalar_t*, N> targets_;
  int64_t EH_, nblocks_, nsums_ = 0;
  std::vector<scalar_t> partial_;
};

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

// sum of a over n elements, in the same lane order as dot.
template <typename scalar_t>
inline scalar_t dot_ones(const scalar_t* a, int64_t n) {
  scalar_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[i + j];
  }
  for (int64_t j = 0; i < n; ++i, ++j) acc[j] += a[i];
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

template <typename scalar_t>
void mix_bwd_kernel(const scalar_t* go, const scalar_t* act, const scalar_t* gates, scalar_t* dpre, scalar_t* dgates,
                    scalar_t* dbias, int64_t B, int64_t E, int64_t H, int64_t T, bool relu) {
  const int64_t EH = E * H;
  BlockSums<scalar_t, 1> sums({dbias}, B, EH);
  for_row_blocks(B, [&](int64_t blk, int64_t r0, int64_t r1) {
    scalar_t* part = sums.block(blk)[0];
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
  sums.reduce();
}

// ---- LayerNorm experts: LayerNorm (per expert affine) + activation + gate mixture in one pass each way.
// The pre-activation row of (b, e) is H contiguous values at pre + b * stride_b + e * stride_e ([B, E, H] for a
// shared input, [E, B, H] for per-expert inputs). The forward leaves pre untouched (it is the saved tensor); the
// backward recomputes the row's statistics from it while the row sits in L1, so nothing but pre is saved.
enum class Act { kNone, kRelu, kGelu, kSilu };

inline Act parse_activation(c10::string_view name) {
  if (name == "none") return Act::kNone;
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "silu") return Act::kSilu;
  TORCH_CHECK(false, "activation must be one of 'none', 'relu', 'gelu', 'silu', got '", std::string(name), "'");
}

template <typename scalar_t>
inline scalar_t activate_one(scalar_t y, Act act) {
  switch (act) {
    case Act::kRelu: return y > scalar_t(0) ? y : scalar_t(0);
    case Act::kGelu: return y * scalar_t(0.5) * (scalar_t(1) + std::erf(y * scalar_t(0.7071067811865476)));
    case Act::kSilu: return y / (scalar_t(1) + std::exp(-y));
    default: return y;
  }
}

// d act / d y at y (the same formulas as mbrec_fast._experts_torch._act_grad).
template <typename scalar_t>
inline scalar_t activation_grad(scalar_t y, Act act) {
  switch (act) {
    case Act::kRelu: return y > scalar_t(0) ? scalar_t(1) : scalar_t(0);
    case Act::kGelu: {
      const scalar_t cdf = scalar_t(0.5) * (scalar_t(1) + std::erf(y * scalar_t(0.7071067811865476)));
      const scalar_t pdf = std::exp(scalar_t(-0.5) * y * y) * scalar_t(0.3989422804014327);
      return cdf + y * pdf;
    }
    case Act::kSilu: {
      const scalar_t s = scalar_t(1) / (scalar_t(1) + std::exp(-y));
      return s * (scalar_t(1) + y * (scalar_t(1) - s));
    }
    default: return scalar_t(1);
  }
}

// Mean and 1/sqrt(var + eps) of one row (biased variance, two passes over the row: the row is in L1).
template <typename scalar_t>
inline void row_stats(const scalar_t* x, int64_t H, double eps, scalar_t* mean, scalar_t* rstd) {
  scalar_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= H; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  }
  for (int64_t j = 0; i < H; ++i, ++j) acc[j] += x[i];
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  const scalar_t m = acc[0] / scalar_t(H);
  scalar_t sq[kLanes] = {};
  i = 0;
  for (; i + kLanes <= H; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const scalar_t c = x[i + j] - m;
      sq[j] += c * c;
    }
  }
  for (int64_t j = 0; i < H; ++i, ++j) {
    const scalar_t c = x[i] - m;
    sq[j] += c * c;
  }
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) sq[j] += sq[j + w];
  }
  *mean = m;
  *rstd = scalar_t(1) / std::sqrt(sq[0] / scalar_t(H) + scalar_t(eps));
}

struct LnLayout {
  int64_t B, E, H, T, stride_b, stride_e;
};

// y = (pre - mean) * rstd * w[e] + b[e] (w, b may be null), a = act(y); xhat and a written to the row buffers.
template <typename scalar_t>
inline void ln_activate_row(const scalar_t* p, int64_t H, double eps, const scalar_t* lnw, const scalar_t* lnb,
                            Act act, scalar_t* xhat, scalar_t* y, scalar_t* a, scalar_t* rstd_out) {
  scalar_t mean, rstd;
  row_stats(p, H, eps, &mean, &rstd);
  for (int64_t h = 0; h < H; ++h) xhat[h] = (p[h] - mean) * rstd;
  for (int64_t h = 0; h < H; ++h) {
    scalar_t v = xhat[h];
    if (lnw != nullptr) v *= lnw[h];
    if (lnb != nullptr) v += lnb[h];
    y[h] = v;
  }
  if (act == Act::kNone) {
    for (int64_t h = 0; h < H; ++h) a[h] = y[h];
  } else if (act == Act::kRelu) {
    for (int64_t h = 0; h < H; ++h) a[h] = y[h] > scalar_t(0) ? y[h] : scalar_t(0);
  } else {
    for (int64_t h = 0; h < H; ++h) a[h] = activate_one(y[h], act);
  }
  *rstd_out = rstd;
}

// From d = the grad of the activation output (overwritten): the activation's backward, the affine partial sums
// (pw += dy * xhat, pb += dy; either may be null), then the LayerNorm backward into dp:
// dp = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with dxhat = dy * w (w may be null).
template <typename scalar_t>
inline void ln_backward_row(scalar_t* d, const scalar_t* xhat, const scalar_t* y, const scalar_t* w, scalar_t rstd,
                            Act act, int64_t H, scalar_t* pw, scalar_t* pb, scalar_t* dp) {
  if (act == Act::kRelu) {
    for (int64_t h = 0; h < H; ++h) d[h] = y[h] > scalar_t(0) ? d[h] : scalar_t(0);
  } else if (act != Act::kNone) {
    for (int64_t h = 0; h < H; ++h) d[h] *= activation_grad(y[h], act);
  }
  if (pw != nullptr) {
    for (int64_t h = 0; h < H; ++h) pw[h] += d[h] * xhat[h];
  }
  if (pb != nullptr) {
    for (int64_t h = 0; h < H; ++h) pb[h] += d[h];
  }
  if (w != nullptr) {
    for (int64_t h = 0; h < H; ++h) d[h] *= w[h];  // d now holds dxhat
  }
  const scalar_t m1 = dot_ones(d, H) / scalar_t(H);
  const scalar_t m2 = dot(d, xhat, H) / scalar_t(H);
  for (int64_t h = 0; h < H; ++h) dp[h] = rstd * (d[h] - m1 - xhat[h] * m2);
}

// o = g * a (first) or o += g * a over H values: one term of a mixture summed in order.
template <typename scalar_t>
inline void add_scaled(scalar_t* o, scalar_t g, const scalar_t* a, int64_t H, bool first) {
  if (first) {
    for (int64_t h = 0; h < H; ++h) o[h] = g * a[h];
  } else {
    for (int64_t h = 0; h < H; ++h) o[h] += g * a[h];
  }
}

template <typename scalar_t>
void ln_mix_fwd_kernel(const scalar_t* pre, const scalar_t* gates, const scalar_t* lnw, const scalar_t* lnb,
                       double eps, Act act, scalar_t* out, const LnLayout& L) {
  const int64_t B = L.B, E = L.E, H = L.H, T = L.T;
  for_row_blocks(B, [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<scalar_t> buf(3 * H);
    scalar_t *xhat = buf.data(), *y = xhat + H, *a = y + H;
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t e = 0; e < E; ++e) {
        scalar_t rstd;
        ln_activate_row(pre + b * L.stride_b + e * L.stride_e, H, eps, lnw ? lnw + e * H : nullptr,
                        lnb ? lnb + e * H : nullptr, act, xhat, y, a, &rstd);
        for (int64_t t = 0; t < T; ++t) add_scaled(out + (t * B + b) * H, gates[(t * B + b) * E + e], a, H, e == 0);
      }
    }
  });
}

// Per row (b, e): the activation recomputed from pre, then dgates[t, b, e] = <go[t, b], a>, da = sum_t g * go[t, b],
// dy = da * act'(y), the LayerNorm affine gradients (partial sums per block), dxhat = dy * w and the LayerNorm
// backward dpre = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), whose bias partial sum follows.
template <typename scalar_t>
void ln_mix_bwd_kernel(const scalar_t* go, const scalar_t* pre, const scalar_t* gates, const scalar_t* lnw,
                       const scalar_t* lnb, double eps, Act act, scalar_t* dpre, scalar_t* dgates, scalar_t* dbias,
                       scalar_t* dlnw, scalar_t* dlnb, const LnLayout& L) {
  const int64_t B = L.B, E = L.E, H = L.H, T = L.T;
  BlockSums<scalar_t, 3> sums({dbias, dlnw, dlnb}, B, E * H);
  for_row_blocks(B, [&](int64_t blk, int64_t r0, int64_t r1) {
    const auto part = sums.block(blk);  // bias, ln_weight, ln_bias partials of this block
    std::vector<scalar_t> buf(4 * H);
    scalar_t *xhat = buf.data(), *y = xhat + H, *a = y + H, *d = a + H;
    for (int64_t b = r0; b < r1; ++b) {
      for (int64_t e = 0; e < E; ++e) {
        const scalar_t* w = lnw ? lnw + e * H : nullptr;
        scalar_t rstd;
        ln_activate_row(pre + b * L.stride_b + e * L.stride_e, H, eps, w, lnb ? lnb + e * H : nullptr, act, xhat, y,
                        a, &rstd);
        for (int64_t t = 0; t < T; ++t) dgates[(t * B + b) * E + e] = dot(go + (t * B + b) * H, a, H);
        for (int64_t t = 0; t < T; ++t) add_scaled(d, gates[(t * B + b) * E + e], go + (t * B + b) * H, H, t == 0);
        scalar_t* dp = dpre + b * L.stride_b + e * L.stride_e;
        ln_backward_row(d, xhat, y, w, rstd, act, H, part[1] ? part[1] + e * H : nullptr,
                        part[2] ? part[2] + e * H : nullptr, dp);
        if (part[0] != nullptr) add_scaled(part[0] + e * H, scalar_t(1), dp, H, false);
      }
    }
  });
  sums.reduce();
}

LnLayout ln_layout(const at::Tensor& pre, const at::Tensor& gates, bool expert_major) {
  LnLayout L;
  L.B = expert_major ? pre.size(1) : pre.size(0);
  L.E = expert_major ? pre.size(0) : pre.size(1);
  L.H = pre.size(2);
  L.T = gates.size(0);
  L.stride_b = expert_major ? L.H : L.E * L.H;
  L.stride_e = expert_major ? L.B * L.H : L.H;
  return L;
}

at::Tensor gated_ln_mix_fwd_cpu(const at::Tensor& pre, const at::Tensor& gates,
                                const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                                double eps, c10::string_view activation, bool expert_major) {
  experts::check_ln_mix_args(pre, gates, ln_weight, ln_bias, nullptr, expert_major);
  const Act act = parse_activation(activation);
  const LnLayout L = ln_layout(pre, gates, expert_major);
  at::Tensor out = at::empty({L.T, L.B, L.H}, pre.options());
  if (out.numel() == 0) return out;
  if (L.E == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "gated_ln_mix_fwd", [&] {
    ln_mix_fwd_kernel<scalar_t>(pre.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                                ln_weight.has_value() ? ln_weight->data_ptr<scalar_t>() : nullptr,
                                ln_bias.has_value() ? ln_bias->data_ptr<scalar_t>() : nullptr, eps, act,
                                out.data_ptr<scalar_t>(), L);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_ln_mix_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& pre, const at::Tensor& gates,
    const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias, double eps,
    c10::string_view activation, bool expert_major, bool with_bias) {
  experts::check_ln_mix_args(pre, gates, ln_weight, ln_bias, &grad_out, expert_major);
  const Act act = parse_activation(activation);
  const LnLayout L = ln_layout(pre, gates, expert_major);
  const auto empty = [&] { return at::empty({0}, pre.options()); };
  at::Tensor dpre = at::empty_like(pre);
  at::Tensor dgates = at::empty_like(gates);
  at::Tensor dbias = with_bias ? at::zeros({L.E, L.H}, pre.options()) : empty();
  at::Tensor dlnw = ln_weight.has_value() ? at::zeros({L.E, L.H}, pre.options()) : empty();
  at::Tensor dlnb = ln_bias.has_value() ? at::zeros({L.E, L.H}, pre.options()) : empty();
  if (pre.numel() == 0 || L.T == 0) {  // no rows, experts, hidden units or tasks: every sum is empty
    dpre.zero_();
    dgates.zero_();
    return {dpre, dgates, dbias, dlnw, dlnb};
  }
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "gated_ln_mix_bwd", [&] {
    ln_mix_bwd_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                                ln_weight.has_value() ? ln_weight->data_ptr<scalar_t>() : nullptr,
                                ln_bias.has_value() ? ln_bias->data_ptr<scalar_t>() : nullptr, eps, act,
                                dpre.data_ptr<scalar_t>(), dgates.data_ptr<scalar_t>(),
                                with_bias ? dbias.data_ptr<scalar_t>() : nullptr,
                                ln_weight.has_value() ? dlnw.data_ptr<scalar_t>() : nullptr,
                                ln_bias.has_value() ? dlnb.data_ptr<scalar_t>() : nullptr, L);
  });
  return {dpre, dgates, dbias, dlnw, dlnb};
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

// ---- routed LayerNorm experts: rows sorted by expert (row i of pre belongs to expert expert_of(i), found from the
// offsets), out[b] = sum_j w[b, j] * act(LayerNorm_e(pre[pos[b * k + j]])) over the slots j in order.
inline int64_t expert_of_row(const int64_t* offsets, int64_t E, int64_t i) {
  return std::upper_bound(offsets + 1, offsets + E + 1, i) - (offsets + 1);
}

template <typename scalar_t>
void routed_ln_combine_kernel(const scalar_t* pre, const int64_t* pos, const scalar_t* w, const int64_t* offsets,
                              const scalar_t* lnw, const scalar_t* lnb, double eps, Act act, scalar_t* out, int64_t B,
                              int64_t k, int64_t E, int64_t H) {
  for_row_blocks(B, [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<scalar_t> buf(3 * H);
    scalar_t *xhat = buf.data(), *y = xhat + H, *a = y + H;
    for (int64_t b = r0; b < r1; ++b) {
      scalar_t* o = out + b * H;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = pos[b * k + j];
        const int64_t e = expert_of_row(offsets, E, i);
        scalar_t rstd;
        ln_activate_row(pre + i * H, H, eps, lnw ? lnw + e * H : nullptr, lnb ? lnb + e * H : nullptr, act, xhat, y,
                        a, &rstd);
        add_scaled(o, w != nullptr ? w[b * k + j] : scalar_t(1), a, H, j == 0);
      }
    }
  });
}

// Per sorted row i (pair p = order[i], sample p / k, expert e): the activation recomputed from pre[i], then
// dw[p] = <go[sample], a>, dy = w[p] * go[sample] * act'(y), the affine gradients (per-block partial sums),
// and the LayerNorm backward into dpre[i].
template <typename scalar_t>
void routed_ln_mix_bwd_kernel(const scalar_t* go, const scalar_t* pre, const int64_t* order, const scalar_t* w,
                              const int64_t* offsets, const scalar_t* lnw, const scalar_t* lnb, double eps, Act act,
                              scalar_t* dpre, scalar_t* dw, scalar_t* dlnw, scalar_t* dlnb, int64_t N, int64_t k,
                              int64_t E, int64_t H) {
  BlockSums<scalar_t, 2> sums({dlnw, dlnb}, N, E * H);
  for_row_blocks(N, [&](int64_t blk, int64_t r0, int64_t r1) {
    const auto part = sums.block(blk);  // ln_weight, ln_bias partials of this block
    std::vector<scalar_t> buf(4 * H);
    scalar_t *xhat = buf.data(), *y = xhat + H, *a = y + H, *d = a + H;
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t p = order[i];
      const int64_t e = expert_of_row(offsets, E, i);
      const scalar_t* g = go + (p / k) * H;
      const scalar_t* we = lnw ? lnw + e * H : nullptr;
      scalar_t rstd;
      ln_activate_row(pre + i * H, H, eps, we, lnb ? lnb + e * H : nullptr, act, xhat, y, a, &rstd);
      if (w != nullptr) dw[p] = dot(g, a, H);
      add_scaled(d, w != nullptr ? w[p] : scalar_t(1), g, H, true);
      ln_backward_row(d, xhat, y, we, rstd, act, H, part[0] ? part[0] + e * H : nullptr,
                      part[1] ? part[1] + e * H : nullptr, dpre + i * H);
    }
  });
  sums.reduce();
}

at::Tensor routed_ln_combine_cpu(const at::Tensor& pre, const at::Tensor& order,
                                 const c10::optional<at::Tensor>& route_weight, int64_t batch, const at::Tensor& offsets,
                                 const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                                 double eps, c10::string_view activation) {
  const std::vector<int64_t> pos = experts::check_route_args(pre, order, route_weight, batch);
  const int64_t E = experts::check_routed_ln_args(pre, offsets, ln_weight, ln_bias);
  const Act act = parse_activation(activation);
  const int64_t H = pre.size(1);
  at::Tensor out = at::empty({batch, H}, pre.options());
  if (batch == 0 || H == 0) return out;
  const int64_t k = pre.size(0) / batch;
  if (k == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "routed_ln_combine", [&] {
    routed_ln_combine_kernel<scalar_t>(pre.data_ptr<scalar_t>(), pos.data(),
                                       route_weight.has_value() ? route_weight->data_ptr<scalar_t>() : nullptr,
                                       offsets.data_ptr<int64_t>(),
                                       ln_weight.has_value() ? ln_weight->data_ptr<scalar_t>() : nullptr,
                                       ln_bias.has_value() ? ln_bias->data_ptr<scalar_t>() : nullptr, eps, act,
                                       out.data_ptr<scalar_t>(), batch, k, E, H);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_ln_mix_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& pre, const at::Tensor& order,
    const c10::optional<at::Tensor>& route_weight, const at::Tensor& offsets,
    const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias, double eps,
    c10::string_view activation) {
  TORCH_CHECK(grad_out.dim() == 2, "grad_out must be 2-D [B, H], got ", grad_out.dim(), "-D");
  const int64_t B = grad_out.size(0);
  experts::check_route_args(pre, order, route_weight, B);
  const int64_t E = experts::check_routed_ln_args(pre, offsets, ln_weight, ln_bias);
  const Act act = parse_activation(activation);
  const int64_t N = pre.size(0), H = pre.size(1);
  check_tensor(grad_out, "grad_out", pre.scalar_type(), 2, pre.device());
  TORCH_CHECK(grad_out.size(1) == H, "grad_out must be [", B, ", ", H, "], got ", grad_out.sizes());
  const auto empty = [&] { return at::empty({0}, pre.options()); };
  at::Tensor d = at::empty_like(pre);
  at::Tensor dw = route_weight.has_value() ? at::empty_like(*route_weight) : empty();
  at::Tensor dlnw = ln_weight.has_value() ? at::zeros({E, H}, pre.options()) : empty();
  at::Tensor dlnb = ln_bias.has_value() ? at::zeros({E, H}, pre.options()) : empty();
  if (N == 0 || H == 0) {
    if (route_weight.has_value()) dw.zero_();
    return {d, dw, dlnw, dlnb};
  }
  const int64_t k = N / B;
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "routed_ln_mix_bwd", [&] {
    routed_ln_mix_bwd_kernel<scalar_t>(
        grad_out.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
        route_weight.has_value() ? route_weight->data_ptr<scalar_t>() : nullptr, offsets.data_ptr<int64_t>(),
        ln_weight.has_value() ? ln_weight->data_ptr<scalar_t>() : nullptr,
        ln_bias.has_value() ? ln_bias->data_ptr<scalar_t>() : nullptr, eps, act, d.data_ptr<scalar_t>(),
        route_weight.has_value() ? dw.data_ptr<scalar_t>() : nullptr,
        ln_weight.has_value() ? dlnw.data_ptr<scalar_t>() : nullptr,
        ln_bias.has_value() ? dlnb.data_ptr<scalar_t>() : nullptr, N, k, E, H);
  });
  return {d, dw, dlnw, dlnb};
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
  m.impl("gated_ln_mix_fwd", &mbrec_fast::gated_ln_mix_fwd_cpu);
  m.impl("gated_ln_mix_bwd", &mbrec_fast::gated_ln_mix_bwd_cpu);
  m.impl("routed_ln_combine", &mbrec_fast::routed_ln_combine_cpu);
  m.impl("routed_ln_mix_bwd", &mbrec_fast::routed_ln_mix_bwd_cpu);
}
