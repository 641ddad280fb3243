// Portable variant of the scoring micro-kernel (any CPU): GCC/clang vector extensions of 4 floats
// (SSE2 on x86-64, NEON on arm64), 4 items x 8 users per tile. No FMA is assumed: a score may round
// differently from the FMA variants (within the tolerance the tests and docs state).
#include "evaluator/score_kernel.h"

namespace mbrec_fast {
namespace {

struct Isa {
  static constexpr const char* kName = "portable";
  static constexpr int W = 4, MR = 4, NV = 2;
  typedef float V __attribute__((vector_size(16)));
  typedef float Vu __attribute__((vector_size(16), aligned(4)));
  typedef int32_t M __attribute__((vector_size(16)));
  static V zero() { return V{0.f, 0.f, 0.f, 0.f}; }
  static V load(const float* p) { return *reinterpret_cast<const V*>(p); }
  static V loadu(const float* p) { return *reinterpret_cast<const Vu*>(p); }
  static V bcast(float x) { return V{x, x, x, x}; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static M gt(V a, V b) { return a > b; }
  static M ge(V a, V b) { return a >= b; }
  static M mor(M a, M b) { return a | b; }
  static uint32_t bits(M m) {
    return static_cast<uint32_t>((m[0] & 1) | (m[1] & 2) | (m[2] & 4) | (m[3] & 8));
  }
  static void store(float* p, V v) { *reinterpret_cast<Vu*>(p) = v; }
};

#include "evaluator/score_kernel_impl.h"

}  // namespace

const ScoreKernel* score_kernel_portable() { return &kScoreKernel; }

}  // namespace mbrec_fast
