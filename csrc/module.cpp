// The mbrec_fast operator library. Every op family declares its schemas in its own
// TORCH_LIBRARY_FRAGMENT next to its kernels (csrc/<family>/<family>_ops.cpp); this file
// owns the namespace and the Python module that loading the shared object needs.
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
