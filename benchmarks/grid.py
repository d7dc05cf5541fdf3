"""The 1,024-replica phase-diagram grid as one job: its speed against the numba kernel alone, its peak memory and its
start-up, in one command.

    python benchmarks/grid.py                 # 2 rounds: 10k of the kernel, 10k and 30k steps of the job
    python benchmarks/grid.py --rounds 1 --short 2000 --long 6000 --kernel-steps 2000   # quicker

* **Kernel alone**: :func:`lightning_lnsgd.twolayer.kernels.run_steps` (numba) on the grid's 1,024 replicas (m = 1000,
  d = 20, batch 1, float32), samples and noisy targets drawn up front, in calls of ``--chunk`` steps (the job's
  ``steps_per_batch``); best of ``--repeat``. Also with all the weights' statistics every 100 steps (what a logging
  step reads), and with the escape check alone every 100 steps on replicas that stay in the lazy ball (what the job
  asks between two logging steps of a replica that has not escaped; in the shipped grid some never do).
* **The job**: ``python -m lightning_lnsgd fit --config configs/phase_diagram.yaml`` in a fresh process at two lengths
  (``--short``, ``--long`` SGD steps, into a temporary folder): the marginal rate R·(long − short)/(t_long − t_short)
  leaves out start-up, compilation and the end-of-fit work. Each round times the kernel alone right before its job
  pair, so that its ratio compares the two under the same machine speed. Peak RSS is the job process's own high-water
  mark (``VmHWM``; checkpoints included: the config writes one every 20k steps and at the end).
* **Start-up**: parsing (``run=False``) of ``configs/phase_diagram.yaml`` (1,024 replicas) and of
  ``configs/sweep_sigma.yaml`` (16), each in a fresh process, wall seconds including the imports.

Prints one table; a round's ratio is the job's marginal replica-steps/s over the kernel's. The machine is shared: run it
when it is quiet, or read the figures as those of the load it ran under (printed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kernels import best_of, paper_problem  # noqa: E402

from lightning_lnsgd.twolayer.kernels import prepare, run_steps  # noqa: E402
from lightning_lnsgd.twolayer.recorder import ESCAPE_RESOLUTION  # noqa: E402

CONFIG = ROOT / "configs" / "phase_diagram.yaml"
SMALL = ROOT / "configs" / "sweep_sigma.yaml"
R = 8 * 8 * 16

# The peak is the process's VmHWM: ``ru_maxrss`` of a forked-then-exec'd child starts at its parent's resident set
# at the fork (Linux keeps the larger of the two across exec), which here holds the kernel benchmark's arrays.
CHILD = """
import resource, sys, time
t = time.perf_counter()
from lightning_lnsgd.cli import main
main({args!r}, run={run})
try:
    kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except OSError:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH", time.perf_counter() - t, kb)
