"""Build of the mbrec_fast._C extension.

CPU sources are always built (-O3, OpenMP) for the baseline of the target architecture, whatever the
build machine's CPU: the SIMD kernels (AVX2+FMA, AVX-512) carry their instruction set in target pragmas
of their own files and are chosen at run time from the CPU's features (csrc/cpu_isa.h), so one build runs
on every x86-64 CPU. CUDA sources are built when torch is a CUDA build and nvcc is found;
MBREC_FAST_CUDA=1 forces them on (and fails loudly if impossible), MBREC_FAST_CUDA=0 forces them off.
MBREC_FAST_SANITIZE=1 builds with AddressSanitizer + UndefinedBehaviorSanitizer (-O1 -g; see .ci/asan.sh,
which builds into build/asan and leaves the regular extension alone).
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("MBREC_FAST_CUDA", "auto").strip().lower()
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError(
                "MBREC_FAST_CUDA=1 but CUDA cannot be built: torch.version.cuda="
                f"{torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}")
        return True
    return available


def _sources(pattern: str):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def build_extension():
    with_cuda = _want_cuda()
    # -fvisibility=hidden: only PyInit__C (marked by PyMODINIT_FUNC) needs exporting; the inline host/device
    # helpers then bind locally instead of through the PLT.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-fno-math-errno", "-DNDEBUG", "-fvisibility=hidden",
           "-fvisibility-inlines-hidden"]
    sources = _sources("*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link = ["-fopenmp"]
    if os.environ.get("MBREC_FAST_SANITIZE", "0") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-g"] + sanitize
        extra_link += sanitize
    if with_cuda:
        sources += _sources("*.cu")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DMBREC_WITH_CUDA", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "mbrec_fast._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DMBREC_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=extra_link)
    return cpp_extension.CppExtension(
        "mbrec_fast._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)


setup(
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
