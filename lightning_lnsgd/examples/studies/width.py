"""Width study: the laziness metrics against lazy-training theory.

A tanh MLP in the NTK parameterisation (two hidden layers of width m) and its :class:`~lightning_lnsgd.Linearized`
twin are trained by the same full-batch gradient descent (squared error on one-hot targets, fixed learning rate and
step budget) on the same fixed image subset, for widths m from 64 to 2048. At the end it measures, on held-out
images x*:

* ``lin_distance``: ‖f_T(x*) − f_T^lin(x*)‖ / ‖f_T^lin(x*) − f_0(x*)‖, how far the network ended from its trained
  linearisation (Lee et al. 2019 bound ‖f_t − f_t^lin‖ by O(m^-1/2));
* ``kernel_change``: ‖K_T − K_0‖_F / ‖K_0‖_F, the relative change of the empirical NTK on ``kernel_examples`` test
  images (also O(m^-1/2));
* ``linearization_gap``: the first-order residual at θ_T (:func:`~lightning_lnsgd.metrics.functional.laziness.linearization_gap`).

Each seed gives a log–log slope per metric against m; the table reports their mean ± 95 % interval over seeds.

    python -m lightning_lnsgd.examples.studies.width --out runs/width --jobs 2 --figure docs/figures/width_laziness.png
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ...metrics.functional.laziness import empirical_ntk, linearization_gap, relative_kernel_change
from .kernel_regime import add_regime_arguments, gd_step, image_subset, loglog_slope, ntk_mlp_pair
from .runner import RunResult, Setting, mean_ci, mean_ci_text, run_study, save_figure, study_parser

__all__ = ["METRICS", "main", "run_width", "slopes"]

#: The measured quantities, in table order.
METRICS = ("lin_distance", "kernel_change", "linearization_gap")


def run_width(params: Mapping[str, Any], seed: int, run_dir: str) -> dict[str, float]:
    """One width and seed: GD on the network and on its linearisation; the metrics at the last step."""
    data = image_subset(params["data"], params["n_train"], params["n_test"], seed=params["data_seed"])
    net, lin = ntk_mlp_pair(data.x.shape[1:], 10, params["width"], params["depth"], seed=seed)
    params0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    xk = data.x_test[: params["kernel_examples"]]
    with torch.no_grad():
        f0 = net(data.x_test)
    K0 = empirical_ntk(net, xk)
    for _ in range(params["steps"]):
        loss = gd_step(net, data.x, data.y, params["lr"])
        gd_step(lin, data.x, data.y, params["lr"])
    with torch.no_grad():
        f, f_lin = net(data.x_test), lin(data.x_test)
    return {
        "lin_distance": float((f - f_lin).norm() / (f_lin - f0).norm()),
        "kernel_change": float(relative_kernel_change(K0, empirical_ntk(net, xk))),
        "linearization_gap": float(linearization_gap(net, params0, data.x_test)),
        "train_loss": loss,
    }


def slopes(results: Sequence[RunResult], widths: Mapping[str, int]) -> dict[str, list[float]]:
    """Per metric, the log–log slope against the width of each seed (seeds that ran every width)."""
    by_seed: dict[int, dict[int, Mapping[str, float]]] = {}
    for r in results:
        by_seed.setdefault(r.seed, {})[widths[r.setting]] = r.metrics
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    for runs in by_seed.values():
        if len(runs) == len(widths):
            ms = sorted(runs)
            for metric in METRICS:
                out[metric].append(loglog_slope(ms, [runs[m][metric] for m in ms]))
    return out


def _figure(results: Sequence[RunResult], widths: Mapping[str, int], fitted: Mapping[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, metric, title in zip(axes, METRICS[:2], ("‖f − f_lin‖ / ‖f_lin − f₀‖ (test)", "‖K_T − K₀‖_F / ‖K₀‖_F")):
        ms = sorted(set(widths.values()))
        for r in results:
            ax.scatter(widths[r.setting], r.metrics[metric], s=10, color="C0", alpha=0.6)
        means = [math.exp(sum(math.log(r.metrics[metric]) for r in results if widths[r.setting] == m)
                          / sum(1 for r in results if widths[r.setting] == m)) for m in ms]
        slope, ci = mean_ci(fitted[metric])
        ax.plot(ms, means, "-o", color="C0", ms=3, label=f"slope {mean_ci_text(slope, ci, '.2f')}")
        ax.plot(ms, [means[0] * (m / ms[0]) ** -0.5 for m in ms], "--", color="grey", label="m^-1/2")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width m")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, tuple[float, float]]:
    parser = study_parser("Width study: linearisation gap and kernel change against the width", "runs/width", seeds=3)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048],
                        help="hidden widths m (default 64 ... 2048, doubling)")
    add_regime_arguments(parser)
    args = parser.parse_args(argv)
    if len(args.widths) < 2 or min(args.widths) < 1:
        parser.error(f"--widths needs at least two widths >= 1, got {args.widths}")
    common = dict(data="digits", depth=args.depth, steps=args.steps, lr=args.lr, n_train=args.n_train,
                  n_test=args.n_test, kernel_examples=args.kernel_examples, data_seed=args.data_seed)
    settings = [Setting(f"m{m}", {**common, "width": m}) for m in args.widths]
    widths = {s.name: s.params["width"] for s in settings}
    # One torch thread per run by default: these small matrix products only lose to OpenMP contention on shared cores.
    threads = args.threads or 1
    torch.set_num_threads(threads)
    results = run_study(run_width, settings, range(args.seeds), args.out, jobs=args.jobs, threads=threads)
    fitted = slopes(results, widths)
    summary = {metric: mean_ci(values) for metric, values in fitted.items()}
    out = Path(args.out)
    lines = [f"Log–log slopes against the width over {len(fitted[METRICS[0]])} seeds (mean ± 95 % t-interval):", ""]
    lines += ["| metric | log–log slope |", "|---|---|"]
    lines += [f"| {metric} | {mean_ci_text(mean, ci, '.3f')} |" for metric, (mean, ci) in summary.items()]
    lines += ["", "| width | " + " | ".join(METRICS) + " | train_loss |", "|---|" + "---|" * (len(METRICS) + 1)]
    for s in settings:
        cells = [mean_ci([r.metrics[m] for r in results if r.setting == s.name]) for m in (*METRICS, "train_loss")]
        lines.append(f"| {widths[s.name]} | " + " | ".join(mean_ci_text(a, b, ".4g", ".2g") for a, b in cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "slopes.json").write_text(json.dumps({k: {"per_seed": v, "mean": summary[k][0], "ci": summary[k][1]}
                                                 for k, v in fitted.items()}, indent=1))
    with open(out / "results.csv", "w") as f:
        f.write("width,seed," + ",".join((*METRICS, "train_loss")) + "\n")
        for r in results:
            f.write(f"{widths[r.setting]},{r.seed}," + ",".join(f"{r.metrics[m]:.6g}" for m in (*METRICS, "train_loss")) + "\n")
    _figure(results, widths, fitted, Path(args.figure) if args.figure else out / "figure.png")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
