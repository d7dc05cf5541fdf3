"""Tests of lightning_lnsgd.callbacks.label_noise.LabelNoise, with each installed Lightning package."""

from __future__ import annotations

import collections
import csv
import functools
import importlib
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lightning_lnsgd import compat
from lightning_lnsgd.callbacks.label_noise import LabelNoise
from lightning_lnsgd.protocol import StepLayout
from lightning_lnsgd.rng import CounterRNG, replica_stream
from tests.conftest import make_trainer

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- helpers


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj) if not hasattr(obj, "_fields") else type(obj)(*map(_clone, obj))
    return obj


@functools.cache
def _classes(package: str) -> SimpleNamespace:
    """The test modules, built on the LightningModule / DataModule / Callback of ``package``."""
    pkg = compat.package(package)

    class Recorder(pkg.LightningModule):
        """Records what training_step / validation_step receive; ``label_of(batch)`` finds the label."""

        def __init__(self, label_of=lambda b: b[-1], x_of=lambda b: b[0]) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)
            self.label_of, self.x_of = label_of, x_of
            self.train_seen: list = []  # (global_step, batch as received)
            self.train_ids: list = []  # id() of the batch object training_step received
            self.val_seen: list = []

        def training_step(self, batch, batch_idx):
            y = self.label_of(batch)
            self.train_ids.append(id(batch))
            self.train_seen.append((self.trainer.global_step, _clone(batch)))
            x = self.x_of(batch).float().reshape(len(y), -1)[:, :1]
            return ((self.lin(x).squeeze(-1) - y.float().reshape(len(y), -1).mean(-1)) ** 2).mean()

        def validation_step(self, batch, batch_idx):
            self.val_seen.append(_clone(batch))

        test_step = validation_step

        def predict_step(self, batch, batch_idx):
            self.val_seen.append(_clone(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class IndexedData(pkg.LightningDataModule):
        def __init__(self, n=24, b=4):
            super().__init__()
            self.y = torch.arange(n, dtype=torch.float32) * 10
            self.ds = TensorDataset(torch.randn(n, 1), self.y, torch.arange(n))
            self.b = b

        def train_dataloader(self):
            return DataLoader(self.ds, batch_size=self.b, shuffle=False)

    class Probe(pkg.Callback):
        """Records the id of the batch in the training hooks, and calls ``check()`` after each step."""

        def __init__(self, check=lambda: None) -> None:
            self.start_ids, self.end_ids, self.check = [], [], check

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start_ids.append(id(batch))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.end_ids.append(id(batch))
            self.check()

    boring = importlib.import_module(f"{package}.demos.boring_classes")

    class BoringRegression(boring.BoringModel):
        """Lightning's demo BoringModel (a Linear(32, 2)) trained on regression targets ``(x, y)``, y of shape (B, 2)."""

        def __init__(self) -> None:
            super().__init__()
            self.x = torch.randn(64, 32)
            self.y = torch.randn(64, 2)
            self.seen: list = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append((batch_idx, y.clone()))
            return torch.nn.functional.mse_loss(self(x), y)

        def train_dataloader(self):
            return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    class Classifier(pkg.LightningModule):
        """A linear classifier of ``num_classes`` classes on a fixed dataset, recording the labels it trains on."""

        def __init__(self, num_classes: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(3, num_classes)
            self.x = torch.randn(256, 3)
            self.y = torch.arange(256) % num_classes
            self.seen: list = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(y.clone())
            if y.is_floating_point():  # regression labels put in by a test
                return torch.nn.functional.mse_loss(self.net(x)[:, 0], y)
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def train_dataloader(self):
            return DataLoader(TensorDataset(self.x, self.y), batch_size=64)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return SimpleNamespace(
        Recorder=Recorder, IndexedData=IndexedData, Probe=Probe, BoringRegression=BoringRegression,
        Classifier=Classifier, pkg=pkg,
    )


def _fake_trainer(module=None, step: int = 0, rank: int = 0):
    """Just what ``LabelNoise.noisy_batch`` reads from a trainer."""
    return SimpleNamespace(lightning_module=module, global_step=step, global_rank=rank)


# ---------------------------------------------------------------------------------------------- the mechanism


def test_training_step_receives_the_batch_object_of_the_hooks(lightning):
    # LabelNoise relies on Lightning handing on_train_batch_start and training_step the same batch object: if a
    # release stops doing so, this fails (and the noise would silently not reach training_step).
    c = _classes(lightning.__name__)
    model, probe = c.Recorder(), c.Probe()
    data = TensorDataset(torch.zeros(16, 1), torch.zeros(16))
    make_trainer(lightning, max_steps=3, callbacks=[LabelNoise(sigma=1.0), probe]).fit(model, DataLoader(data, batch_size=4))
    assert len(model.train_ids) == 3
    assert probe.start_ids == model.train_ids == probe.end_ids
    assert all(torch.equal(b[1].abs(), torch.ones(4)) for _, b in model.train_seen), "the noise did not reach training_step"


def test_layouts_through_a_trainer(lightning):
    c = _classes(lightning.__name__)
    data = [{"x": torch.randn(4, 1), "y": torch.zeros(4)} for _ in range(3)]
    model = c.Recorder(label_of=lambda b: b["y"], x_of=lambda b: b["x"])
    trainer = make_trainer(lightning, max_steps=3, callbacks=[LabelNoise(sigma=3.0)])
    trainer.fit(model, DataLoader(data, batch_size=None))
    for _, b in model.train_seen:
        assert set(b) == {"x", "y"} and torch.equal(b["y"].abs(), torch.full((4,), 3.0))
    assert all(torch.equal(d["y"], torch.zeros(4)) for d in data)


# ---------------------------------------------------------------------------------------------- dataset safety


class SliceDataset(Dataset):
    """Returns batches as *views* of stored tensors (a custom sampler hands out slices), or the stored tensors."""

    def __init__(self, x, y, whole: bool = False, as_dict: bool = False, as_pair: bool = False):
        self.x, self.y, self.whole, self.as_dict, self.as_pair = x, y, whole, as_dict, as_pair
        self.stored = {"x": x, "y": y}

    def __len__(self):
        return 4

    def __getitem__(self, s):
        if self.whole:  # the dataset's own tensor objects themselves
            return self.stored if self.as_dict else (self.x, self.y)
        if self.as_pair:  # a namedtuple: it reaches the hooks as a tuple, the label a view of the stored tensor
            return Pair(self.x[s], self.y[s])
        return {"x": self.x[s], "y": self.y[s]} if self.as_dict else (self.x[s], self.y[s])


class SliceSampler(Sampler):
    def __init__(self, n, b):
        self.n, self.b = n, b

    def __iter__(self):
        return iter(slice(i, i + self.b) for i in range(0, self.n, self.b))

    def __len__(self):
        return math.ceil(self.n / self.b)


Pair = collections.namedtuple("Pair", ["x", "y"])


@pytest.mark.parametrize("kind", ["rademacher", "flip"])
@pytest.mark.parametrize("whole,as_dict", [(False, False), (False, True), (True, False), (True, True)])
def test_dataset_unchanged_with_view_batches(lightning, kind, whole, as_dict):
    n = 16
    x = torch.randn(n, 1)
    y = torch.randint(0, 5, (n,)) if kind == "flip" else torch.randn(n)
    x0, y0 = x.clone(), y.clone()
    ds = SliceDataset(x, y, whole=whole, as_dict=as_dict)
    # batch_size=None: no collation, the DataLoader hands out what the dataset returns (views, or the
    # stored objects); on CPU, moving to the device is a no-op, so the module sees those very tensors.
    loader = DataLoader(ds, batch_size=None, sampler=SliceSampler(n, 4))
    read = (lambda b: b["y"]) if as_dict else (lambda b: b[1])
    c = _classes(lightning.__name__)
    model = c.Recorder(label_of=read, x_of=(lambda b: b["x"]) if as_dict else (lambda b: b[0]))
    noise = LabelNoise(kind=kind, sigma=1.0, flip_prob=0.5, num_classes=5)
    make_trainer(lightning, max_steps=4, callbacks=[noise]).fit(model, loader)
    assert torch.equal(x, x0) and torch.equal(y, y0), "the dataset was modified"
    assert ds.stored["y"] is y and torch.equal(ds.stored["y"], y0)
    clean = [y0 if whole else y0[4 * i : 4 * i + 4] for i in range(4)]
    changed = sum(int((read(b) != clean[i]).sum()) for i, (_, b) in enumerate(model.train_seen))
    assert changed > 0, "no noise reached training_step"


def test_label_written_in_place_is_restored_after_every_step(lightning):
    # A namedtuple batch has no mutable container, so the noise goes into the label tensor itself, here a view of
    # the dataset's tensor: the dataset holds the noisy labels during the step and the clean ones after it.
    n = 16
    x, y = torch.randn(n, 1), torch.randn(n)
    y0 = y.clone()
    c = _classes(lightning.__name__)
    during = []
    model = c.Recorder(label_of=lambda b: b.y, x_of=lambda b: b.x)
    model.on_train_batch_end = lambda *a: during.append(y.clone())  # the module's hook runs after the callbacks'
    after = []
    probe = c.Probe(check=lambda: after.append(torch.equal(y, y0)))  # after LabelNoise's on_train_batch_end
    loader = DataLoader(SliceDataset(x, y, as_pair=True), batch_size=None, sampler=SliceSampler(n, 4))
    make_trainer(lightning, max_steps=4, callbacks=[LabelNoise(sigma=2.0, seed=5), probe]).fit(model, loader)
    assert after == [True] * 4, "the dataset still held noisy labels after a step"
    assert torch.equal(y, y0)
    eps = 2.0 * CounterRNG(5, "label_noise").rademacher((4,), n=4)
    for i, (_, b) in enumerate(model.train_seen):
        assert type(b) is Pair
        assert torch.equal(b.y, y0[4 * i : 4 * i + 4] + eps[i])
    assert all(torch.equal(d, y0) for d in during)  # the module's own on_train_batch_end already sees clean labels


def test_in_place_label_sharing_storage_is_refused(lightning):
    # x and y are columns of one tensor: writing noise into y in place would be visible through x's storage.
    data = torch.randn(8, 2)

    class Columns(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            rows = data[4 * i : 4 * i + 4]
            return Pair(rows[:, :1], rows[:, 1])

    c = _classes(lightning.__name__)
    before = data.clone()
    trainer = make_trainer(lightning, max_steps=2, callbacks=[LabelNoise(sigma=1.0)])
    with pytest.raises(ValueError, match=r"batch\[1\].*shares its storage with another tensor of the batch"):
        trainer.fit(c.Recorder(label_of=lambda b: b.y, x_of=lambda b: b.x), DataLoader(Columns(), batch_size=None))
    assert torch.equal(data, before)


def test_restored_after_an_exception_and_a_skipped_batch(lightning):
    n = 16
    x, y = torch.randn(n, 1), torch.randn(n)
    y0 = y.clone()
    c = _classes(lightning.__name__)

    def loader():
        return DataLoader(SliceDataset(x, y, as_pair=True), batch_size=None, sampler=SliceSampler(n, 4))

    # training_step raises while the dataset holds the noisy labels: on_exception restores them.
    model = c.Recorder(label_of=lambda b: b.y, x_of=lambda b: b.x)

    def boom(batch, batch_idx):
        assert not torch.equal(y, y0)  # the noise is in the dataset's storage right now
        raise RuntimeError("boom")

    model.training_step = boom
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(lightning, max_steps=2, callbacks=[LabelNoise(sigma=1.0)]).fit(model, loader())
    assert torch.equal(y, y0)
    # The module's on_train_batch_start returns -1 (skip the rest of the epoch): on_train_batch_end never runs.
    model = c.Recorder(label_of=lambda b: b.y, x_of=lambda b: b.x)
    model.on_train_batch_start = lambda batch, batch_idx: -1 if batch_idx == 1 else None
    noise = LabelNoise(sigma=1.0)
    make_trainer(lightning, max_epochs=1, callbacks=[noise]).fit(model, loader())
    assert len(model.train_seen) == 1 and noise.counter == 2
    assert torch.equal(y, y0)


# ---------------------------------------------------------------------------------------------- any model


def test_boring_model_regression_targets(lightning):
    c = _classes(lightning.__name__)
    model = c.BoringRegression()
    y0 = model.y.clone()
    noise = LabelNoise(kind="gaussian", sigma=0.5, seed=2)
    make_trainer(lightning, max_steps=4, callbacks=[noise]).fit(model)
    assert torch.equal(model.y, y0)
    want = 0.5 * CounterRNG(2, "label_noise").normal((8, 2), n=4)
    for i, (batch_idx, seen) in enumerate(model.seen):
        torch.testing.assert_close(seen - y0[8 * batch_idx : 8 * batch_idx + 8], want[i], rtol=0, atol=1e-6)


def test_classifier_flip_rate(lightning):
    c = _classes(lightning.__name__)
    model = c.Classifier(num_classes=4)
    noise = LabelNoise(kind="flip", flip_prob=0.25, seed=1)  # num_classes from the module's hyperparameters
    make_trainer(lightning, max_epochs=2, callbacks=[noise]).fit(model)
    assert noise.num_classes == 4 and noise.counter == 8
    seen = torch.stack(model.seen)  # 8 steps x 64 labels
    clean = (torch.arange(256) % 4).view(4, 64).repeat(2, 1)
    flipped = seen != clean
    assert torch.equal(model.y, torch.arange(256) % 4)
    assert ((seen >= 0) & (seen < 4)).all()
    assert abs(flipped.float().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / flipped.numel())


def test_lightning_cli_class_path(lightning, tmp_path):
    pytest.importorskip("jsonargparse")
    cli_module = importlib.import_module(f"{lightning.__name__}.cli")
    c = _classes(lightning.__name__)
    cli = cli_module.LightningCLI(
        c.BoringRegression,
        args=[
            "fit", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.callbacks+=lightning_lnsgd.LabelNoise", "--trainer.callbacks.init_args.sigma=2.0",
            "--trainer.callbacks.init_args.seed=3",
        ],
        save_config_callback=None,
    )
    assert isinstance(cli.trainer, lightning.Trainer)
    (noise,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LabelNoise)]
    assert noise.sigma == 2.0 and noise.seed == 3 and noise.counter == 3
    eps = 2.0 * CounterRNG(3, "label_noise").rademacher((8, 2), n=3)
    for i, (batch_idx, seen) in enumerate(cli.model.seen):
        torch.testing.assert_close(seen - cli.model.y[8 * batch_idx : 8 * batch_idx + 8], eps[i], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- kinds


LAYOUTS = [
    # (batch, target, how to read the label, layout name)
    ((torch.arange(6.0).reshape(3, 2), torch.tensor([1.0, 2.0, 3.0])), None, lambda b: b[1], "tuple"),
    ({"x": torch.zeros(3, 2), "out": torch.tensor([1.0, 2.0, 3.0])}, "out", lambda b: b["out"], "dict custom key"),
    ([torch.zeros(3, 2), {"y": torch.tensor([1.0, 2.0, 3.0])}], None, lambda b: b[1]["y"], "list-dict"),
]


@pytest.mark.parametrize("batch,target,read,name", LAYOUTS, ids=[row[-1] for row in LAYOUTS])
def test_noisy_batch_returns_a_copy(batch, target, read, name):
    before = _clone(batch)
    out = LabelNoise(kind="rademacher", sigma=0.5, target=target).noisy_batch(batch, _fake_trainer())
    assert type(out) is type(batch)
    noise = read(out) - read(batch)
    assert torch.equal(noise.abs(), torch.full_like(noise, 0.5)), name
    assert read(batch) is not read(out) and torch.equal(read(batch), read(before))


def test_flip_rate_and_uniform_over_other_classes():
    c, tau, n = 5, 0.3, 200_000
    y = torch.arange(n) % c
    cb = LabelNoise(target=0, kind="flip", flip_prob=tau, num_classes=c, seed=3)
    (noisy,) = cb.noisy_batch((y,), _fake_trainer())
    assert noisy.dtype == y.dtype
    mask = noisy != y
    rate = mask.float().mean().item()
    assert abs(rate - tau) < 5 * math.sqrt(tau * (1 - tau) / n)
    # The new class is uniform over the other c-1 classes: offset (noisy - y) mod c uniform on {1..c-1}.
    offsets = torch.remainder(noisy[mask] - y[mask], c)
    counts = torch.bincount(offsets, minlength=c).float()
    assert counts[0] == 0
    expected = mask.sum() / (c - 1)
    chi2 = (((counts[1:] - expected) ** 2) / expected).sum().item()
    assert chi2 < 25.0  # chi-square with 4 dof: P(> 25) ~ 5e-5
    for cls in range(c):  # per original class as well
        sel = mask & (y == cls)
        got = torch.bincount(noisy[sel], minlength=c).float()
        assert got[cls] == 0 and (got.sum() - got).min() > 0
        others = got[torch.arange(c) != cls]
        assert ((others - others.mean()).abs() < 5 * others.mean().sqrt()).all()
    # The draw: high 32 bits decide the flip, low 32 bits the offset, from CounterRNG(seed, "label_noise").
    z = CounterRNG(3, "label_noise").bits((n,))
    want_mask = ((z >> 32) & 0xFFFFFFFF).to(torch.float64) * 2.0**-32 < tau
    assert torch.equal(mask, want_mask)
    # Fresh every step: the next batch flips other positions.
    (noisy2,) = cb.noisy_batch((y,), _fake_trainer(step=1))
    assert not torch.equal(noisy2, noisy)


def test_flip_extremes():
    y = torch.arange(1000) % 3
    (same,) = LabelNoise(target=0, kind="flip", flip_prob=0.0, num_classes=3).noisy_batch((y,), _fake_trainer())
    assert torch.equal(same, y)
    (all_,) = LabelNoise(target=0, kind="flip", flip_prob=1.0, num_classes=3).noisy_batch((y,), _fake_trainer())
    assert (all_ != y).all() and ((all_ >= 0) & (all_ < 3)).all()


def test_rademacher_exactly_pm_sigma_and_gaussian_moments():
    y = torch.arange(-50.0, 50.0).repeat(100)  # integer-valued floats: y ± 4 is exact
    cb = LabelNoise(target=0, kind="rademacher", sigma=4.0)
    (noisy,) = cb.noisy_batch((y,), _fake_trainer())
    eps = noisy - y
    assert set(eps.unique().tolist()) == {-4.0, 4.0}
    assert abs((eps > 0).float().mean().item() - 0.5) < 0.02
    y2 = torch.zeros(4, 3, 2, dtype=torch.float64)  # any shape, any float dtype
    (n2,) = cb.noisy_batch((y2,), _fake_trainer())
    assert n2.dtype == torch.float64 and n2.shape == y2.shape and set(n2.abs().unique().tolist()) == {4.0}
    g = LabelNoise(target=0, kind="gaussian", sigma=2.0)
    (ng,) = g.noisy_batch((torch.zeros(100_000),), _fake_trainer())
    assert abs(ng.mean().item()) < 0.03 and abs(ng.std().item() - 2.0) < 0.03
    assert torch.equal(ng, 2.0 * CounterRNG(0, "label_noise").normal((100_000,)))


def test_same_seed_same_noise_other_seed_other_noise():
    y = torch.zeros(64)

    def run(seed, steps=3):
        cb = LabelNoise(target=0, sigma=1.0, seed=seed)
        return torch.stack([cb.noisy_batch((y,), _fake_trainer(step=s))[0] for s in range(steps)])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    # The draw is CounterRNG(seed, "label_noise", rank): one draw per step.
    assert torch.equal(run(5), CounterRNG(5, "label_noise", 0).rademacher((64,), n=3))


# ---------------------------------------------------------------------------------------------- schedules


def test_level_at_and_schedule_factor():
    const = LabelNoise(target=0, sigma=2.0)
    assert [const.level_at(s) for s in (0, 1, 10**6)] == [2.0, 2.0, 2.0]
    win = LabelNoise(target=0, sigma=2.0, start_step=3, stop_step=6)
    assert [win.level_at(s) for s in range(8)] == [0, 0, 0, 2, 2, 2, 0, 0]
    per = LabelNoise(target=0, kind="flip", flip_prob=0.2, num_classes=3, schedule="periodic", start_step=2, period_on=3, period_off=2)
    assert [per.level_at(s) for s in range(8)] == [0, 0, 0.2, 0.2, 0.2, 0, 0, 0.2]
    assert per.level_name == "flip_prob" and const.level_name == "sigma"
    dec = LabelNoise(target=0, sigma=4.0, schedule="decay", start_step=10, decay_until=20)
    assert [dec.level_at(s) for s in (0, 9, 10, 15, 20)] == [0, 0, 4.0, 2.0, 0]
    grid = LabelNoise(target=0, sigma=[1.0, 3.0], schedule="decay", decay_until=4)
    assert grid.level == 2.0 and grid.level_at(2) == 1.0 and grid.schedule_factor(1) == 0.75


def test_periodic_schedule_in_training_exact_steps(lightning):
    c = _classes(lightning.__name__)
    data = TensorDataset(torch.zeros(64, 1), torch.zeros(64))
    model = c.Recorder()
    cb = LabelNoise(sigma=1.0, schedule="periodic", start_step=1, period_on=2, period_off=3)
    make_trainer(lightning, max_steps=12, callbacks=[cb]).fit(model, DataLoader(data, batch_size=4))
    noisy_steps = [step for step, b in model.train_seen if b[1].abs().sum() > 0]
    assert [s for s, _ in model.train_seen] == list(range(12))
    assert noisy_steps == [1, 2, 6, 7, 11]
    assert cb.counter == 12  # one draw per step, on or off


def test_logging_at_log_steps(lightning, tmp_path):
    c = _classes(lightning.__name__)
    data = TensorDataset(torch.zeros(64, 1), torch.arange(64) % 4)
    model = c.Recorder()
    cb = LabelNoise(kind="flip", flip_prob=0.5, num_classes=4, schedule="periodic", period_on=4, period_off=4)
    logger = lightning.loggers.CSVLogger(str(tmp_path))
    trainer = make_trainer(lightning, max_steps=16, callbacks=[cb], logger=logger, log_every_n_steps=3)
    trainer.fit(model, DataLoader(data, batch_size=8))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("label_noise/active")]
    # Step t = SGD steps done (as the model's dynamics tags); the values of the step that ended at t.
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12, 15]
    for r in rows:
        step = int(r["step"]) - 1  # index of the last SGD step before the log
        assert float(r["label_noise/active"]) == float(cb.level_at(step) > 0)
        assert float(r["label_noise/flip_prob"]) == pytest.approx(cb.level_at(step))
        seen = dict(model.train_seen)[step][1]
        clean = torch.arange(64)[8 * (step % 8) : 8 * (step % 8) + 8] % 4
        assert float(r["label_noise/flipped_frac"]) == pytest.approx((seen != clean).float().mean().item())


# ---------------------------------------------------------------------------------------------- scope


def test_validation_test_predict_untouched(lightning):
    c = _classes(lightning.__name__)
    val = TensorDataset(torch.zeros(8, 1), torch.zeros(8))
    train = TensorDataset(torch.zeros(16, 1), torch.zeros(16))
    model = c.Recorder()
    cb = LabelNoise(sigma=1.0)
    trainer = make_trainer(lightning, max_steps=4, val_check_interval=2, num_sanity_val_steps=1, callbacks=[cb])
    trainer.fit(model, DataLoader(train, batch_size=4), DataLoader(val, batch_size=4))
    assert len(model.val_seen) >= 3 and all(torch.equal(b[1], torch.zeros(4)) for b in model.val_seen)
    assert all(b[1].abs().sum() > 0 for _, b in model.train_seen)
    model.val_seen.clear()
    trainer.validate(model, DataLoader(val, batch_size=4), verbose=False)
    trainer.test(model, DataLoader(val, batch_size=4), verbose=False)
    trainer.predict(model, DataLoader(val, batch_size=4))
    assert len(model.val_seen) == 6 and all(torch.equal(b[1], torch.zeros(4)) for b in model.val_seen)
    assert cb.counter == 4


def test_sam_both_passes_see_the_same_noisy_labels(lightning):
    pytest.importorskip("lightning_lnsgd.strategies.sam")  # registers "sam" in each package's registry
    c = _classes(lightning.__name__)
    train = TensorDataset(torch.randn(16, 1), torch.zeros(16))
    model = c.Recorder()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1)
    make_trainer(lightning, max_steps=3, strategy="sam", callbacks=[LabelNoise(sigma=1.0)]).fit(
        model, DataLoader(train, batch_size=4)
    )
    steps = [s for s, _ in model.train_seen]
    assert steps == [0, 0, 1, 1, 2, 2]  # two closure calls per step
    for i in range(0, 6, 2):
        a, b = model.train_seen[i][1][1], model.train_seen[i + 1][1][1]
        assert torch.equal(a, b) and a.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- resume and DDP


def _noise_by_step(model, y):
    return {s: b[1] - y[b[2]] for s, b in model.train_seen}


def test_resume_reproduces_uninterrupted_noise(lightning, tmp_path):
    c = _classes(lightning.__name__)

    def fit(max_epochs, ckpt=None, callbacks=()):
        dm, model = c.IndexedData(), c.Recorder(label_of=lambda b: b[1])
        cb = LabelNoise(kind="gaussian", sigma=1.0, target=1, seed=11, schedule="periodic", period_on=4, period_off=2)
        trainer = make_trainer(lightning, default_root_dir=str(tmp_path), max_epochs=max_epochs,
                               callbacks=[cb, *callbacks], enable_checkpointing=bool(callbacks))
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model, dm, cb

    ck = tmp_path / "ck"
    checkpoint = lightning.callbacks.ModelCheckpoint
    by_step = checkpoint(dirpath=ck, filename="mid-{step}", save_top_k=-1, every_n_train_steps=4)
    by_epoch = checkpoint(dirpath=ck, filename="end-{step}", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    full, dm, _ = fit(3, callbacks=[by_step, by_epoch])  # 6 steps per epoch, 18 steps
    epoch_end, mid = ck / "end-step=6.ckpt", ck / "mid-step=8.ckpt"  # end of epoch 0; inside epoch 1
    want = {s: b[1] for s, b in full.train_seen}
    # Resume at an epoch boundary: exactly the labels of the uninterrupted run.
    resumed, _, cb = fit(3, ckpt=str(epoch_end))
    assert [s for s, _ in resumed.train_seen] == list(range(6, 18)) and cb.counter == 18
    for s, b in resumed.train_seen:
        assert torch.equal(b[1], want[s]), s
    # Resume mid-epoch: whatever batch Lightning replays, step s gets the noise of step s.
    resumed_mid, _, _ = fit(3, ckpt=str(mid))
    full_noise, mid_noise = _noise_by_step(full, dm.y), _noise_by_step(resumed_mid, dm.y)
    assert min(mid_noise) == 8
    for s, eps in mid_noise.items():  # (y + ε) − y on other clean labels: equal up to rounding
        torch.testing.assert_close(eps, full_noise[s], rtol=0, atol=1e-5)
    assert torch.equal(dm.y, torch.arange(24, dtype=torch.float32) * 10)


def _run_two_ranks(out_dir, package):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", WORLD_SIZE="2")
    base[compat.ENV_VAR] = "lightning" if package == "lightning.pytorch" else package
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "callbacks" / "label_noise_ddp_worker.py"), str(out_dir)],
            cwd=str(out_dir), env={**base, "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in (0, 1)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:  # one rank died and the other waits for it: stop both
            for q in procs:
                q.kill()
            outs.append(p.communicate()[0] + "\n[timed out]")
    return [p.returncode for p in procs], outs


@pytest.mark.ddp
def test_ddp_two_ranks_draw_their_own_streams(lightning, tmp_path):
    # A real 2-process gloo DDP run (Trainer(devices=2, strategy="ddp")) of the worker file. Both ranks are
    # started here, in parallel, as Lightning's launcher would (LOCAL_RANK etc. set).
    for _attempt in range(2):  # a second try only if the first could not start (e.g. a port taken meanwhile)
        codes, outs = _run_two_ranks(tmp_path, lightning.__name__)
        if codes == [0, 0]:
            break
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [s["package"] for s in seen] == [lightning.__name__] * 2
    noise = [torch.stack([y for _, _, y in s["steps"]]) for s in seen]  # clean labels are 0
    assert noise[0].shape == noise[1].shape == (3, 4)
    assert not torch.equal(noise[0], noise[1])
    for r in (0, 1):
        # Each rank draws CounterRNG(seed, "label_noise", rank=r), one draw per step, and its data is unchanged.
        assert torch.equal(noise[r], 2.0 * CounterRNG(7, "label_noise", rank=r).rademacher((4,), n=3))
        assert [s for s, _, _ in seen[r]["steps"]] == [0, 1, 2]
        assert seen[r]["data_unchanged"] and seen[r]["counter"] == 3


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "flip"])
def test_gpu_noise_equals_cpu_noise(lightning, kind):
    # The labels that reach training_step on CUDA are those on the CPU (bit for bit, up to float rounding of the
    # Gaussian), they are on the GPU, and the stored dataset is unchanged.
    c = _classes(lightning.__name__)

    def run(accelerator):
        model = c.Classifier(num_classes=5)
        if kind != "flip":  # regression labels on the same inputs
            model.y = torch.linspace(-3, 3, 256)
        y0 = model.y.clone()
        unchanged = []
        probe = c.Probe(check=lambda: unchanged.append(torch.equal(model.y, y0)))
        cb = LabelNoise(kind=kind, sigma=2.0, flip_prob=0.4, num_classes=5, seed=3)
        make_trainer(lightning, accelerator=accelerator, max_steps=4, log_every_n_steps=2, callbacks=[cb, probe]).fit(model)
        assert unchanged == [True] * 4 and torch.equal(model.y, y0)
        assert not torch.equal(torch.stack([t.cpu() for t in model.seen]), y0.view(4, 64)), "no noise"
        return model.seen

    gpu, cpu = run("gpu"), run("cpu")
    assert len(gpu) == len(cpu) == 4 and all(t.device.type == "cuda" for t in gpu)
    for g, h in zip(gpu, cpu):
        if kind == "gaussian":
            torch.testing.assert_close(g.cpu(), h, rtol=0, atol=1e-6)
        else:
            assert torch.equal(g.cpu(), h)


