"""The paper's Fig. 5 on real images: does gradient descent track the network's linearisation while SAM and label
noise leave it?

A wide tanh MLP in the NTK parameterisation (two hidden layers of 512) is trained on a fixed subset of 64 images
(digits by default, ``--data cifar10`` for CIFAR-10 files under ``--data-dir``) by full-batch training on the
squared error to one-hot targets (:class:`~lightning_lnsgd.ImageClassifier` with ``loss="mse"``, fit by Lightning):

* ``gd``: gradient descent;
* ``sam_rho0.5``, ``sam_rho2``: full-batch SAM (the ``sam`` strategy, :class:`~lightning_lnsgd.SAMStrategy`);
* ``label_noise``: gradient descent with :class:`~lightning_lnsgd.LabelNoise` flips (τ = 0.2, fresh every step);
* ``lin``: the network's first-order Taylor model (:class:`~lightning_lnsgd.Linearized`) by gradient descent.

Every run starts from the same weights for a seed and logs (TensorBoard, under its run directory) the laziness
metrics (:class:`~lightning_lnsgd.Laziness` on 64 test images); every ``--record-every`` steps it keeps the clean
training loss, the test loss and the test outputs. The distance of a run to the linearised model is
‖f(x*) − f_lin(x*)‖ / ‖f_lin(x*) − f₀(x*)‖ on the test images x*, against the ``lin`` run of the same seed.

    python -m lightning_lnsgd.examples.studies.fig5 --out runs/fig5 --jobs 2 --figure docs/figures/fig5_digits.png
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from ...callbacks import LabelNoise, Laziness
from ...callbacks._common import log_scalars
from ...compat import Callback, TensorBoardLogger, Trainer
from ...strategies.sam import SAMStrategy
from ..vision import ImageClassifier, squared_error
from .kernel_regime import add_regime_arguments, image_subset, ntk_mlp_pair
from .runner import RunResult, Setting, mean_ci, run_study, save_figure, study_parser, summarize, write_tables

__all__ = ["SETTINGS", "TestOutputs", "main", "run_fig5"]

#: The settings: name -> how the run differs from plain gradient descent.
SETTINGS: dict[str, dict[str, Any]] = {
    "gd": {},
    "sam_rho0.5": {"rho": 0.5},
    "sam_rho2": {"rho": 2.0},
    "label_noise": {"flip_prob": 0.2},
    "lin": {"linearize": True},
}


class TestOutputs(Callback):
    """Keeps, at step 0 and every ``every`` SGD steps, the clean training loss, the test loss and the test outputs
    (in eval mode), and logs the two losses as ``fig5/train_loss_clean`` and ``fig5/test_loss``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, every: int) -> None:
        self.x, self.y, self.x_test, self.y_test, self.every = x, y, x_test, y_test, every
        self.steps: list[int] = []
        self.train_loss: list[float] = []
        self.test_loss: list[float] = []
        self.outputs: list[torch.Tensor] = []

    def _record(self, trainer: Any, module: Any) -> None:
        if trainer.global_step in self.steps:
            return
        was = module.training
        module.eval()
        with torch.no_grad():
            f, f_test = module(self.x), module(self.x_test)
        module.train(was)
        self.steps.append(trainer.global_step)
        self.train_loss.append(float(squared_error(f, self.y)))
        self.test_loss.append(float(squared_error(f_test, self.y_test)))
        self.outputs.append(f_test.detach().cpu())
        log_scalars(trainer, {"fig5/train_loss_clean": self.train_loss[-1], "fig5/test_loss": self.test_loss[-1]},
                    trainer.global_step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self._record(trainer, pl_module)


def run_fig5(params: Mapping[str, Any], seed: int, run_dir: str) -> dict[str, float]:
    """One setting and seed: the Lightning fit, then ``outputs.pt`` (the recorded curves) in ``run_dir``."""
    data = image_subset(params["data"], params["n_train"], params["n_test"], params["data_seed"], params["data_dir"])
    net, lin = ntk_mlp_pair(data.x.shape[1:], 10, params["width"], params["depth"], seed=seed)
    model = ImageClassifier(backbone=lin if params.get("linearize") else net, num_classes=10, loss="mse", lr=params["lr"])
    record = TestOutputs(data.x, data.y, data.x_test, data.y_test, params["record_every"])
    lazy = Laziness(probe=data.x_test[:64], kernel_probe_size=params["kernel_examples"], every_n_steps=params["record_every"])
    callbacks: list[Any] = [record, lazy]
    if "flip_prob" in params:
        callbacks.append(LabelNoise(kind="flip", flip_prob=params["flip_prob"], num_classes=10, seed=seed))
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=params["steps"], check_val_every_n_epoch=params["record_every"],
        num_sanity_val_steps=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=params["record_every"],
        logger=TensorBoardLogger(run_dir, name="", version=""), callbacks=callbacks,
        strategy=SAMStrategy(rho=params["rho"]) if "rho" in params else "auto",
    )
    # One epoch is one full-batch step; validation (val/loss, val/acc) runs on the test images every record_every.
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=len(data.y))
    trainer.fit(model, loader, DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=len(data.y_test)))
    torch.save({"steps": record.steps, "outputs": torch.stack(record.outputs), "train_loss": record.train_loss,
                "test_loss": record.test_loss}, Path(run_dir) / "outputs.pt")
    acc = float((record.outputs[-1].argmax(-1) == data.y_test).float().mean())
    return {"train_loss": record.train_loss[-1], "test_loss": record.test_loss[-1], "test_acc": acc,
            **{k.split("/")[1]: v for k, v in lazy.last.items()}}


