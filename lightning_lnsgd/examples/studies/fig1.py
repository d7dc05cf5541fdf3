"""The paper's Fig. 1 on real images, with seeds and 95 % intervals: plain SGD against label-noise SGD and SAM.

``python -m lightning_lnsgd.examples.studies.fig1 --out runs/fig1 --jobs 2``

Settings: plain SGD (constant learning rate, no momentum, no weight decay), the same with every training label
flipped with probability τ to a uniformly drawn other class, fresh at every step (:class:`~lightning_lnsgd.LabelNoise`,
``kind="flip"``), for each τ in ``--taus``, and SAM (the ``sam`` strategy, normalised, radius ``--rho``) on clean
labels; ``--seeds`` seeds each (the seed sets the initialisation, the batch order and the label flips).

Data and network (``--dataset``):

* ``digits`` (default): scikit-learn's digits, the existing fixed split (1,300 train / 497 test images,
  :class:`~lightning_lnsgd.DigitsDataModule`), the MLP backbone (64 → ``--hidden`` → 10), batch 64.
* ``cifar10``: the paper's setting, ResNet-18 on CIFAR-10 (crop and flip augmentation, batch 128, 160 epochs by
  default), read from ``--data-dir`` (see :class:`~lightning_lnsgd.CIFAR10DataModule`; nothing is downloaded).

Per run it records, in percent for accuracies: the test accuracy and loss after the last epoch (``test_acc``,
``test_loss``), the best test accuracy over the epochs (``best_test_acc``), the accuracy on the clean training labels
(``train_acc``; for CIFAR-10 on the training loader's augmented crops and flips), the test accuracy after global
magnitude pruning to each kept fraction (``prune_acc@α``, from :class:`~lightning_lnsgd.PruningCurve`) and the
kernel distance and linearisation gap between the initial and the final network (:class:`~lightning_lnsgd.Laziness`,
on the first 64 / ``--kernel-probe`` test images). It writes
``<out>/summary.csv`` and ``<out>/summary.md`` (mean ± 95 % t-interval over seeds, and paired differences against
plain SGD) and the figure (``--figure``, default ``<out>/figure.png``). Finished runs are skipped, so an interrupted
study resumes; each run's TensorBoard logs are under ``<out>/runs/<setting>/seed_<k>/``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from ... import compat
from ...callbacks import LabelNoise, Laziness, PruningCurve
from ...strategies import SAMStrategy
from ..cifar import CIFAR10DataModule
from ..vision import DigitsDataModule, ImageClassifier
from .runner import Setting, run_study, save_figure, study_parser, summarize, write_tables

__all__ = ["KEPT_FRACTIONS", "main", "run_one", "settings"]

#: Kept fractions of the pruning curve (the paper's Fig. 1c range).
KEPT_FRACTIONS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)
#: Default epochs per dataset (digits: the clean run fits its training set; CIFAR-10: the paper's 160).
EPOCHS = {"digits": 100, "cifar10": 160}


class _EpochCurves(compat.Callback):
    """Records the validation (= test) accuracy and loss after every epoch's validation, and at the end of training
    (before the strategy moves the module off its device) the clean training accuracy and the laziness values."""

    def __init__(self, laziness: Laziness) -> None:
        self.laziness = laziness
        self.acc: list[float] = []
        self.loss: list[float] = []
        self.final: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self.acc.append(float(trainer.callback_metrics["val/acc"]))
        self.loss.append(float(trainer.callback_metrics["val/loss"]))

    @torch.no_grad()
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        for images, labels in trainer.datamodule.train_dataloader():
            images, labels = images.to(pl_module.device), labels.to(pl_module.device)
            correct += int((pl_module(images).argmax(-1) == labels).sum())
            total += labels.numel()
        pl_module.train(was_training)
        self.final["train_acc"] = 100.0 * correct / total
        self.final.update({k: float(v) for k, v in self.laziness.compute(pl_module).items()})


def settings(taus: Sequence[float], rho: float, common: Mapping[str, Any]) -> list[Setting]:
    """Plain SGD (``sgd``), label noise per τ (``noise_tau=<τ>``) and SAM (``sam_rho=<ρ>``), each with ``common``."""
    out = [Setting("sgd", {**common, "tau": 0.0, "rho": 0.0})]
    out += [Setting(f"noise_tau={tau:g}", {**common, "tau": float(tau), "rho": 0.0}) for tau in taus]
    out.append(Setting(f"sam_rho={rho:g}", {**common, "tau": 0.0, "rho": float(rho)}))
    return out


def _datamodule(p: Mapping[str, Any]) -> Any:
    if p["dataset"] == "digits":
        return DigitsDataModule(batch_size=p["batch_size"])
    return CIFAR10DataModule(
        data_dir=p["data_dir"], batch_size=p["batch_size"], augment=True, num_workers=p["num_workers"]
    )


def run_one(params: Mapping[str, Any], seed: int, run_dir: str) -> dict[str, float]:
    """One training of the study (``params`` from :func:`settings`); returns the metrics listed in the module
    docstring. TensorBoard logs go to ``run_dir``."""
    compat.seed_everything(seed, workers=True)
    dm = _datamodule(params)
    if params["dataset"] == "digits":
        model = ImageClassifier(backbone="mlp", hidden=list(params["hidden"]), lr=params["lr"])
    else:
        model = ImageClassifier(backbone="resnet18", width=params["width"], lr=params["lr"])
    laziness = Laziness(probe_size=64, kernel_probe_size=params["kernel_probe"], every_n_steps=params["laziness_every"])
    pruning = PruningCurve(kept_fractions=list(KEPT_FRACTIONS), monitor="val/acc")
    curves = _EpochCurves(laziness)
    callbacks: list[Any] = [laziness, pruning, curves]
    if params["tau"] > 0:
        callbacks.append(LabelNoise(kind="flip", flip_prob=params["tau"], seed=seed))
    trainer = compat.Trainer(
        max_epochs=params["epochs"],
        accelerator=params["accelerator"],
        devices=1,
        strategy=SAMStrategy(rho=params["rho"]) if params["rho"] > 0 else "auto",
        logger=compat.TensorBoardLogger(run_dir, name="", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
    )
    trainer.fit(model, dm)
    metrics = {
        "test_acc": 100.0 * curves.acc[-1],
        "best_test_acc": 100.0 * max(curves.acc),
        "test_loss": curves.loss[-1],
        **curves.final,
    }
    metrics.update({f"prune_acc@{a:g}": 100.0 * v for a, v in pruning.curve.items()})
    return metrics


#: Table columns: metric -> header.
COLUMNS = {
    "test_acc": "test acc (%)",
    "best_test_acc": "best test acc (%)",
    "test_loss": "test loss",
    "train_acc": "train acc (%)",
    **{f"prune_acc@{a:g}": f"acc @ {100 * a:g} % kept" for a in KEPT_FRACTIONS if a < 1},
    "kernel_distance": "kernel distance",
    "linearization_gap": "linearisation gap",
}


def figure(rows: Sequence[Mapping[str, Any]], title: str) -> Any:
    """Four panels from :func:`summarize`'s rows: final and best test accuracy, test loss, the pruning curve and the
    laziness values at the end, each mean ± 95 % interval over seeds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cell = {(r["setting"], r["metric"]): r for r in rows}
    names = list(dict.fromkeys(r["setting"] for r in rows))
    x = list(range(len(names)))

    def get(metric: str) -> tuple[list[float], list[float]]:
        means = [cell[(s, metric)]["mean"] for s in names]
        cis = [0.0 if math.isnan(cell[(s, metric)]["ci"]) else cell[(s, metric)]["ci"] for s in names]
        return means, cis

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    for metric, label, shift in (("test_acc", "final", -0.1), ("best_test_acc", "best", 0.1)):
        m, c = get(metric)
        ax.errorbar([i + shift for i in x], m, yerr=c, fmt="o", capsize=3, label=label)
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    ax = axes[0, 1]
    m, c = get("test_loss")
    ax.errorbar(x, m, yerr=c, fmt="o", capsize=3)
    ax.set_ylabel("test loss (cross-entropy)")
    for ax in (axes[0, 0], axes[0, 1], axes[1, 1]):
        ax.set_xticks(x, names, rotation=20, fontsize=8)
    ax = axes[1, 0]
    alphas = [a for a in KEPT_FRACTIONS if a > 0]
    for s in names:
        m = [cell[(s, f"prune_acc@{a:g}")]["mean"] for a in alphas]
        c = [cell[(s, f"prune_acc@{a:g}")]["ci"] for a in alphas]
        c = [0.0 if math.isnan(v) else v for v in c]
        ax.plot([100 * a for a in alphas], m, "o-", label=s, markersize=3)
        lower, upper = [u - v for u, v in zip(m, c)], [u + v for u, v in zip(m, c)]
        ax.fill_between([100 * a for a in alphas], lower, upper, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("weights kept (%)")
    ax.set_ylabel("test accuracy after pruning (%)")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    laziness = (("kernel_distance", "kernel distance", -0.1), ("linearization_gap", "linearisation gap", 0.1))
    for metric, label, shift in laziness:
        if (names[0], metric) in cell:
            m, c = get(metric)
            ax.errorbar([i + shift for i in x], m, yerr=c, fmt="o", capsize=3, label=label)
    ax.set_ylabel("at the end of training")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """Runs the study (see the module docstring and ``--help``); returns :func:`summarize`'s rows."""
    parser = study_parser(__doc__.splitlines()[0], "runs/fig1")
    # --data as well: the name fig5 takes for the same switch (argparse would call it an ambiguous prefix).
    parser.add_argument("--dataset", "--data", choices=sorted(EPOCHS), default="digits",
                        help="digits (default) or cifar10")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: digits 100, cifar10 160)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="label-flip probabilities")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM radius (default 0.05)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: digits 64, cifar10 128")
    parser.add_argument("--hidden", type=int, nargs="+", default=[512], help="MLP hidden widths (digits)")
    parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 channel multiplier (cifar10)")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (cifar10; default $LNSGD_DATA_DIR, ./data)")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers (cifar10)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (default auto)")
    parser.add_argument("--kernel-probe", type=int, default=8, help="test images for the kernel distance (default 8)")
    args = parser.parse_args(argv)
    # Lightning's per-Trainer banners (devices, seed, tips) would repeat for every run; warnings still show.
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("epochs", "batch_size", "seeds", "jobs", "kernel_probe"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "kernel_probe" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'kernel_probe' else 1}, got {value}")
    if not all(0 < t < 1 for t in args.taus) or not args.rho > 0:
        parser.error(f"--taus must lie in (0, 1) and --rho be > 0, got {args.taus} and {args.rho}")
    digits = args.dataset == "digits"
    epochs = args.epochs or EPOCHS[args.dataset]
    common = {
        "dataset": args.dataset,
        "epochs": epochs,
        "lr": args.lr,
        "batch_size": args.batch_size or (64 if digits else 128),
        "hidden": list(args.hidden) if digits else None,
        "width": None if digits else args.width,
        "data_dir": None if digits else (args.data_dir or os.environ.get("LNSGD_DATA_DIR")),
        "num_workers": 0 if digits else args.num_workers,
        "accelerator": args.accelerator,
        "kernel_probe": args.kernel_probe,
        "laziness_every": 500,
    }
    chosen = settings(args.taus, args.rho, common)
    results = run_study(run_one, chosen, range(args.seeds), args.out, jobs=args.jobs, threads=args.threads)
    rows = summarize(results, baseline="sgd")
    write_tables(rows, Path(args.out) / "summary", digits=3, columns=COLUMNS)
    net = f"MLP 64→{'→'.join(map(str, args.hidden))}→10" if digits else f"ResNet-18 (width {args.width:g})"
    title = f"{args.dataset}, {net}, {epochs} epochs, lr {args.lr:g}; mean ± 95 % CI over {args.seeds} seeds"
    save_figure(figure(rows, title), args.figure or Path(args.out) / "figure.png", dpi=80)
    wall = sum(r.wall_s for r in results)
    print(f"{len(results)} runs, {wall:.0f} s of run time in all; tables: {Path(args.out) / 'summary.md'}")
    return rows


if __name__ == "__main__":
    main()