# ---------------------------------------------------------------------------------------------- protocol


class FastModule:
    """Stands in for a fused module: implements MultiStepModule (the step count comes from trainer.global_step)."""

    def __init__(self, replica_seeds, k):
        self.layout = StepLayout(None if replica_seeds is None else tuple(replica_seeds), k)

    @property
    def runs_sam_step(self) -> bool:
        return False

    def step_layout(self):
        return self.layout

    def replica_settings(self):
        return None


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "flip"])
def test_multi_step_chunking_and_replicas(kind):
    B, steps = 5, 6
    y = torch.zeros(B, dtype=torch.int64) if kind == "flip" else torch.zeros(B)
    opts = dict(target=0, kind=kind, sigma=1.5, flip_prob=0.5, num_classes=4, seed=9, schedule="periodic", period_on=2, period_off=1)

    def plain(replica_seeds):  # one step per batch, per-step noise as a (steps, B) tensor
        cb, mod, rows = LabelNoise(**opts), FastModule(replica_seeds, 1), []
        for t in range(steps):
            lab = y.expand(1, B).clone() if replica_seeds is None else y.expand(1, 1, B).clone()
            (out,) = cb.noisy_batch((lab,), _fake_trainer(mod, step=t))
            rows.append(out.reshape(B))
        return torch.stack(rows)

    def chunked(replica_seeds, k):
        cb, mod, chunks = LabelNoise(**opts), FastModule(replica_seeds, k), []
        for t0 in range(0, steps, k):
            lab = y.expand(k, B) if replica_seeds is None else y.expand(len(replica_seeds), k, B)
            (out,) = cb.noisy_batch((lab.clone(),), _fake_trainer(mod, step=t0))
            chunks.append(out)
        assert cb.counter == steps
        return torch.cat(chunks, dim=-2)  # (R?, steps, B)

    ref = plain(None)
    assert torch.equal(chunked(None, 1), ref) and torch.equal(chunked(None, 3), ref)
    # Without a layout the callback draws exactly the same stream (k=1 equals plain Lightning).
    cb = LabelNoise(**opts)
    plain_lightning = torch.stack([cb.noisy_batch((y,), _fake_trainer(step=t))[0] for t in range(steps)])
    assert torch.equal(plain_lightning, ref)
    # Off steps (2 and 5 of period 2 on / 1 off) are clean in every layout.
    assert torch.equal(ref[[2, 5]], y.expand(2, B).to(ref.dtype))
    seeds = [11, 22, 33]
    stacked = chunked(seeds, 3)
    assert stacked.shape == (3, steps, B)
    for r, s in enumerate(seeds):
        assert torch.equal(stacked[r], plain([s])), r
    assert not torch.equal(stacked[0], stacked[1])
    # Replica streams are CounterRNG(replica_stream(seed, r), "label_noise").
    if kind == "rademacher":
        want = 1.5 * CounterRNG(replica_stream(9, 22), "label_noise").rademacher((B,), n=steps)
        want[[2, 5]] = 0
        assert torch.equal(stacked[1], want)