def distances_to_lin(out: Path, names: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[int, list[float]]]:
    """``{setting: {seed: [distance to the lin run at each recorded step]}}``, step 0 excluded (0/0)."""
    def load(name: str, seed: int) -> dict[str, Any]:
        return torch.load(out / "runs" / name / f"seed_{seed}" / "outputs.pt")

    result: dict[str, dict[int, list[float]]] = {}
    for seed in seeds:
        ref = load("lin", seed)["outputs"]
        moved = (ref[1:] - ref[0]).flatten(1).norm(dim=1)
        for name in names:
            f = load(name, seed)["outputs"]
            result.setdefault(name, {})[seed] = ((f[1:] - ref[1:]).flatten(1).norm(dim=1) / moved).tolist()
    return result


def _figure(out: Path, names: Sequence[str], seeds: Sequence[int], dist: Mapping[str, Mapping[int, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = torch.load(out / "runs" / "lin" / f"seed_{seeds[0]}" / "outputs.pt")["steps"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for i, name in enumerate(names):
        curves = {
            "distance to f_lin (test)": (steps[1:], [dist[name][s] for s in seeds]),
            "test loss": (steps, [torch.load(out / "runs" / name / f"seed_{s}" / "outputs.pt")["test_loss"] for s in seeds]),
            "train loss (clean labels)": (steps, [torch.load(out / "runs" / name / f"seed_{s}" / "outputs.pt")["train_loss"] for s in seeds]),
        }
        for ax, (title, (xs, per_seed)) in zip(axes, curves.items()):
            stats = [mean_ci([c[j] for c in per_seed]) for j in range(len(xs))]
            mean = [m for m, _ in stats]
            half = [0.0 if math.isnan(h) else h for _, h in stats]
            ax.plot(xs, mean, color=f"C{i}", label=name)
            ax.fill_between(xs, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], color=f"C{i}", alpha=0.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    parser = study_parser("Fig. 5 on real images: GD, SAM and label noise against the linearised model", "runs/fig5", seeds=3)
    # --dataset as well: the name fig1 takes for the same switch.
    parser.add_argument("--data", "--dataset", choices=["digits", "cifar10"], default="digits",
                        help="digits (default) or cifar10")
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 folder (cifar10; no download; default $LNSGD_DATA_DIR, ./data)")
    parser.add_argument("--width", type=int, default=512, help="hidden width (default %(default)s)")
    add_regime_arguments(parser)
    parser.add_argument("--record-every", type=int, default=20,
                        help="steps between recorded test outputs and metrics (default %(default)s)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="which settings to run (lin is always run: the others are measured against it)")
    args = parser.parse_args(argv)
    names = list(dict.fromkeys([*args.settings, "lin"]))
    common = dict(data=args.data, data_dir=args.data_dir, width=args.width, depth=args.depth, steps=args.steps, lr=args.lr,
                  n_train=args.n_train, n_test=args.n_test, kernel_examples=args.kernel_examples,
                  record_every=args.record_every, data_seed=args.data_seed)
    settings = [Setting(name, {**common, **SETTINGS[name]}) for name in names]
    # One torch thread per run by default: these small matrix products only lose to OpenMP contention on shared cores.
    threads = args.threads or 1
    torch.set_num_threads(threads)
    seeds = list(range(args.seeds))
    results = run_study(run_fig5, settings, seeds, args.out, jobs=args.jobs, threads=threads)
    out = Path(args.out)
    dist = distances_to_lin(out, names, seeds)
    results = [RunResult(r.setting, r.seed, {"dist_to_lin": dist[r.setting][r.seed][-1], **r.metrics}, r.wall_s)
               for r in results]
    rows = summarize(results, baseline="gd" if "gd" in names else None)
    write_tables(rows, out / "summary")
    (out / "distances.json").write_text(json.dumps(dist))
    _figure(out, names, seeds, dist, Path(args.figure) if args.figure else out / "figure.png")
    print((out / "summary.md").read_text())
    return rows


if __name__ == "__main__":
    main()
