"""One command that checks everything on a GPU: build, the CUDA/Triton tests, the GPU benchmarks, one report.

    bash benchmarks/gpu_check.sh [--out DIR]           # a machine with an NVIDIA GPU, from a clean checkout
    python benchmarks/gpu_check.py --dry-run [--out DIR]  # the same steps on the CPU with tiny sizes

Steps, each in its own subprocess with its own time limit (a failure or timeout is recorded and the next step
runs; the whole run stops starting steps at TOTAL_BUDGET_S, so it ends in under 8 minutes):

* env             GPU, torch, CUDA and Triton versions
* build           pip install -e . with MBREC_FAST_CUDA=1 for this GPU's architecture (dry run: import check)
* tests_gpu       every test marked `gpu` (sampler bits vs CPU, evaluator vs CPU, Triton experts, launch counts)
* tests_device    tests/test_device_checks.py on the device: sampler bits for every mode, evaluator vs reference
                  (ties, exclusions, score_fn, distributed with one process), experts fwd+bwd vs reference in
                  fp32/fp16/bf16, opcheck of every op on device tensors, torch.compile of a model using each op
* bench_evaluator users/s of the fused evaluator and its fraction of the device's fp32 GEMM rate
* bench_sampler   negatives/s
* bench_experts   fused vs loop of experts (fwd+bwd), kernel launches per layer (profiler)

Writes DIR/gpu_check.md and DIR/gpu_check.json (default DIR: gpu_check_report/).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 450  # no step starts past this, and a step's limit is cut to what is left

# name -> time limit (s) of the step on the GPU; the dry run gives each step the same limit
STEP_LIMITS = {"env": 60, "build": 300, "tests_gpu": 150, "tests_device": 150, "bench_evaluator": 60,
               "bench_sampler": 45, "bench_experts": 60, "bench_graph": 30, "probe_errors": 120}

# documented goals of the GPU figures (docs/experts.md); other figures are reported without a goal
GOALS = {"experts_fwd_bwd_x_loop": (">=", 3.0), "experts_fwd_launches_per_layer": ("<=", 1),
         "errors_crashed": ("<=", 0)}


# ------------------------------------------------------------------------------------------------ the steps
def _python(*args):
    return [sys.executable, *args]


def step_commands(device: str, dry_run: bool, out: pathlib.Path) -> dict:
    """name -> (argv, extra env) of every step."""
    me = str(pathlib.Path(__file__).resolve())
    bench = lambda name: (_python(me, "--bench", name, "--device", device, "--json", str(out / f"{name}.json"))  # noqa: E731
                          + (["--tiny"] if dry_run else []), {})
    pytest = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable", "-rfE")
    if dry_run:
        build = (_python("-c", "import mbrec_fast; print('cuda_built', mbrec_fast.cuda_built())"), {})
    else:
        # editable install (offline: no deps, no build isolation); if pip cannot, an in-place build with the
        # Triton kernels linked where the package expects them (pyproject maps mbrec_fast.kernels to kernels/)
        py = sys.executable
        build = (["bash", "-c", f"{py} -m pip install --no-build-isolation --no-deps -q -e . || "
                  f"({py} setup.py -q build_ext --inplace && ln -sfn ../kernels mbrec_fast/kernels) && "
                  f"{py} -c \"import mbrec_fast; assert mbrec_fast.cuda_built(), 'CUDA kernels not built'\""],
                 {"MBREC_FAST_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)})
    return {
        "env": (_python(me, "--env", "--device", device), {}),
        "build": build,
        "tests_gpu": (pytest + ["-m", "gpu", "tests/test_evaluator.py", "tests/test_sampler.py",
                                "tests/test_experts_triton.py", "tests/test_graph_spmm.py",
                                "tests/test_graph_row_norm.py"], {}),
        "tests_device": (pytest + ["tests/test_device_checks.py"], {"MBREC_FAST_CHECK_DEVICE": device}),
        "bench_evaluator": bench("evaluator"),
        "bench_sampler": bench("sampler"),
        "bench_experts": bench("experts"),
        "bench_graph": bench("graph"),
        "probe_errors": bench("errors"),
    }


def _cuda_arch_env() -> dict:
    """TORCH_CUDA_ARCH_LIST = this GPU only (a build for every architecture takes many minutes)."""
    try:
        out = subprocess.run(_python("-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability())"),
                             capture_output=True, text=True, timeout=60)
        arch = out.stdout.strip().splitlines()[-1]
        return {"TORCH_CUDA_ARCH_LIST": arch} if re.fullmatch(r"\d+\.\d+", arch) else {}
    except Exception:
        return {}


def run_step(name: str, argv, env_extra: dict, limit: float) -> dict:
    env = {**os.environ, **env_extra}
    t = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status = "passed" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timeout ({limit:.0f} s)"
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.perf_counter() - t
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", ln)),
                   lines[-1] if lines else "")
    return {"step": name, "status": status, "seconds": round(seconds, 1), "limit_s": round(limit),
            "summary": summary.strip()[:300], "output_tail": "\n".join(lines[-40:])}


def run_all(device: str, dry_run: bool, out: pathlib.Path, only=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    commands = step_commands(device, dry_run, out)
    results = []
    for name, (argv, env_extra) in commands.items():
        if only and name not in only:
            continue
        left = TOTAL_BUDGET_S - (time.perf_counter() - start)
        if left < 5:
            results.append({"step": name, "status": "skipped (time budget spent)", "seconds": 0,
                            "limit_s": STEP_LIMITS[name], "summary": "", "output_tail": ""})
            continue
        if name == "build" and not dry_run:
            env_extra = {**env_extra, **_cuda_arch_env()}
        results.append(run_step(name, argv, env_extra, min(STEP_LIMITS[name], left)))
        print(f"[gpu_check] {name}: {results[-1]['status']} in {results[-1]['seconds']} s", flush=True)
    figures = {}
    for name in ("evaluator", "sampler", "experts"):
        path = out / f"{name}.json"
        if path.is_file():
            figures.update(json.loads(path.read_text()))
    report = {"device": device, "dry_run": dry_run, "total_seconds": round(time.perf_counter() - start, 1),
              "steps": results, "figures": figures, "goals": _judge(figures)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(render_markdown(report))
    return report


def _judge(figures: dict) -> dict:
    verdicts = {}
    for key, (op, target) in GOALS.items():
        if key in figures and figures[key] is not None:
            value = figures[key]
            verdicts[key] = {"value": value, "goal": f"{op} {target}",
                             "met": value >= target if op == ">=" else value <= target}
    return verdicts


def render_markdown(report: dict) -> str:
    lines = [f"# GPU check ({'dry run on the CPU' if report['dry_run'] else 'device ' + report['device']})", "",
             f"Total {report['total_seconds']} s.", "", "| step | status | seconds | limit (s) | summary |",
             "|---|---|---|---|---|"]
    for r in report["steps"]:
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {r['limit_s']} | "
                     f"{r['summary'].replace('|', '/')} |")
    lines += ["", "## Figures", "", "| figure | value | goal | met |", "|---|---|---|---|"]
    for key, value in sorted(report["figures"].items()):
        goal = report["goals"].get(key)
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} | {goal['goal'] if goal else '-'} | "
                     f"{('yes' if goal['met'] else 'NO') if goal else '-'} |")
    failed = [r for r in report["steps"] if r["status"] != "passed"]
    for r in failed:
        lines += ["", f"## {r['step']}: {r['status']}", "", "```", r["output_tail"], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ env
def print_env(device: str) -> None:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")


# ------------------------------------------------------------------------------------------------ benchmarks
def _timer(device: str):
    import torch

    def best_of(fn, reps: int) -> float:
        for _ in range(3):  # first calls: Triton compiles, autograd and allocator warm up
            fn()
        best = float("inf")
        for _ in range(reps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best
    return best_of


def bench_evaluator(device: str, tiny: bool) -> dict:
    import torch
    from mbrec_fast.evaluator import evaluate_full_ranking, topk
    best_of = _timer(device)
    gen = torch.Generator().manual_seed(0)
    U, N, d, K = (64, 2_000, 16, 20) if tiny else (16_384, 1_000_000, 64, 100)
    ue, ie = torch.randn(U, d, generator=gen).to(device), torch.randn(N, d, generator=gen).to(device)
    cols = torch.randint(0, N, (U, 20), generator=gen).sort(1).values
    ptr = torch.arange(0, U * 20 + 1, 20)
    ex = (ptr.to(device), cols.flatten().to(device))  # duplicates within a row are allowed in exclude
    tg = (ptr.to(device), torch.randint(0, N, (U, 20), generator=gen).sort(1).values.flatten().to(device))
    t_topk = best_of(lambda: topk(ue, ie, K, ex), 3)
    t_eval = best_of(lambda: evaluate_full_ranking(ue, ie, ex, tg, ks=(10, 20, 50, K)), 3)
    torch.backends.cuda.matmul.allow_tf32 = False
    m = 1024 if tiny else 8192
    a, b = torch.randn(m, m, device=device), torch.randn(m, m, device=device)
    gemm_rate = 2 * m ** 3 / best_of(lambda: a @ b, 3)
    return {"evaluator_topk_users_per_s": U / t_topk, "evaluator_users_per_s": U / t_eval,
            "evaluator_frac_fp32_gemm": (U / t_topk) * 2 * N * d / gemm_rate, "fp32_gemm_tflops": gemm_rate / 1e12,
            "evaluator_case": f"{U} users x {N} items d={d} K={K}"}


def bench_sampler(device: str, tiny: bool) -> dict:
    import torch
    import mbrec_fast as mf
    best_of = _timer(device)
    gen = torch.Generator().manual_seed(0)
    n_users, n_items, n = (500, 2_000, 10_000) if tiny else (100_000, 50_000, 2_000_000)
    g = mf.InteractionGraph.from_arrays(torch.randint(0, n_users, (n,), generator=gen),
                                        torch.randint(0, n_items, (n,), generator=gen),
                                        torch.randint(0, 2, (n,), generator=gen), n_users, n_items).to(device)
    rows, num_neg = (2_000, 8) if tiny else (1_000_000, 8)
    users = torch.randint(0, n_users, (rows,), generator=gen).to(device)
    t = best_of(lambda: mf.sample_negatives(g, users, num_neg, mode="exclusive", seed=1), 5)
    return {"sampler_negatives_per_s": rows * num_neg / t, "sampler_case": f"{rows} rows x {num_neg} exclusive"}


def bench_experts(device: str, tiny: bool) -> dict:
    import torch
    from mbrec_fast.nn import from_loop
    from mbrec_fast.reference.experts import LoopGatedExperts
    best_of = _timer(device)
    B, D, H, E, T = (64, 32, 16, 4, 2) if tiny else (32_768, 256, 128, 8, 2)
    torch.manual_seed(0)
    loop = LoopGatedExperts(D, [H], E, T).to(device)
    fused = from_loop(loop.experts, loop.gates)
    x = torch.randn(B, D, device=device, requires_grad=True)

    def fwd_bwd(mod):
        return lambda: mod(x).sum().backward()
    t_fused, t_loop = best_of(fwd_bwd(fused), 5), best_of(fwd_bwd(loop), 5)
    launches = {}
    if device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile
        for name, mod in (("fused", fused), ("loop", loop)):
            with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                mod(x)
                torch.cuda.synchronize()
            launches[name] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    return {"experts_fwd_bwd_ms": t_fused * 1e3, "experts_loop_fwd_bwd_ms": t_loop * 1e3,
            "experts_fwd_bwd_x_loop": t_loop / t_fused,
            "experts_fwd_launches_per_layer": launches.get("fused"), "experts_loop_fwd_launches": launches.get("loop"),
            "experts_case": f"B={B} D={D} H={H} E={E} T={T}"}


def bench_graph(device: str, tiny: bool) -> dict:
    import torch
    from mbrec_fast.graph import csr_spmm
    from mbrec_fast.models.lightgcn import BipartiteAdjacency
    best_of = _timer(device)
    gen = torch.Generator().manual_seed(0)
    n_users, n_items, n, d = (500, 300, 5_000, 32) if tiny else (100_000, 50_000, 2_000_000, 64)
    users, items = torch.randint(0, n_users, (n,), generator=gen), torch.randint(0, n_items, (n,), generator=gen)
    adj = BipartiteAdjacency(users, items, n_users, n_items)
    x = torch.randn(n_items, d, generator=gen).to(device)
    (a, _), (sa, _) = adj.csr_on(device), adj.on(device)
    t_ours, t_torch = best_of(lambda: csr_spmm(a, x), 5), best_of(lambda: torch.sparse.mm(sa, x), 5)
    return {"graph_spmm_nnz_per_s": adj.n_edges / t_ours, "graph_torch_sparse_mm_nnz_per_s": adj.n_edges / t_torch,
            "graph_spmm_x_torch": t_torch / t_ours, "graph_case": f"{n_users} x {n_items}, {adj.n_edges} edges, d={d}"}


# bad-input calls that must raise (the first GPU machine's image crashed on every check formatting an integer)
_ERROR_CASES = {
    "csr_spmm col out of range": "ops.csr_spmm(T([0, 2, 3]), T([1, 4, 0]), F(3), torch.randn(4, 3, device=D))",
    "csr_spmm decreasing crow": "ops.csr_spmm(T([0, 3, 2]), T([1, 2, 0]), F(3), torch.randn(4, 3, device=D))",
    "csr_spmm x not contiguous": "ops.csr_spmm(T([0, 2, 3]), T([1, 2, 0]), F(3), torch.randn(3, 4, device=D).T)",
    "topk_dot user out of range": "ops.topk_dot(torch.randn(5, 4, device=D), torch.randn(7, 4, device=D), T([0, 9]), "
                                  "T([0] * 6), T([]), 3, 256, 256)",
}
_INLINE_SRC = (
    '#include <torch/extension.h>\n'
    'void text() { TORCH_CHECK(false, "text only"); }\n'
    'void number(int64_t n) { TORCH_CHECK(false, "number ", n); }\n')


def bench_errors(device: str, tiny: bool) -> dict:
    """Each bad-input call in its own process (a crash must not end the step): raised or crashed, on the CPU and
    on `device`; with the full check also a bare load_inline extension formatting an integer in TORCH_CHECK, and the
    libstdc++ the process loads."""
    import subprocess
    import tempfile
    devices = ["cpu"] + ([device] if device != "cpu" else [])
    out, crashed = {}, 0
    for dev in devices:
        for name, call in _ERROR_CASES.items():
            code = ("import torch, mbrec_fast\nops = torch.ops.mbrec_fast\nD = %r\n"
                    "T = lambda v: torch.tensor(v, dtype=torch.long, device=D)\n"
                    "F = lambda n: torch.ones(n, device=D)\n"
                    "try:\n    %s\n    print('no error')\nexcept Exception as e:\n    print('raised')\n" % (dev, call))
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            verdict = r.stdout.strip() if r.returncode == 0 else f"crashed (rc {r.returncode})"
            crashed += r.returncode != 0
            out[f"error {name} ({dev})"] = verdict
    if not tiny:
        with tempfile.TemporaryDirectory() as build:
            code = ("import torch\nfrom torch.utils.cpp_extension import load_inline\n"
                    f"m = load_inline('mbrec_probe', cpp_sources=[{_INLINE_SRC!r}], functions=['text', 'number'], "
                    f"build_directory={build!r})\n"
                    "for f in (m.text, lambda: m.number(5)):\n    try:\n        f()\n    except RuntimeError:\n"
                    "        print('raised', flush=True)\n")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
            out["error load_inline text / number"] = (" / ".join(r.stdout.split()) if r.returncode == 0
                                                      else f"{r.stdout.split()} then crashed (rc {r.returncode})")
        import torch  # noqa: F401  (loads the libstdc++ torch uses)
        maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
        out["libstdcxx_loaded"] = sorted({ln.split()[-1] for ln in maps.splitlines() if "libstdc++" in ln})
    out["errors_crashed"] = crashed
    return out


BENCHES = {"evaluator": bench_evaluator, "sampler": bench_sampler, "experts": bench_experts, "graph": bench_graph,
           "errors": bench_errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default) or cpu; --dry-run implies cpu")
    p.add_argument("--dry-run", action="store_true", help="same steps on the CPU with tiny sizes (no build)")
    p.add_argument("--out", default="gpu_check_report", help="report folder")
    p.add_argument("--steps", nargs="*", help="run only these steps")
    p.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bench", choices=sorted(BENCHES), help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.env:
        print_env(device)
        return 0
    if args.bench:
        figures = BENCHES[args.bench](device, args.tiny)
        pathlib.Path(args.json).write_text(json.dumps(figures))
        print(json.dumps(figures))
        return 0
    report = run_all(device, args.dry_run, pathlib.Path(args.out).resolve(), args.steps)
    print((pathlib.Path(args.out) / "gpu_check.md").read_text())
    return 0 if all(r["status"] == "passed" for r in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
