// The mbrec_fast operator library. Every C++ op family (evaluator, sampler) has the same layout:
//   csrc/<family>/<family>_ops.cpp   the schemas (TORCH_LIBRARY_FRAGMENT, m.def only);
//   csrc/<family>/<family>_cpu.cpp   the CPU kernels and their TORCH_LIBRARY_IMPL(mbrec_fast, CPU);
//   csrc/<family>/<family>_cuda.cu   the CUDA kernels and their TORCH_LIBRARY_IMPL(mbrec_fast, CUDA);
//   csrc/<family>/<family>_args.h    the argument checks both kernels run, on csrc/common/checks.h;
//   mbrec_fast/_<family>_ops.py      the fake (meta) implementations and the Python call wrappers.
// All C++ code lives in namespace mbrec_fast. This file owns the op namespace and the Python module that
// loading the shared object needs.
#include <torch/library.h>
#include <Python.h>

namespace {
bool cuda_built() {
#ifdef MBREC_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(mbrec_fast, m) {
  // Reports whether the CUDA kernels were compiled into this build.
  m.def("cuda_built() -> bool", &cuda_built);
}

extern "C" {
// Importing mbrec_fast._C loads this shared object, which runs the static op registrations above.
PyMODINIT_FUNC PyInit__C(void) {  // PyMODINIT_FUNC: exported under -fvisibility=hidden
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