def test_per_replica_sigma():
    seeds, k, B = [4, 5, 6], 2, 3
    cb = LabelNoise(target=0, sigma=[1.0, 2.0, 4.0], seed=1)
    (out,) = cb.noisy_batch((torch.zeros(3, k, B),), _fake_trainer(FastModule(seeds, k)))
    for r, s in enumerate(seeds):
        want = cb.sigma[r] * CounterRNG(replica_stream(1, s), "label_noise").rademacher((B,), n=k)
        assert torch.equal(out[r], want)
    with pytest.raises(ValueError, match=r"`sigma` lists 3 values .* but the module stacks 2 replicas"):
        cb.noisy_batch((torch.zeros(2, k, B),), _fake_trainer(FastModule([1, 2], k)))
    with pytest.raises(ValueError, match=r"`sigma` lists 3 values .* but the module stacks 0 replicas"):
        cb.noisy_batch((torch.zeros(B),), _fake_trainer())


def test_sharded_block_draws_its_replicas_own_noise_whatever_the_rank():
    """A module that shards its replicas over DDP ranks: rank 1's block (replicas 3, 4 of 5) gets rows 3, 4 of what
    one process draws, with their own σ."""
    seeds, k, B = [4, 5, 6, 4, 7], 2, 3
    cb = LabelNoise(target=0, sigma=[1.0, 2.0, 4.0, 8.0, 0.5], seed=1)
    (full,) = cb.noisy_batch((torch.zeros(5, k, B),), _fake_trainer(FastModule(seeds, k)))
    block = FastModule(seeds[3:], k)
    block.layout = block.layout._replace(replica_index=(3, 4), total=5)
    cb = LabelNoise(target=0, sigma=[1.0, 2.0, 4.0, 8.0, 0.5], seed=1)
    (out,) = cb.noisy_batch((torch.zeros(2, k, B),), _fake_trainer(block, rank=1))
    assert torch.equal(out, full[3:])
    block.layout = block.layout._replace(replica_index=(3, 5))
    with pytest.raises(ValueError, match=r"replica_index=\(3, 5\) must hold indices in 0..total-1 with total=5"):
        cb.noisy_batch((torch.zeros(2, k, B),), _fake_trainer(block, rank=1))


