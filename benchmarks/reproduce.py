"""Reproduces the paper's synthetic figures from the shipped configs, with the project's own commands.

    python benchmarks/reproduce.py [--out docs/figures] [--runs runs/reproduce]

For every experiment it runs ``python -m lightning_lnsgd fit --config configs/<name>.yaml`` into
``RUNS/<name>``, draws the figure with ``python -m lightning_lnsgd report``, and prints a Markdown
table of the final values of the dynamics tags (the numbers behind docs/reproduction.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (figure name, runs drawn together, extra report arguments)
FIGURES = [
    ("fig2_label_noise_vs_clean", ["label_noise_sgd", "sgd_clean"], []),
    ("fig2_label_noise_1M_steps", ["label_noise_long"], []),
    ("fig4_sam", ["sam", "sam_label_noise", "sgd_clean"], []),
    ("periodic_noise", ["periodic_noise"], []),
    ("oscillation_only", ["oscillation_only"], []),
    ("small_init", ["small_init"], []),
    ("theorem2_sigma", ["sweep_sigma"], ["--escape-vs", "sigma"]),
    ("theorem2_lr", ["sweep_lr"], ["--escape-vs", "lr"]),
]
TAGS = ["train/loss", "test/loss", "dynamics/norm_sq_mean", "dynamics/cosine_mean", "dynamics/lazy_distance",
        "dynamics/theta_error", "phase/escape_step"]


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "reproduce"))
    parser.add_argument("--only", nargs="*", default=None, help="figure names to (re)make")
    parser.add_argument("--reuse", action="store_true", help="redraw from existing runs, fit only the missing ones")
    args = parser.parse_args(argv)
    from lightning_lnsgd.report import load_scalars

    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, float] = {}
    for figure, configs, extra in FIGURES:
        if args.only and figure not in args.only:
            continue
        for config in configs:
            if config not in done:
                run_dir = runs / config
                if args.reuse and run_dir.is_dir():
                    done[config] = float("nan")
                    continue
                subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                done[config] = run([sys.executable, "-m", "lightning_lnsgd", "fit", "--config", f"configs/{config}.yaml",
                                    "--trainer.default_root_dir", str(run_dir)])
                print(f"fit {config}: {done[config]:.1f} s wall", flush=True)
        run([sys.executable, "-m", "lightning_lnsgd", "report", *[str(runs / c) for c in configs],
             "--labels", *configs, "--out", str(out / f"{figure}.png"), *extra])
        print(f"figure {out / (figure + '.png')}", flush=True)

    print("\n| config | wall s | " + " | ".join(TAGS) + " |")
    print("|---|---|" + "---|" * len(TAGS))
    for config, wall in done.items():
        scalars = load_scalars(runs / config)
        cells = []
        for tag in TAGS:
            series = scalars.get(tag)
            cells.append(f"{series[-1][1]:.4g} @ {series[-1][0]}" if series else "–")
        print(f"| {config} | {wall:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
