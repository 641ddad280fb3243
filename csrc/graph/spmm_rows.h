// The sparse x dense product's CPU SIMD kernel: interface shared by its variants (csrc/cpu_kernels_<isa>.cpp, body
// in spmm_rows_impl.h) and graph_cpu.cpp. One call computes rows [r0, r1) of y = A x (fp32): each output element
// is the FMA chain of spmm_core.h, vectorised across the columns, so every variant agrees bit for bit with the
// portable loop and the CUDA kernel.
#pragma once
#include <cstdint>

namespace mbrec_fast {

struct SpmmRowsArgs {
  const int64_t* crow;  // [rows + 1]
  const int64_t* col;   // [nnz]; an index outside [0, n_x) is skipped and reported by the return value
  const float* val;     // [nnz]
  const float* x;       // [n_x, d], row-major
  int64_t n_x;
  float* y;             // [rows, d], row-major
  int64_t d;
  int64_t r0, r1;
};

struct SpmmRowsKernel {
  const char* name;
  bool (*rows)(const SpmmRowsArgs& args);  // false: some column index was out of range
};

// Variants; nullptr where the compiler cannot build them (non-x86). Select with cpu_isa.h.
const SpmmRowsKernel* spmm_rows_avx2();
const SpmmRowsKernel* spmm_rows_avx512();

}  // namespace mbrec_fast
