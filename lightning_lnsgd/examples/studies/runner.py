"""The shared study runner: settings × seeds, resumable, over worker processes, with mean ± 95 % t-intervals.

A *study* is a list of :class:`Setting` (a name and the parameters of one configuration) and a list of seeds. Each
(setting, seed) pair is one *run*: a call ``fn(params, seed, run_dir)`` of a module-level function (so that worker
processes can import it) that trains, evaluates and returns a flat ``{metric: float}`` dict. The function may build
a Trainer in Python or call the CLI, e.g. ``lightning_lnsgd.cli.main([..., f"--seed_everything={seed}"])`` and read
``cli.trainer.callback_metrics``; it should write its logs under ``run_dir``.

* :func:`run_study` runs every pair whose ``result.json`` is not there yet (so an interrupted study resumes where it
  stopped; a run cut short is started again from scratch), in-process for ``jobs=1`` or over ``jobs`` worker
  processes, which are terminated when a run fails, on Ctrl-C and on SIGTERM (and, on Linux, when the study's
  process is killed outright). Layout:
  ``<out>/runs/<setting>/seed_<seed>/result.json`` (``{"setting", "seed", "params", "metrics", "wall_s"}``).
* :func:`summarize` aggregates the results per setting and metric: mean and the half-width of the 95 % Student-t
  interval over seeds, and, against a ``baseline`` setting, the same for the paired (same-seed) differences.
* :func:`write_tables` writes that summary as ``<stem>.csv`` (one row per setting and metric) and ``<stem>.md``
  (one row per setting, one column per metric; then the paired differences).
* :func:`study_parser` is the argparse preamble every study shares (``--out``, ``--jobs``, ``--seeds``,
  ``--threads``, ``--figure``); :func:`save_figure` saves a matplotlib figure as a small PNG (dpi ≤ 100) and
  closes it.

Example (``my_study.py``)::

    def train(params, seed, run_dir):
        ...
        return {"test_acc": acc, "test_loss": loss}

    args = study_parser("my study", "runs/my_study").parse_args()
    settings = [Setting("sgd", {"tau": 0.0}), Setting("noise", {"tau": 0.2})]
    results = run_study(train, settings, range(args.seeds), args.out, jobs=args.jobs, threads=args.threads)
    write_tables(summarize(results, baseline="sgd"), Path(args.out) / "summary")
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ...stats import t_quantile

__all__ = [
    "RunResult",
    "Setting",
    "mean_ci",
    "mean_ci_text",
    "run_study",
    "save_figure",
    "study_parser",
    "summarize",
    "t_quantile",
    "write_tables",
]

RunFn = Callable[[Mapping[str, Any], int, str], Mapping[str, float]]


@dataclass(frozen=True)
class Setting:
    """One configuration of a study: ``name`` (a directory name: letters, digits, ``._-=``) and the ``params``
    handed to the run function (JSON-serialisable; a resumed study checks that they did not change)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or any(not (c.isalnum() or c in "._-=") for c in self.name):
            raise ValueError(f"Setting: `name` must be non-empty letters, digits or ._-=, got {self.name!r}.")


@dataclass(frozen=True)
class RunResult:
    """What one run returned: its setting's name, seed, metrics ``{name: float}`` and wall time in seconds."""

    setting: str
    seed: int
    metrics: Mapping[str, float]
    wall_s: float


# ------------------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------------------
def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of ``values`` and the half-width of its two-sided ``level`` Student-t interval (NaN for one value).

    >>> m, h = mean_ci([1.0, 2.0, 3.0])
    >>> m, round(h, 4)  # 4.3027 · 1 / √3
    (2.0, 2.4841)
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


def summarize(
    results: Iterable[RunResult], baseline: Optional[str] = None, level: float = 0.95
) -> list[dict[str, Any]]:
    """One row per (setting, metric), settings and metrics in first-seen order: ``setting``, ``metric``, ``n``,
    ``mean``, ``ci`` (half-width of the ``level`` t-interval); with ``baseline`` (a setting name) also
    ``diff``/``diff_ci``/``n_pairs``: mean and half-width of (setting − baseline) over the seeds both ran, and
    ``baseline``."""
    by: dict[str, dict[int, Mapping[str, float]]] = {}
    metrics: dict[str, None] = {}
    for r in results:
        by.setdefault(r.setting, {})[r.seed] = r.metrics
        metrics.update(dict.fromkeys(r.metrics))
    if baseline is not None and baseline not in by:
        raise ValueError(f"summarize: `baseline` {baseline!r} is not among the settings {sorted(by)}.")
    rows: list[dict[str, Any]] = []
    for setting, seeds in by.items():
        for metric in metrics:
            values = [float(m[metric]) for m in seeds.values() if metric in m]
            mean, ci = mean_ci(values, level)
            row: dict[str, Any] = {"setting": setting, "metric": metric, "n": len(values), "mean": mean, "ci": ci}
            if baseline is not None:
                base = by[baseline]
                pairs = [
                    float(seeds[s][metric]) - float(base[s][metric])
                    for s in seeds
                    if s in base and metric in seeds[s] and metric in base[s]
                ]
                row["diff"], row["diff_ci"] = mean_ci(pairs, level)
                row["n_pairs"], row["baseline"] = len(pairs), baseline
            rows.append(row)
    return rows


