// CPU feature detection and the MBREC_FAST_CPU_ISA override (see cpu_isa.h), plus two ops that report them.
#include "cpu_isa.h"

#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

namespace mbrec_fast {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

bool cpu_isa_supported(CpuIsa isa) {
  if (isa == CpuIsa::kPortable) return true;
#if defined(__x86_64__) || defined(_M_X64)
  // libgcc's detection also checks that the OS saves the vector state (XGETBV).
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  return isa == CpuIsa::kAvx2 ? avx2 : avx512;
#else
  return false;
#endif
}

CpuIsa cpu_isa_selected() {
  const char* env = std::getenv("MBREC_FAST_CPU_ISA");
  if (env != nullptr && env[0] != '\0' && std::strcmp(env, "auto") != 0) {
    for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kPortable}) {
      if (std::strcmp(env, cpu_isa_name(isa)) == 0) {
        TORCH_CHECK(cpu_isa_supported(isa), "MBREC_FAST_CPU_ISA=", env, ": this CPU cannot run the ", env,
                    " kernels (supported: ", c10::Join(", ", cpu_isa_variants()), ")");
        return isa;
      }
    }
    TORCH_CHECK(false, "MBREC_FAST_CPU_ISA must be one of avx512, avx2, portable or auto, got '", env, "'");
  }
  if (cpu_isa_supported(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (cpu_isa_supported(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kPortable;
}

std::vector<std::string> cpu_isa_variants() {
  std::vector<std::string> out;
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kPortable}) {
    if (cpu_isa_supported(isa)) out.emplace_back(cpu_isa_name(isa));
  }
  return out;
}

}  // namespace mbrec_fast

namespace {
std::vector<std::string> cpu_isa_variants_op() { return mbrec_fast::cpu_isa_variants(); }
std::string cpu_isa_op() { return mbrec_fast::cpu_isa_name(mbrec_fast::cpu_isa_selected()); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(mbrec_fast, m) {
  // CPU kernel variants this machine can run, best first (e.g. ["avx2", "portable"]).
  m.def("cpu_isa_variants() -> str[]", &cpu_isa_variants_op);
  // The variant the CPU ops use now (MBREC_FAST_CPU_ISA or the best supported).
  m.def("cpu_isa() -> str", &cpu_isa_op);
}
