"""Throughput of ImageClassifier(ResNet-18) on CIFAR-shaped synthetic batches: the cost of the plug-ins.

Measures training images/s (batch 128, 3×32×32, 10 classes, SGD lr 0.1, no momentum/weight decay, fp32 unless
``--precision`` says otherwise) for

* ``sgd``: plain SGD, the baseline;
* ``label_noise``: + LabelNoise(kind="flip", τ = 0.1)                     target: ≤ 2 % slower than sgd;
* ``dynamics``: + DynamicsMonitor on four layers at its default interval
  (every ``log_every_n_steps`` = 50 steps, histograms on)             target: ≤ 5 % slower than sgd;
* ``sam``: the ``sam`` strategy (ρ = 0.05), two passes per step          target: ≤ 2.1 × the sgd step time;
* ``sam_every2``, ``sam_every4``, ``sam_every10`` (only when named in ``--settings``): ``sam`` with
  ``every_n_steps`` = n (SAM on one step in n, plain steps between)   target: ≤ 1.05 (1 + 1/n) × the sgd step time.

Every run has the same TensorBoard logger, no validation, no checkpointing, no progress bar. The clock runs from the
start of step ``--warmup`` to the end of training, with ``torch.cuda.synchronize()`` at both ends. It is wall time,
or with ``--clock cpu`` the CPU time of this process (on a CPU shared with other jobs wall time measures them too;
CPU time with ``--threads 1`` measures the work of the run alone). Each setting runs
``--repeats`` times, interleaved, each repeat in a rotated order; the table reports the best (highest images/s) of the repeats.

    python benchmarks/real_networks.py                  # CUDA: full width, 300 timed steps per run
    python benchmarks/real_networks.py --small          # CPU check: width 1/16, 6 timed steps (ratios meaningless)
    python benchmarks/real_networks.py --json out.json  # also write the numbers
    python benchmarks/real_networks.py --settings sgd sam sam_every2 sam_every4 sam_every10   # SAM every n steps
    python benchmarks/real_networks.py --cpu --clock cpu --threads 1 ...   # on a CPU shared with other jobs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_lnsgd.callbacks import DynamicsMonitor
from lightning_lnsgd.callbacks.label_noise import LabelNoise
from lightning_lnsgd.strategies.sam import SAMStrategy
from lightning_lnsgd.examples.vision import ImageClassifier

SAM_EVERY = {"sam": 1, "sam_every2": 2, "sam_every4": 4, "sam_every10": 10}  # setting -> every_n_steps
SETTINGS = ("sgd", "label_noise", "dynamics", *SAM_EVERY)
DEFAULT_SETTINGS = ("sgd", "label_noise", "dynamics", "sam")  # the every_n_steps ones on request (--settings)
# max step-time ratio vs sgd: SAM every n steps costs one extra pass on one step in n
TARGETS = {"label_noise": 1.02, "dynamics": 1.05, "sam": 2.1}
TARGETS.update({s: 1.05 * (1 + 1 / n) for s, n in SAM_EVERY.items() if n > 1})
LAYERS = ["backbone.conv1", "backbone.layer2.0.conv1", "backbone.layer4.1.conv2", "backbone.fc"]


class Clock(Callback):
    """Time from the start of optimizer step ``warmup`` to the end of training (device synchronised), read from
    ``timer`` (``time.perf_counter``: wall time; ``time.process_time``: this process's CPU time)."""

    def __init__(self, warmup: int, timer=time.perf_counter) -> None:
        self.warmup = warmup
        self.timer = timer
        self.t0: float | None = None
        self.t1: float | None = None
        self.steps = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            self._sync(pl_module)
            self.t0 = self.timer()
            self.start_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.t1 = self.timer()
        self.steps = trainer.global_step - self.start_step


def synthetic_loader(batch_size: int, n_batches: int, pin: bool) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * n_batches, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch_size * n_batches,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True, pin_memory=pin)