def mean_ci_text(mean: float, ci: float, spec: str, ci_spec: Optional[str] = None) -> str:
    """``mean ± ci`` formatted with the format specs ``spec`` (and ``ci_spec``, default ``spec``); the mean alone when
    ``ci`` is NaN (one seed), nothing when ``mean`` is NaN.

    >>> mean_ci_text(0.12345, 0.01, ".3f"), mean_ci_text(0.12345, math.nan, ".3f"), mean_ci_text(math.nan, 1, ".3f")
    ('0.123 ± 0.010', '0.123', '')
    """
    if math.isnan(mean):
        return ""
    return f"{mean:{spec}}" if math.isnan(ci) else f"{mean:{spec}} ± {ci:{ci_spec or spec}}"


def _cell(mean: float, ci: float, digits: int) -> str:
    return mean_ci_text(mean, ci, f".{digits}f")


def write_tables(
    rows: Sequence[Mapping[str, Any]],
    stem: str | os.PathLike,
    digits: int = 4,
    columns: Optional[Mapping[str, str]] = None,
) -> tuple[Path, Path]:
    """Writes :func:`summarize`'s rows as ``<stem>.csv`` and ``<stem>.md``; returns both paths.

    The markdown has one row per setting and a column per metric (``columns``: ``{metric: header}`` picks and
    names them; default every metric under its own name), each cell ``mean ± ci`` with ``digits`` decimals; when
    the rows carry paired differences, a second table gives ``diff ± diff_ci`` for every setting but the baseline."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = ["setting", "metric", "n", "mean", "ci", "diff", "diff_ci", "n_pairs", "baseline"]
    keys = [k for k in keys if any(k in r for r in rows)]
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in keys} for r in rows)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    metrics = list(columns) if columns is not None else list(dict.fromkeys(r["metric"] for r in rows))
    headers = [columns[m] for m in metrics] if columns is not None else metrics
    cell = {(r["setting"], r["metric"]): r for r in rows}
    n = {s: max((r["n"] for r in rows if r["setting"] == s), default=0) for s in settings}

    def table(key: str, ci_key: str, only: Sequence[str]) -> list[str]:
        lines = ["| setting | seeds | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(metrics)]
        for s in only:
            values = [cell.get((s, m), {}) for m in metrics]
            cells = [_cell(float(v.get(key, math.nan)), float(v.get(ci_key, math.nan)), digits) for v in values]
            lines.append(f"| {s} | {n[s]} | " + " | ".join(cells) + " |")
        return lines

    lines = [f"Mean ± half-width of the 95 % t-interval over seeds ({stem.name}).", ""]
    lines += table("mean", "ci", settings)
    if "baseline" in keys:
        base = next(r["baseline"] for r in rows if "baseline" in r)
        lines += ["", f"Paired differences against {base} (same seeds):", ""]
        lines += table("diff", "diff_ci", [s for s in settings if s != base])
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ------------------------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------------------------
def _run_dir(out: Path, setting: Setting, seed: int) -> Path:
    return out / "runs" / setting.name / f"seed_{seed}"


def _load(path: Path, setting: Setting) -> RunResult:
    data = json.loads(path.read_text())
    if data["params"] != json.loads(json.dumps(dict(setting.params))):
        raise ValueError(
            f"run_study: {path} was run with params {data['params']}, not {dict(setting.params)}; use another `out`."
        )
    return RunResult(data["setting"], int(data["seed"]), data["metrics"], float(data["wall_s"]))


def _execute(task: tuple[RunFn, Setting, int, str]) -> RunResult:
    """Runs one (setting, seed) in a clean ``run_dir`` and writes its ``result.json`` atomically."""
    fn, setting, seed, run_dir = task
    path = Path(run_dir)
    if path.exists():  # a run cut short: start it again from scratch
        shutil.rmtree(path)
    path.mkdir(parents=True)
    start = time.perf_counter()
    metrics = {str(k): float(v) for k, v in fn(setting.params, seed, str(path)).items()}
    wall = time.perf_counter() - start
    record = {"setting": setting.name, "seed": seed, "params": dict(setting.params), "metrics": metrics, "wall_s": wall}
    tmp = path / "result.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path / "result.json")
    return RunResult(setting.name, seed, metrics, wall)


def _init_worker(threads: Optional[int]) -> None:
    # The parent handles Ctrl-C and terminates the pool. A spawned worker's torch reads the thread count from the
    # environment when first imported; a forked one has torch already.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        # A parent killed outright (SIGKILL, OOM killer) cannot terminate the pool: have the kernel send SIGTERM.
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def _context() -> Any:
    """Fork where the platform has it (a worker starts in milliseconds, with the parent's imports), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the parent for the block (main thread only), so the pool is cleaned up."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_study(
    fn: RunFn,
    settings: Sequence[Setting],
    seeds: Iterable[int],
    out: str | os.PathLike,
    jobs: int = 1,
    threads: Optional[int] = None,
    log: Optional[Callable[[str], None]] = functools.partial(print, flush=True),
) -> list[RunResult]:
    """Runs ``fn(setting.params, seed, run_dir)`` for every setting and seed not finished under ``out``; returns
    every result (finished earlier or now), settings in the given order, then seeds.

    Args:
        fn: a module-level function (picklable) returning ``{metric: float}``.
        settings: the configurations (distinct names).
        seeds: the seeds (each setting runs each seed).
        out: the study directory.
        jobs: worker processes (1: in this process), reused from run to run. They are forked where the platform
            can (Linux), else spawned; the parent must not have initialised CUDA before (a forked child cannot use
            it), so a run function should touch the GPU only inside the run.
        threads: torch threads per worker (``OMP_NUM_THREADS``; ``None``: ``cpu_count // jobs`` when ``jobs > 1``,
            else torch's default).
        log: called with one line per finished run (``None``: silent).
    """
    if jobs < 1:
        raise ValueError(f"run_study: `jobs` must be >= 1, got {jobs}.")
    names = [s.name for s in settings]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"run_study: `settings` must be non-empty with distinct names, got {names}.")
    seeds = list(seeds)
    out = Path(out)
    done: dict[tuple[str, int], RunResult] = {}
    todo: list[tuple[RunFn, Setting, int, str]] = []
    for setting in settings:
        for seed in seeds:
            run_dir = _run_dir(out, setting, seed)
            if (run_dir / "result.json").exists():
                done[(setting.name, seed)] = _load(run_dir / "result.json", setting)
            else:
                todo.append((fn, setting, seed, str(run_dir)))
    if log is not None:
        log(f"{len(done)} of {len(done) + len(todo)} runs already finished under {out}; {len(todo)} to run.")

    def finished(result: RunResult) -> None:
        done[(result.setting, result.seed)] = result
        if log is not None:
            log(f"[{len(done)}/{len(names) * len(seeds)}] {result.setting} seed {result.seed}: {result.wall_s:.1f} s")

    if jobs == 1 or len(todo) <= 1:
        for task in todo:
            finished(_execute(task))
    elif todo:
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // jobs)
        pool = _context().Pool(min(jobs, len(todo)), _init_worker, (threads,))
        try:
            with _sigterm_as_interrupt():
                for result in pool.imap_unordered(_execute, todo):
                    finished(result)
        except BaseException:
            pool.terminate()
            pool.join()
            raise
        pool.close()
        pool.join()
    return [done[(s.name, seed)] for s in settings for seed in seeds]


