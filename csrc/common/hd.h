// Portability macros for code shared between the CPU (OpenMP) and CUDA backends.
// The kernel helpers under csrc/common/ are torch-free so that the same lines run on both (checks.h, the
// host-side argument checks, is the one ATen header there).
#pragma once
#include <cstdint>

// MBREC_HOT marks the small functions of per-sample inner loops (RNG words, row membership, one draw):
// gcc otherwise keeps some of them out of line, and the call overhead was a third of the sampler's time.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MBREC_HD __host__ __device__ __forceinline__
#define MBREC_HOT __host__ __device__ __forceinline__
#else
#define MBREC_HD inline
#define MBREC_HOT inline __attribute__((always_inline))
#endif