def test_layout_errors():
    cb = LabelNoise(target=0)
    with pytest.raises(ValueError, match=r"leading label dims \(2, 3\).*shape \(3, 3, 4\)"):
        cb.noisy_batch((torch.zeros(3, 3, 4),), _fake_trainer(FastModule([1, 2], 3)))
    with pytest.raises(ValueError, match="steps=0 must be an int >= 1"):
        cb.noisy_batch((torch.zeros(3),), _fake_trainer(FastModule(None, 0)))
    # A module whose step_layout() returns None (its generic path) gets plain per-step noise.
    generic = FastModule(None, 1)
    generic.step_layout = lambda: None
    (out,) = LabelNoise(target=0, sigma=1.0, seed=4).noisy_batch((torch.zeros(3),), _fake_trainer(generic))
    assert torch.equal(out, CounterRNG(4, "label_noise").rademacher((3,)))


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigma=-1.0), r"`sigma` must be a finite float >= 0.*-1\.0"),
        (dict(sigma=[]), r"`sigma` must be .* got \[\]"),
        (dict(sigma=[1.0, float("inf")]), r"`sigma` must be .* got \[1\.0, inf\]"),
        (dict(kind="flip", flip_prob=1.5, num_classes=3), r"`flip_prob` must be a probability in \[0, 1\] \(or None\), got 1\.5"),
        (dict(kind="flip", flip_prob=-0.1, num_classes=3), r"`flip_prob`.*-0\.1"),
        (dict(kind="flip", num_classes=1), r"`num_classes` must be an int >= 2.*got 1"),
        (dict(kind="laplace"), r"`kind` must be.*'laplace'"),
        (dict(schedule="window"), r"`schedule` must be 'constant', 'periodic' or 'decay', got 'window'"),
        (dict(schedule="periodic", period_on=0), r"`period_on` to be a positive int.*got 0"),
        (dict(schedule="decay"), r"needs `decay_until`.*got None"),
        (dict(start_step=5, stop_step=5), r"`stop_step` must be None or an int > `start_step` \(5\), got 5"),
        (dict(target=1.5), r"`target` must be.*got 1\.5"),
        (dict(target=True), r"`target` must be.*got True"),
        (dict(seed="a"), r"`seed` must be an int, got 'a'"),
    ],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelNoise(**kwargs)