# ------------------------------------------------------------------------------------------------------------------
# Shared study preamble and figure saving
# ------------------------------------------------------------------------------------------------------------------
def study_parser(description: str, out: str, seeds: int = 5) -> argparse.ArgumentParser:
    """The arguments every study takes: ``--out`` (study directory; default ``out``), ``--jobs`` (worker
    processes, default 1), ``--seeds`` (seeds 0..N−1; default ``seeds``; raising it later adds seeds without
    redoing the others), ``--threads`` (torch threads per worker) and ``--figure`` (PNG path; default
    ``<out>/figure.png``). Studies add their own arguments to the parser returned."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=out, help=f"study directory (default {out}); finished runs are skipped")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--seeds", type=int, default=seeds, help=f"seeds 0..N-1 per setting (default {seeds})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores / jobs)")
    parser.add_argument("--figure", default=None, help="where to save the figure (default <out>/figure.png)")
    return parser


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Saves a matplotlib ``figure`` as a PNG at ``dpi`` (≤ 100, so that figures stay small enough to commit),
    creating the parent directory, and closes it; returns the path."""
    if not 1 <= dpi <= 100:
        raise ValueError(f"save_figure: `dpi` must be in [1, 100], got {dpi}.")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, dpi=dpi, format="png", bbox_inches="tight")
    finally:
        plt.close(figure)
    return path
