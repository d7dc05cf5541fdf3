"""The study runner: resumable settings × seeds over worker processes, t-intervals, tables, figure saving."""

import csv
import json
import math
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_lnsgd.examples.studies import (
    RunResult,
    Setting,
    mean_ci,
    run_study,
    save_figure,
    study_parser,
    summarize,
    t_quantile,
    write_tables,
)

# Run functions are module-level so that spawned workers can import them.
def affine(params, seed, run_dir):
    """A deterministic 'training': metrics from the params and seed; leaves a trace of each call in run_dir."""
    Path(run_dir, "trace.txt").write_text(str(os.getpid()))
    return {"acc": params["a"] + 0.1 * seed, "loss": params["a"] * seed}


def fails_on_seed_1(params, seed, run_dir):
    if seed == 1:
        raise RuntimeError("boom")
    time.sleep(0.2)
    return {"acc": float(seed)}


def sleeps(params, seed, run_dir):
    Path(params["pids"], f"{os.getpid()}").write_text("")
    time.sleep(60)
    return {"acc": 0.0}


def terminates_parent(params, seed, run_dir):
    Path(params["pids"], f"{os.getpid()}").write_text("")
    while len(list(Path(params["pids"]).glob("[0-9]*"))) < 2:
        time.sleep(0.01)
    if seed == 0:
        os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(60)
    return {"acc": 0.0}


SETTINGS = [Setting("base", {"a": 1.0}), Setting("other", {"a": 2.0})]
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("p", [0.9, 0.975, 0.995])
def test_t_quantile_matches_scipy(p, df):
    stats = pytest.importorskip("scipy.stats")
    assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-6)


def test_mean_ci_is_the_student_t_interval():
    values = [0.91, 0.95, 0.93, 0.97, 0.92]
    mean, half = mean_ci(values)
    # Table value t_{0.975, 4} = 2.776 (any statistics textbook).
    assert mean == pytest.approx(statistics.mean(values))
    assert half == pytest.approx(2.776 * statistics.stdev(values) / math.sqrt(5), rel=1e-3)
    assert math.isnan(mean_ci([1.0])[1])


def test_run_study_runs_each_pair_once_and_resumes(tmp_path):
    results = run_study(affine, SETTINGS, [0, 1], tmp_path, log=None)
    assert [(r.setting, r.seed, r.metrics["acc"]) for r in results] == [
        ("base", 0, 1.0), ("base", 1, 1.1), ("other", 0, 2.0), ("other", 1, 2.1)
    ]
    record = json.loads((tmp_path / "runs/other/seed_1/result.json").read_text())
    assert record["params"] == {"a": 2.0} and record["metrics"] == {"acc": 2.1, "loss": 2.0}
    # An interrupted run: its directory exists without result.json, and a stale file in it.
    (tmp_path / "runs/base/seed_1/result.json").unlink()
    (tmp_path / "runs/base/seed_1/stale").write_text("")
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed_*/trace.txt")}
    again = run_study(affine, SETTINGS, [0, 1, 2], tmp_path, log=None)
    assert [r.metrics for r in again if r.seed < 2] == [r.metrics for r in results]
    rerun = {p for p in stamps if not p.exists() or p.stat().st_mtime_ns != stamps[p]}
    assert rerun == {tmp_path / "runs/base/seed_1/trace.txt"}  # only the unfinished one ran again...
    assert not (tmp_path / "runs/base/seed_1/stale").exists()  # ...from a clean directory
    assert sorted((r.setting, r.seed) for r in again) == [(s, k) for s in ("base", "other") for k in range(3)]


def test_run_study_refuses_changed_params_and_bad_arguments(tmp_path):
    run_study(affine, SETTINGS[:1], [0], tmp_path, log=None)
    with pytest.raises(ValueError, match="params"):
        run_study(affine, [Setting("base", {"a": 3.0})], [0], tmp_path, log=None)
    with pytest.raises(ValueError, match="jobs"):
        run_study(affine, SETTINGS, [0], tmp_path, jobs=0)
    with pytest.raises(ValueError, match="distinct"):
        run_study(affine, SETTINGS + SETTINGS[:1], [0], tmp_path)
    with pytest.raises(ValueError, match="name"):
        Setting("a/b")


def test_two_workers_give_the_same_results_in_two_processes(tmp_path):
    one = run_study(affine, SETTINGS, [0, 1], tmp_path / "one", log=None)
    two = run_study(affine, SETTINGS, [0, 1], tmp_path / "two", jobs=2, log=None)
    assert [(r.setting, r.seed, r.metrics) for r in one] == [(r.setting, r.seed, r.metrics) for r in two]
    pids = {p.read_text() for p in (tmp_path / "two").glob("runs/*/seed_*/trace.txt")}
    assert str(os.getpid()) not in pids and len(pids) >= 1