def test_first_batch_errors():
    t = _fake_trainer()
    X, Y = torch.arange(6.0).reshape(3, 2), torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"`target='label'` is not in the training batch"):
        LabelNoise(target="label").noisy_batch({"x": X, "y": Y}, t)
    with pytest.raises(ValueError, match=r"kind='flip' needs integer class labels.*batch\[1\] is the soft target Tensor\(float32, \[3\]\)"):
        LabelNoise(kind="flip", num_classes=3).noisy_batch((X, Y), t)
    with pytest.raises(ValueError, match=r"kind='rademacher' needs floating-point labels.*torch.int64"):
        LabelNoise().noisy_batch((X, Y.long()), t)
    with pytest.raises(ValueError, match=r"kind='gaussian' needs floating-point"):
        LabelNoise(kind="gaussian").noisy_batch((X, Y.long()), t)
    with pytest.raises(ValueError, match=r"num_classes=3 needs labels in \[0, 2\].*label 3"):
        LabelNoise(kind="flip", num_classes=3).noisy_batch((X, torch.tensor([0, 1, 3])), t)
    with pytest.raises(ValueError, match=r"needs labels in \[0, 2\].*label -1"):
        LabelNoise(kind="flip", num_classes=3).noisy_batch((X, torch.tensor([0, -1, 2])), t)


