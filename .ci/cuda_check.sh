#!/usr/bin/env bash
# Compile-and-link check of the CUDA kernels against the CUDA build of torch (no GPU needed).
# Builds every csrc/**/*.cu plus the C++ sources into a scratch folder with nvcc, loads the
# shared object into a CUDA torch, and checks that every mbrec_fast op with a CUDA kernel in
# csrc/ got one registered. The CPU build in the main environment is left untouched.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "$(find csrc -name "*.cu" -print -quit)" ]; then
  echo "cuda-check: no CUDA sources yet, nothing to build"; exit 0
fi
VENV=${MBREC_FAST_CUDA_VENV:-$HOME/.cache/mbrec-fast/venv-cu130}
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') and torch.version.cuda else 1)" 2>/dev/null; then
  echo "cuda-check: creating $VENV with torch==2.14.1 (CUDA build)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 numpy setuptools ninja
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CU=$SITE/nvidia/cu13
export CUDA_HOME=/usr/local/cuda
export CPATH="$CU/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$CU/lib:/usr/local/cuda/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
export TORCH_CUDA_ARCH_LIST="8.0;9.0"
export MBREC_FAST_CUDA=1
export MAX_JOBS=${MAX_JOBS:-2}
OUTDIR=${MBREC_FAST_CUDA_BUILD:-build/cuda-check}
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/lib/mbrec_fast/_C*.so  # a failed build must not pass on an older library
PATH="$VENV/bin:/usr/local/cuda/bin:$PATH" "$VENV/bin/python" setup.py -q build_ext \
  --build-lib "$OUTDIR/lib" --build-temp "$OUTDIR/tmp" 2>&1 | grep -v -E "^(running|copying|creating)" || true
SO=$(ls "$OUTDIR"/lib/mbrec_fast/_C*.so)
LD_LIBRARY_PATH="$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$VENV/bin/python" - "$SO" <<'PY'
import re, sys, glob, torch
torch.ops.load_library(sys.argv[1])
assert torch.ops.mbrec_fast.cuda_built(), "extension was built without MBREC_WITH_CUDA"
# Every op that a .cu file registers for CUDA must have a CUDA kernel in the loaded library.
names = set()
for path in glob.glob("csrc/**/*.cu", recursive=True):
    src = open(path).read()
    if "TORCH_LIBRARY_IMPL(mbrec_fast, CUDA" in src:
        names.update(re.findall(r'm\.impl\(\s*"(\w+)"', src))
missing = [n for n in sorted(names) if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mbrec_fast::{n}", "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"cuda-check: built {sys.argv[1]} (torch {torch.__version__}, CUDA {torch.version.cuda}); "
      f"CUDA kernels registered for {len(names)} ops: {', '.join(sorted(names))}")
PY