"""


def child(args: list[str], run: bool = True) -> tuple[float, float]:
    """Runs the CLI on ``args`` in a fresh process; returns (wall seconds, peak RSS in MB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", CHILD.format(args=args, run=run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"grid benchmark: {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    _, seconds, kb = lines[-1].split()
    return float(seconds), float(kb) / 1024


def job(steps: int, root: str) -> tuple[float, float]:
    return child(["fit", "--config", str(CONFIG), "--trainer.max_steps", str(steps), "--trainer.default_root_dir",
                  os.path.join(root, f"s{steps}")])


def kernel(steps: int, chunk: int, repeat: int, checks: int = 0, escape_only: bool = False) -> float:
    """Replica-steps/s of the numba kernel alone on R replicas; with ``checks``, also reducing the weights every
    ``checks`` steps (all the statistics, as at a logging step), or with ``escape_only`` asking only the escape check
    there (what the job asks between two logging steps of a replica that has not escaped), with η = 1e-4, at which
    the replicas stay in the lazy ball (T₁ ∝ 1/η²: about 300k steps); the arithmetic of a step does not depend on η."""
    W, a, x, y = paper_problem(R, chunk)
    prepare("numba", W.dtype, False)
    lr = torch.full((R,), 1e-4 if escape_only else 1e-3)
    calls = max(1, steps // chunk)
    snaps = list(range(checks, chunk + 1, checks)) if checks else None
    against = (W.clone(), torch.ones(W.shape[-1]) / W.shape[-1] ** 0.5) if checks else None
    needed = torch.full((len(snaps), R), 2, dtype=torch.uint8) if checks and escape_only else None
    track = torch.zeros(R, dtype=torch.int64)
    inside_sq = (1 - 1e-6) / W.shape[-2]
    seconds = best_of(lambda: [run_steps(W, a, x, y, lr, backend="numba", snapshots=snaps, stats_against=against,
                                         stats_needed=needed, track=track, inside_sq=inside_sq)
                               for _ in range(calls)], repeat)
    return R * calls * chunk / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=10_000, help="SGD steps of the short job")
    parser.add_argument("--long", type=int, default=30_000, help="SGD steps of the long job")
    parser.add_argument("--kernel-steps", type=int, default=10_000, help="SGD steps of the kernel alone")
    parser.add_argument("--chunk", type=int, default=2000, help="steps per kernel call (the config's steps_per_batch)")
    parser.add_argument("--repeat", type=int, default=2, help="kernel timings: best of this many")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of (kernel alone, short job, long job), each giving its own ratio")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    rows: list[tuple[str, str]] = []
    ratios = []
    with tempfile.TemporaryDirectory() as root:
        # The machine's speed drifts over minutes: each ratio compares a kernel timing and the job pair run right
        # after it.
        for i in range(1, args.rounds + 1):
            rate_kernel = kernel(args.kernel_steps, args.chunk, args.repeat)
            t_short, rss_short = job(args.short, os.path.join(root, f"round{i}"))
            t_long, rss_long = job(args.long, os.path.join(root, f"round{i}"))
            rate_job = R * (args.long - args.short) / (t_long - t_short)
            ratios.append(rate_job / rate_kernel)
            rows += [
                (f"round {i}: kernel alone, replica-steps/s", f"{rate_kernel:,.0f}"),
                (f"round {i}: job {args.short:,} / {args.long:,} steps, wall s", f"{t_short:.1f} / {t_long:.1f}"),
                (f"round {i}: job marginal, replica-steps/s", f"{rate_job:,.0f}"),
                (f"round {i}: ratio job / kernel (target >= 0.7)", f"{ratios[-1]:.2f}"),
                (f"round {i}: peak RSS of the job, MB", f"{rss_short:.0f} / {rss_long:.0f}"),
            ]
    rate_checked = kernel(args.kernel_steps, args.chunk, args.repeat, checks=ESCAPE_RESOLUTION)
    rate_escape = kernel(args.kernel_steps, args.chunk, args.repeat, checks=ESCAPE_RESOLUTION, escape_only=True)
    parse_grid, _ = child(["--config", str(CONFIG)], run=False)
    parse_small, _ = child(["--config", str(SMALL)], run=False)
    rows += [
        (f"kernel + weight statistics every {ESCAPE_RESOLUTION} steps", f"{rate_checked:,.0f}"),
        (f"kernel + escape check every {ESCAPE_RESOLUTION} steps (lazy)", f"{rate_escape:,.0f}"),
        ("parse phase_diagram.yaml (1,024 replicas), s", f"{parse_grid:.1f}"),
        ("parse sweep_sigma.yaml (16 replicas), s", f"{parse_small:.1f}"),
    ]
    width = max(len(what) for what, _ in rows)
    print(f"{'what':<{width}} {'value':>15}")
    for what, value in rows:
        print(f"{what:<{width}} {value:>15}")
    print(f"ratio job / kernel, the rounds' mean: {sum(ratios) / len(ratios):.2f} (min {min(ratios):.2f})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