def test_a_failing_run_stops_the_workers_and_keeps_finished_runs(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        run_study(fails_on_seed_1, SETTINGS, [0, 1, 2], tmp_path, jobs=2, log=None)
    assert multiprocessing.active_children() == []
    for path in tmp_path.glob("runs/*/seed_*/result.json"):
        assert json.loads(path.read_text())["seed"] != 1


def test_sigterm_to_the_study_ends_its_workers(tmp_path):
    # Seed 0 signals the study's process as `kill` would, while seed 1 sleeps in the other worker.
    with pytest.raises(KeyboardInterrupt):
        setting = Setting("s", {"pids": str(tmp_path)})
        run_study(terminates_parent, [setting], [0, 1], tmp_path / "out", jobs=2, log=None)
    assert multiprocessing.active_children() == []
    workers = [int(p.name) for p in tmp_path.glob("[0-9]*")]
    assert len(workers) == 2 and not any(_alive(pid) for pid in workers)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_end_when_the_study_is_killed_outright(tmp_path):
    code = (
        "from tests.examples.studies.test_runner import sleeps\n"
        "from lightning_lnsgd.examples.studies import Setting, run_study\n"
        f"run_study(sleeps, [Setting('s', {{'pids': {str(tmp_path)!r}}})], [0, 1], {str(tmp_path / 'out')!r}, jobs=2)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("[0-9]*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(p.name) for p in tmp_path.glob("[0-9]*")]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2 and not any(_alive(pid) for pid in workers)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_summarize_pairs_by_seed_against_the_baseline():
    results = [
        RunResult("base", 0, {"acc": 0.90}, 1.0),
        RunResult("base", 1, {"acc": 0.80}, 1.0),
        RunResult("base", 2, {"acc": 0.85}, 1.0),
        RunResult("noise", 0, {"acc": 0.92}, 1.0),
        RunResult("noise", 1, {"acc": 0.83}, 1.0),
        RunResult("noise", 2, {"acc": 0.86}, 1.0),
        RunResult("noise", 3, {"acc": 0.99}, 1.0),  # no baseline partner: not paired
    ]
    rows = {r["setting"]: r for r in summarize(results, baseline="base")}
    diffs = [0.02, 0.03, 0.01]
    sd = statistics.stdev(diffs)
    assert rows["noise"]["n"] == 4 and rows["noise"]["n_pairs"] == 3
    assert rows["noise"]["mean"] == pytest.approx(statistics.mean([0.92, 0.83, 0.86, 0.99]))
    assert rows["noise"]["diff"] == pytest.approx(0.02)
    assert rows["noise"]["diff_ci"] == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-3)  # t_{0.975, 2} = 4.303
    assert rows["base"]["diff"] == 0.0
    with pytest.raises(ValueError, match="baseline"):
        summarize(results, baseline="missing")


def test_write_tables_round_trips_the_csv_and_formats_the_markdown(tmp_path):
    results = [
        RunResult(name, k, {"acc": a + k / 100, "loss": 1.0}, 1.0)
        for name, a in (("base", 0.9), ("noise", 0.95))
        for k in range(3)
    ]
    rows = summarize(results, baseline="base")
    csv_path, md_path = write_tables(rows, tmp_path / "t" / "summary", digits=3, columns={"acc": "test accuracy"})
    with open(csv_path) as f:
        back = list(csv.DictReader(f))
    assert [(r["setting"], r["metric"]) for r in back] == [(r["setting"], r["metric"]) for r in rows]
    assert [float(r["mean"]) for r in back] == pytest.approx([r["mean"] for r in rows])
    md = md_path.read_text()
    half = 4.303 * 0.01 / math.sqrt(3)
    assert "| setting | seeds | test accuracy |" in md and "loss" not in md
    assert f"| noise | 3 | {0.96:.3f} ± {half:.3f} |" in md
    assert f"| noise | 3 | {0.05:.3f} ± 0.000 |" in md  # the paired difference: the same shift on every seed


def test_save_figure_writes_a_small_png_and_refuses_high_dpi(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "sub" / "f.png", dpi=50)
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width <= 4 * 50 + 10 and height <= 3 * 50 + 10  # tight bounding box: at most the figure
    assert fig.number not in plt.get_fignums()  # closed
    with pytest.raises(ValueError, match="dpi"):
        save_figure(plt.figure(), tmp_path / "g.png", dpi=200)


def test_study_parser_defaults():
    args = study_parser("demo", "runs/demo").parse_args([])
    assert (args.out, args.jobs, args.seeds, args.threads, args.figure) == ("runs/demo", 1, 5, None, None)
    args = study_parser("demo", "runs/demo", seeds=3).parse_args(["--jobs", "2", "--seeds", "10"])
    assert (args.jobs, args.seeds) == (2, 10)
