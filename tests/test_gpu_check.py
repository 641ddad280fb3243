"""The one-command GPU check's plumbing: its dry run (the same steps on the CPU with tiny sizes) passes every
step and writes the markdown + JSON report; a failing or hanging step is recorded and the next one runs."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_report(tmp_path):
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert (out / "gpu_check.md").is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {r["step"]: r for r in report["steps"]}
    assert list(steps) == ["env", "build", "tests_gpu", "tests_device", "bench_evaluator", "bench_sampler",
                           "bench_experts", "bench_graph", "probe_errors"]
    failed = {name: r["status"] + "\n" + r["output_tail"] for name, r in steps.items() if r["status"] != "passed"}
    assert not failed, failed
    assert res.returncode == 0
    assert report["dry_run"] and report["device"] == "cpu"
    for key in ("evaluator_users_per_s", "evaluator_frac_fp32_gemm", "sampler_negatives_per_s",
                "experts_fwd_bwd_x_loop"):
        assert report["figures"][key] > 0, key
    assert "| tests_device | passed |" in (out / "gpu_check.md").read_text()


def test_gpu_check_records_a_failing_step_and_goes_on(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gpu_check, "step_commands", lambda device, dry, out: {
        "env": ([sys.executable, "-c", "import sys; sys.exit(3)"], {}),
        "build": ([sys.executable, "-c", "import time; time.sleep(30)"], {}),
        "tests_gpu": ([sys.executable, "-c", "print('1 passed')"], {})})
    monkeypatch.setitem(gpu_check.STEP_LIMITS, "build", 1)
    report = gpu_check.run_all("cpu", True, tmp_path)
    status = {r["step"]: r["status"] for r in report["steps"]}
    assert status == {"env": "failed (rc 3)", "build": "timeout (1 s)", "tests_gpu": "passed"}
    assert "## build: timeout" in (tmp_path / "gpu_check.md").read_text()
