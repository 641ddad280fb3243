// Portability macros for code shared between the CPU (OpenMP) and CUDA backends.
// Everything under csrc/common/ is torch-free so that the same lines run on both.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MBREC_HD __host__ __device__ __forceinline__
#else
#define MBREC_HD inline
#endif
