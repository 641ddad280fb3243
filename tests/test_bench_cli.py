"""`mbrec-fast bench` report building: ratios against mbrec_fast per (op, case), table and plot."""
from mbrec_fast.bench import format_report, plot, summarize


def _report():
    def bench(impl, case, median, **extra):
        return {"name": f"{impl}-{case}", "group": "g", "stats": {"median": median},
                "extra_info": {"op": "evaluator", "case": case, "impl": impl, "threads": 2, **extra}}
    return {"benchmarks": [bench("mbrec_fast", "a", 0.5, users_per_s=10.0), bench("dense", "a", 2.0),
                           bench("faiss", "a", 1.0), bench("dense", "b", 3.0)]}


def test_ratios_are_baseline_over_ours():
    rows = {(r["case"], r["impl"]): r for r in summarize(_report())}
    assert rows[("a", "dense")]["x_slower_than_ours"] == 4.0
    assert rows[("a", "faiss")]["x_slower_than_ours"] == 2.0
    assert rows[("a", "mbrec_fast")]["x_slower_than_ours"] == 1.0
    assert rows[("b", "dense")]["x_slower_than_ours"] is None  # no mbrec_fast run in that case
    assert rows[("a", "mbrec_fast")]["extra"] == {"users_per_s": 10.0}  # env facts are not figures


def test_ratio_by_rate_when_a_baseline_runs_a_slice_of_the_case():
    def bench(impl, median, rows):
        return {"name": impl, "group": "g", "stats": {"median": median},
                "extra_info": {"op": "sampler", "case": "c", "impl": impl, "rows": rows,
                               "neg_per_s": rows / median}}
    # the slow baseline drew 1/10 of the rows in 2x the time: 20x slower per negative, not 2x
    rows = {r["impl"]: r for r in summarize({"benchmarks": [bench("mbrec_fast", 0.1, 1000),
                                                            bench("python_sets", 0.2, 100)]})}
    assert abs(rows["python_sets"]["x_slower_than_ours"] - 20.0) < 1e-9
    assert rows["mbrec_fast"]["x_slower_than_ours"] == 1.0


def test_table_and_plot(tmp_path):
    rows = summarize(_report())
    text = format_report(rows)
    assert "[evaluator] a" in text and "4.00x ours" in text
    plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_report_of_an_existing_json(tmp_path, capsys):
    import json

    import pytest

    from mbrec_fast.bench import main
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_report()))
    assert main(["--report", str(path)]) == 0
    assert "4.00x ours" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--report"):
        main(["--report", str(tmp_path / "missing.json")])