def test_refusals_at_setup(lightning):
    c = _classes(lightning.__name__)
    data = TensorDataset(torch.zeros(8, 1), torch.zeros(8))
    # num_classes missing and nowhere to infer it from.
    trainer = make_trainer(lightning, max_steps=2, callbacks=[LabelNoise(kind="flip")])
    with pytest.raises(ValueError, match=r"kind='flip' needs `num_classes`.*got None"):
        trainer.fit(c.Recorder(), DataLoader(data, batch_size=4))
    # Two LabelNoise callbacks (each would restore a label the other noised, and they share a checkpoint key) are
    # refused by the Trainer itself, a stateful callback's state key being unique.
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `LabelNoise`"):
        make_trainer(lightning, max_steps=2, callbacks=[LabelNoise(), LabelNoise(seed=1)])
    # A training_step that takes dataloader_iter never gets its batch through on_train_batch_start.
    model = c.Recorder()
    model.training_step = lambda dataloader_iter: None
    trainer = make_trainer(lightning, max_steps=2, callbacks=[LabelNoise()])
    with pytest.raises(ValueError, match=r"training_step takes `dataloader_iter`"):
        trainer.fit(model, DataLoader(data, batch_size=4))


def test_wrong_label_dtype_in_a_real_fit(lightning):
    c = _classes(lightning.__name__)
    y = torch.zeros(8)
    trainer = make_trainer(lightning, max_steps=2, callbacks=[LabelNoise(kind="flip", num_classes=3)])
    with pytest.raises(ValueError, match="needs integer class labels"):
        trainer.fit(c.Recorder(), DataLoader(TensorDataset(torch.zeros(8, 1), y), batch_size=4))
    assert torch.equal(y, torch.zeros(8))


