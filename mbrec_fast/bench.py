"""`mbrec-fast bench [op ...]`: runs the pytest-benchmark suites in benchmarks/ (a source
checkout) and reports, per case, each implementation's time and how many times slower it is
than mbrec_fast's, plus a JSON file and a PNG plot of those ratios. Without --full the cases
are small (quick mode) and their names say the sizes that ran. Optional baselines:
pip install faiss-cpu implicit (or the [baselines] extra).

Benchmarks describe themselves through `benchmark.extra_info`: `op`, `case`, `impl` (ours is named
exactly "mbrec_fast") and any numeric figures (users_per_s, frac_sgemm_bound, peak_mem_mb, ...),
which are shown as extra columns.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional

OURS = "mbrec_fast"
_SKIP_FIELDS = {"op", "case", "impl", "torch", "threads", "cpu", "mbrec_fast", "cuda_built", "gpu"}


def benchmarks_dir() -> pathlib.Path:
    """benchmarks/ of the source tree this package was installed from (editable installs)."""
    here = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    env = os.environ.get("MBREC_FAST_BENCHMARKS")
    path = pathlib.Path(env) if env else here
    if not path.is_dir():
        raise SystemExit(f"mbrec-fast bench: benchmarks folder not found at {path}; run from a source checkout "
                         "(pip install -e .) or set MBREC_FAST_BENCHMARKS")
    return path


def summarize(report: dict) -> List[dict]:
    """One row per benchmark: op, case, impl, median seconds, ratio to ours, extra numeric figures."""
    rows = []
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        stats = bench.get("stats") or {}
        rows.append({
            "op": info.get("op", bench.get("group") or "?"),
            "case": info.get("case", bench.get("name")),
            "impl": info.get("impl", bench.get("name")),
            "median_s": stats.get("median"),
            "extra": {k: v for k, v in info.items() if k not in _SKIP_FIELDS and isinstance(v, (int, float))
                      and not isinstance(v, bool)},
        })
    ours: Dict[tuple, dict] = {(r["op"], r["case"]): r for r in rows if r["impl"] == OURS and r["median_s"]}
    for r in rows:
        base = ours.get((r["op"], r["case"]))
        r["x_slower_than_ours"] = _slowdown(r, base) if base else None
    return rows


def _slowdown(r: dict, ours: dict) -> Optional[float]:
    """Times slower than ours. A baseline may run a smaller slice of the case (a slow Python loop on part of
    the rows), so a throughput figure both report (a `*_per_s` extra) is compared first; else median times."""
    rates = [k for k in r["extra"] if k.endswith("_per_s") and ours["extra"].get(k)]
    if rates and r["extra"][rates[0]]:
        return ours["extra"][rates[0]] / r["extra"][rates[0]]
    return r["median_s"] / ours["median_s"] if r["median_s"] else None


def format_report(rows: List[dict]) -> str:
    """Plain-text table grouped by op and case."""
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r["op"], r["case"]), []).append(r)
    lines = []
    for (op, case), members in groups.items():
        lines.append(f"\n[{op}] {case}")
        members.sort(key=lambda r: (r["impl"] != OURS, r["median_s"] or float("inf")))
        for r in members:
            t = "disabled" if r["median_s"] is None else f"{r['median_s'] * 1e3:10.2f} ms"
            ratio = "" if r["x_slower_than_ours"] is None else f"  {r['x_slower_than_ours']:7.2f}x ours"
            extra = "  ".join(f"{k}={v:.4g}" for k, v in sorted(r["extra"].items()))
            lines.append(f"  {r['impl']:<24} {t}{ratio}  {extra}")
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> None:
    """Bar chart: for each (op, case), how many times slower each baseline is than mbrec_fast."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{r['op']}: {r['case']}\n{r['impl']}", r["x_slower_than_ours"]) for r in rows
            if r["impl"] != OURS and r["x_slower_than_ours"]]
    fig, ax = plt.subplots(figsize=(9, max(2.0, 0.42 * len(bars) + 1)))
    if bars:
        ax.barh(range(len(bars)), [b[1] for b in bars], color="tab:blue")
        ax.set_yticks(range(len(bars)))
        ax.set_yticklabels([b[0] for b in bars], fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
    ax.set_xlabel("baseline time / mbrec_fast time (higher = mbrec_fast faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    from .training.cli_options import HelpFormatter
    parser = argparse.ArgumentParser(prog="mbrec-fast bench", formatter_class=HelpFormatter,
                                     description=__doc__.split("\n\n")[0].replace("`", ""))
    parser.add_argument("ops", nargs="*", help="benchmark suites to run, e.g. evaluator sampler experts (default: all)")
    parser.add_argument("--full", action="store_true", help="the full shape grid (MBREC_FAST_BENCH_FULL=1)")
    parser.add_argument("--run-dir", "--out", dest="out", default="bench_results", metavar="DIR",
                        help="folder for the JSON report and PNG plot (--out is an alias)")
    parser.add_argument("-k", default=None, help="pytest -k expression to select cases")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="tabulate an existing pytest-benchmark JSON instead of running anything")
    args = parser.parse_args(argv)
    if args.report:
        if not os.path.isfile(args.report):
            raise SystemExit(f"mbrec-fast bench: --report {args.report!r} is not a file")
        with open(args.report) as f:
            print(format_report(summarize(json.load(f))))
        return 0

    root = benchmarks_dir()
    missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"mbrec-fast bench: needs {' and '.join(missing)}: pip install pytest pytest-benchmark "
                         "(or the [test] extra)")
    absent = [name for mod, name in (("faiss", "faiss-cpu"), ("implicit", "implicit"))
              if importlib.util.find_spec(mod) is None]
    if absent:
        print(f"baselines not installed, skipped: {', '.join(absent)} (pip install {' '.join(absent)}, "
              "or the [baselines] extra)", flush=True)
    print("quick mode: small cases, named by the sizes that run (--full for the documented sizes)"
          if not args.full else "full mode: the documented sizes (minutes per case)", flush=True)
    available = sorted(p.stem[len("test_bench_"):] for p in root.glob("test_bench_*.py"))
    for op in args.ops:
        if op not in available:
            raise SystemExit(f"mbrec-fast bench: unknown op {op!r}; available: {', '.join(available)}")
    files = [str(root / f"test_bench_{op}.py") for op in (args.ops or available)]
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(args.out, f"bench-{stamp}.json")
    env = dict(os.environ)
    if args.full:
        env["MBREC_FAST_BENCH_FULL"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={json_path}", "--benchmark-columns=median,iqr,rounds", *files]
    if args.k:
        cmd += ["-k", args.k]
    print("running:", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=env, cwd=str(root.parent))
    if not os.path.isfile(json_path):
        print("mbrec-fast bench: no report was written", file=sys.stderr)
        return code or 1
    with open(json_path) as f:
        rows = summarize(json.load(f))
    print(format_report(rows))
    png_path = json_path[:-5] + ".png"
    plot(rows, png_path)
    summary_path = json_path[:-5] + "-summary.json"
    with open(summary_path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nreport: {json_path}\nsummary: {summary_path}\nplot: {png_path}")
    return code