def run(setting: str, args: argparse.Namespace, accelerator: str, root: str) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(backbone="resnet18", num_classes=10, input_shape=[3, 32, 32], width=args.width, lr=0.1)
    clock = Clock(args.warmup, time.process_time if args.clock == "cpu" else time.perf_counter)
    callbacks: list[Callback] = [clock]
    strategy: object = "auto"
    if setting == "label_noise":
        callbacks.insert(0, LabelNoise(kind="flip", flip_prob=0.1, num_classes=10, seed=0))
    elif setting == "dynamics":
        callbacks.insert(0, DynamicsMonitor(layers=LAYERS))
    elif setting in SAM_EVERY:
        strategy = SAMStrategy(rho=0.05, every_n_steps=SAM_EVERY[setting])
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        strategy=strategy,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=args.log_every_n_steps,
        logger=TensorBoardLogger(root, name=setting),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        benchmark=accelerator == "gpu",
    )
    loader = synthetic_loader(args.batch_size, args.n_batches, pin=accelerator == "gpu")
    trainer.fit(model, loader)
    assert clock.t0 is not None and clock.t1 is not None and clock.steps > 0
    seconds = clock.t1 - clock.t0
    return {"step_ms": 1000 * seconds / clock.steps, "images_per_s": clock.steps * args.batch_size / seconds}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU smoke run: width 1/16, batch 32, few steps")
    parser.add_argument("--width", type=float, default=None, help="ResNet-18 width multiplier (default 1; --small: 1/16)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (--small: 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 300; --small: 6)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 30; --small: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per setting, interleaved (default 3; --small: 1)")
    parser.add_argument("--log-every-n-steps", type=int, default=50, help="Trainer.log_every_n_steps (DynamicsMonitor interval)")
    parser.add_argument("--precision", default="32-true", help="Trainer precision, e.g. 32-true, bf16-mixed")
    parser.add_argument("--matmul-precision", default=None, choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision (default: leave as is)")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=SETTINGS,
                        help=f"default: {' '.join(DEFAULT_SETTINGS)}")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall time (default) or this process's CPU time (a shared CPU machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    small = args.small
    args.width = args.width if args.width is not None else (1 / 16 if small else 1.0)
    args.batch_size = args.batch_size or (32 if small else 128)
    args.steps = args.steps or (6 if small else 300)
    args.warmup = args.warmup if args.warmup is not None else (2 if small else 30)
    args.repeats = args.repeats or (1 if small else 3)
    args.n_batches = max(4, min(50, args.warmup + args.steps))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    accelerator = "gpu" if torch.cuda.is_available() and not args.cpu else "cpu"
    if accelerator == "cpu" and not small:
        print("note: no CUDA device; CPU numbers at full size are slow and not the targets' setting (use --small)")
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)

    device = torch.cuda.get_device_name(0) if accelerator == "gpu" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}, lightning {pl.__version__}; width {args.width:g}, batch "
          f"{args.batch_size}, {args.steps} timed steps after {args.warmup}, best of {args.repeats}, precision "
          f"{args.precision}, {args.clock} clock")
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in args.settings}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats):
            # Each repeat starts one setting later, so no setting always runs first (or right after SAM).
            for setting in args.settings[r % len(args.settings):] + args.settings[: r % len(args.settings)]:
                res = run(setting, args, accelerator, root)
                runs[setting].append(res)
                print(f"  run {r + 1}/{args.repeats} {setting:12s} {res['images_per_s']:10.1f} img/s  "
                      f"{res['step_ms']:8.2f} ms/step", flush=True)
    best = {s: max(v, key=lambda d: d["images_per_s"]) for s, v in runs.items()}
    base = best.get("sgd")
    print()
    print(f"{'setting':12s} {'img/s':>10s} {'ms/step':>9s} {'× sgd step':>11s} {'target':>8s}  verdict")
    ok = True
    for s, res in best.items():
        ratio = res["step_ms"] / base["step_ms"] if base else float("nan")
        res["ratio"] = ratio
        target = TARGETS.get(s)
        verdict = ""
        if target is not None and base:
            passed = ratio <= target
            ok &= passed
            verdict = "ok" if passed else "OVER"
            if small:
                verdict += " (--small: not meaningful)"
        tgt = f"≤{target:.3g}" if target else "-"
        print(f"{s:12s} {res['images_per_s']:10.1f} {res['step_ms']:9.2f} {ratio:11.3f} {tgt:>8s}  {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "args": vars(args), "best": best, "runs": runs}, f, indent=2)
    return best


if __name__ == "__main__":
    main()
    sys.exit(0)