# ---------------------------------------------------------------------------------------------- examples


def test_classification_example_with_flip_noise():
    from lightning_lnsgd.examples.classification import (
        GaussianMixtureDataModule,
        MLPClassifier,
    )

    dm = GaussianMixtureDataModule(dim=5, num_classes=4, n_train=256, n_val=128, batch_size=32, center_scale=2.0)
    model = MLPClassifier(hidden=16, lr=0.5)  # dim / num_classes taken from the datamodule
    cb = LabelNoise(kind="flip", flip_prob=0.2)  # num_classes taken from the model
    trainer = make_trainer(max_epochs=4, callbacks=[cb])
    trainer.fit(model, dm)
    assert cb.num_classes == 4 and cb.counter == 32
    assert "val/acc" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics
    assert trainer.callback_metrics["val/acc"] > 0.4  # chance is 0.25


def test_classifier_yaml_config(tmp_path, monkeypatch):
    cli = pytest.importorskip("lightning_lnsgd.cli")
    path = ROOT / "configs" / "classifier_label_noise.yaml"
    monkeypatch.chdir(tmp_path)  # the run writes logs under the working directory
    run = cli.main(["fit", "--config", str(path), "--trainer.fast_dev_run", "2"])
    noise = [c for c in run.trainer.callbacks if isinstance(c, LabelNoise)]
    assert len(noise) == 1 and noise[0].kind == "flip" and noise[0].counter == 2
