#!/usr/bin/env bash
# A regular (non-editable) install into a fresh venv, then one short command per model family, run
# from a temporary folder outside the source tree, so nothing can come from the checkout: missing
# runtime dependencies (pandas was one) and data lookup that only works in a checkout show up here.
# Needs $MBREC_FAST_DATA (the data root); .ci/run sets it. Usage: bash .ci/install_check.sh
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
: "${MBREC_FAST_DATA:?set MBREC_FAST_DATA to the data root (the folder holding beibei/, samples/)}"
work=$(mktemp -d "${TMPDIR:-/tmp}/mbrec-fast-install-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
bin="$work/venv/bin"
"$bin/pip" install -q torch==2.13.0 "setuptools>=70.1" ninja wheel
"$bin/pip" install -q --no-build-isolation "$src"
cd "$work"
export MBREC_FAST_PROGRESS=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$bin/python" - <<'PY'
import mbrec_fast, sys
assert "site-packages" in mbrec_fast.__file__, f"imported from {mbrec_fast.__file__}, not the installed copy"
print("installed at", mbrec_fast.__file__)
PY
"$bin/mbrec-fast" --version
"$bin/mbrec-fast" --help >/dev/null
"$bin/mbrec-fast" train --help >/dev/null
"$bin/mbrec-fast" evaluate --help >/dev/null
echo "== multi-behavior (real data found through ./data, no MBREC_FAST_DATA)"
ln -s "$MBREC_FAST_DATA" data
env -u MBREC_FAST_DATA "$bin/mbrec-fast" train --model bpr --data retailrocket --epochs 1 --emb-dim 16 \
    --ks 10 --run-dir runs/bpr
"$bin/mbrec-fast" evaluate --checkpoint runs/bpr/best.pt --ks 10
rm data
echo "== multi-domain (bundled MovieLens sample through \$MBREC_FAST_DATA)"
"$bin/mbrec-fast" train --model mmoe --data movielens --epochs 1 --run-dir runs/mmoe
echo "== sequential (synthetic)"
"$bin/mbrec-fast" train --model sasrec --data synthetic --syn-users 200 --syn-items 40 --epochs 1 --run-dir runs/sasrec
echo "== README API example"
"$bin/python" -c "
import os, mbrec_fast as mf
g = mf.InteractionGraph.from_table(os.path.join(os.environ['MBREC_FAST_DATA'], 'retailrocket', 'interactions.tsv'),
                                   ['view', 'cart', 'buy'])
print('InteractionGraph.from_table:', type(g).__name__)
"
echo "== no data anywhere: the error names the places tried"
mkdir empty && cd empty
if env -u MBREC_FAST_DATA "$bin/mbrec-fast" train --model bpr --data beibei --epochs 1 2>err.txt; then
    echo "expected a missing-data error"; exit 1
fi
grep -q "MBREC_FAST_DATA" err.txt && grep -q "./data" err.txt || { cat err.txt; exit 1; }
echo "install check passed"
