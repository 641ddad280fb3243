#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer check of the C++ kernels: builds the extension's CPU sources
# with the sanitizers into build/asan (the regular in-place build is untouched), assembles a copy of the
# package that loads that build, and runs the evaluator, sampler and property tests and the experts' C++ pass
# tests (mixture, LayerNorm and routed passes, and the public ops on their paths) against it. Any
# sanitizer report aborts the run (halt_on_error, no recovery), and the log is searched for reports as well.
# Leak detection is off: CPython and libtorch keep allocations alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
out=build/asan
start=$SECONDS
mkdir -p "$out"
MBREC_FAST_CUDA=0 MBREC_FAST_SANITIZE=1 python setup.py -q build_ext --build-lib "$out/lib" --build-temp "$out/tmp" \
    > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
so=$(ls "$out"/lib/mbrec_fast/_C*.so)
rm -rf "$out/site" && mkdir -p "$out/site/mbrec_fast"
for entry in mbrec_fast/*; do
  case "$entry" in *.so|*__pycache__*) continue ;; esac
  ln -s "$PWD/$entry" "$out/site/$entry"
done
ln -s "$PWD/kernels" "$out/site/mbrec_fast/kernels"
cp "$so" "$out/site/mbrec_fast/"
echo "== sanitizer build done in $((SECONDS - start)) s"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:alloc_dealloc_mismatch=0:detect_odr_violation=0:exitcode=99
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=98
export PYTHONPATH="$PWD/$out/site" MBREC_FAST_HYPOTHESIS_EXAMPLES=${MBREC_FAST_HYPOTHESIS_EXAMPLES:-100}
# -P: no current directory on sys.path, so `import mbrec_fast` is the sanitized copy
python -P -c "import mbrec_fast, sys; f = mbrec_fast._C.__file__; print('extension:', f); sys.exit('/build/asan/' not in f)"
status=0
python -P -m pytest -q -p no:cacheprovider --benchmark-disable tests/test_evaluator.py tests/test_sampler.py \
    tests/test_properties.py tests/test_hardening.py::test_raw_ops_check_csr_offsets \
    tests/test_segment_mm.py tests/test_graph_spmm.py tests/test_graph_row_norm.py "tests/test_experts.py" -k "not test_experts.py or mix or passes or fused_path or ln_path" \
    2>&1 | tee "$out/test.log" || status=$?
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$out/test.log"; then
  echo "== sanitizer report found (see above)"; status=1
fi
echo "== sanitizer tests done in $((SECONDS - start)) s (status $status)"
exit $status
