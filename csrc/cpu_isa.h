// Run-time choice of the CPU kernel variant. The extension is built without -march flags; the SIMD
// kernels are compiled for their instruction set with target pragmas in their own files and picked here
// from the CPU's features, so one build runs on any x86-64 CPU and never executes an instruction it lacks.
#pragma once
#include <string>
#include <vector>

namespace mbrec_fast {

enum class CpuIsa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

const char* cpu_isa_name(CpuIsa isa);

// True when this CPU (and OS) can run the variant: AVX2 needs AVX2 + FMA, AVX-512 needs AVX-512F.
bool cpu_isa_supported(CpuIsa isa);

// The variant the CPU ops use now: the best supported one, or the one named by the environment variable
// MBREC_FAST_CPU_ISA ("avx512", "avx2", "portable"; "" or "auto" = best). Naming a variant this CPU cannot
// run is an error (tests force each supported variant through it).
CpuIsa cpu_isa_selected();

// Names of the variants this CPU supports, best first.
std::vector<std::string> cpu_isa_variants();

}  // namespace mbrec_fast
