"""Tests of lightning_lnsgd.callbacks.label_noise.LabelNoise (issue 3) and the classification example."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lightning_lnsgd.callbacks.label_noise import LabelNoise, replica_stream_seed
from lightning_lnsgd.rng import CounterRNG

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- helpers


def _trainer(tmp_path=None, **kw) -> Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path) if tmp_path is not None else None,
    )
    opts.update(kw)
    return Trainer(**opts)


class Recorder(LightningModule):
    """Records what training_step / validation_step receive; ``label_of(batch)`` finds the label."""

    def __init__(self, label_of=lambda b: b[-1], x_of=lambda b: b[0]) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.label_of, self.x_of = label_of, x_of
        self.train_seen: list = []  # (global_step, batch as received)
        self.val_seen: list = []

    def training_step(self, batch, batch_idx):
        y = self.label_of(batch)
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


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj) if not hasattr(obj, "_fields") else type(obj)(*map(_clone, obj))
    return obj


def _fake_trainer(module=None, step: int = 0, rank: int = 0):
    """Just what ``LabelNoise.noisy_batch`` reads from a trainer."""
    return SimpleNamespace(lightning_module=module, global_step=step, global_rank=rank)


# ---------------------------------------------------------------------------------------------- layouts

Pair = collections.namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class DCBatch:
    x: torch.Tensor
    label: torch.Tensor


X = torch.arange(6.0).reshape(3, 2)
Y = torch.tensor([1.0, 2.0, 3.0])

LAYOUTS = [
    # (batch, target, how to read the label, layout name)
    ((X, Y), None, lambda b: b[1], "tuple"),
    ([X, Y], None, lambda b: b[1], "list"),
    ((Y, X), 0, lambda b: b[0], "tuple index 0"),
    ((X, Y, torch.arange(3)), 1, lambda b: b[1], "tuple index 1"),
    ({"x": X, "y": Y}, None, lambda b: b["y"], "dict y"),
    ({"x": X, "target": Y}, None, lambda b: b["target"], "dict target"),
    ({"x": X, "label": Y}, None, lambda b: b["label"], "dict label"),
    ({"x": X, "out": Y}, "out", lambda b: b["out"], "dict custom key"),
    (collections.OrderedDict(x=X, y=Y), None, lambda b: b["y"], "OrderedDict"),
    (Pair(X, Y), None, lambda b: b.y, "namedtuple"),
    (((X, Y), torch.arange(3)), "0.1", lambda b: b[0][1], "nested tuple path"),
    ((X, (Y, torch.ones(3))), "1.0", lambda b: b[1][0], "nested tuple in last"),
    ({"inputs": {"x": X}, "meta": [X, {"y": Y}]}, "meta.1.y", lambda b: b["meta"][1]["y"], "dict-list-dict"),
    ([X, {"y": Y}], None, lambda b: b[1]["y"], "default descends into last element"),
    (DCBatch(X, Y), None, lambda b: b.label, "dataclass"),
]


@pytest.mark.parametrize("batch,target,read,name", LAYOUTS, ids=[row[-1] for row in LAYOUTS])
def test_every_batch_layout(batch, target, read, name):
    before = _clone(batch) if not isinstance(batch, DCBatch) else DCBatch(batch.x.clone(), batch.label.clone())
    cb = LabelNoise(kind="rademacher", sigma=0.5, target=target)
    out = cb.noisy_batch(batch, _fake_trainer())
    assert type(out) is type(batch)
    noise = read(out) - read(batch)
    assert torch.equal(noise.abs(), torch.full_like(noise, 0.5)), name
    # The input batch is untouched (new container, new label tensor), other elements shared as is.
    assert read(batch) is not read(out)
    assert torch.equal(read(batch), read(before))
    if name in ("tuple", "list", "tuple index 1", "namedtuple"):
        assert batch[0] is out[0]


def test_layouts_through_a_trainer():
    data = [{"x": torch.randn(4, 1), "y": torch.zeros(4)} for _ in range(3)]
    model = Recorder(label_of=lambda b: b["y"], x_of=lambda b: b["x"])
    trainer = _trainer(max_steps=3, callbacks=[LabelNoise(sigma=3.0)])
    trainer.fit(model, DataLoader(data, batch_size=None))
    for _, b in model.train_seen:
        assert set(b) == {"x", "y"} and torch.equal(b["y"].abs(), torch.full((4,), 3.0))
    assert all(torch.equal(d["y"], torch.zeros(4)) for d in data)
    # The wrapper is gone after fit.
    assert "batch_to_device" not in trainer.strategy.__dict__


# ---------------------------------------------------------------------------------------------- dataset safety


class SliceDataset(Dataset):
    """Returns batches as *views* of stored tensors (a custom sampler hands out slices)."""

    def __init__(self, x, y, whole: bool = False, as_dict: bool = False):
        self.x, self.y, self.whole, self.as_dict = x, y, whole, as_dict
        self.stored = {"x": x, "y": y}

    def __len__(self):
        return 4

    def __getitem__(self, s):
        if self.whole:  # the dataset's own tensor objects themselves
            return self.stored if self.as_dict else (self.x, self.y)
        return {"x": self.x[s], "y": self.y[s]} if self.as_dict else (self.x[s], self.y[s])


class SliceSampler(Sampler):
    def __init__(self, n, b):
        self.n, self.b = n, b

    def __iter__(self):
        return iter(slice(i, i + self.b) for i in range(0, self.n, self.b))

    def __len__(self):
        return math.ceil(self.n / self.b)


@pytest.mark.parametrize("kind", ["rademacher", "flip"])
@pytest.mark.parametrize("whole,as_dict", [(False, False), (False, True), (True, False), (True, True)])
def test_dataset_unchanged_with_view_batches(kind, whole, as_dict):
    n = 16
    x = torch.randn(n, 1)
    y = torch.randint(0, 5, (n,)) if kind == "flip" else torch.randn(n)
    x0, y0 = x.clone(), y.clone()
    ds = SliceDataset(x, y, whole=whole, as_dict=as_dict)
    # batch_size=None: no collation, the DataLoader hands out what the dataset returns (views, or the
    # stored objects); on CPU, moving to the device is a no-op, so the module sees those very tensors.
    loader = DataLoader(ds, batch_size=None, sampler=SliceSampler(n, 4))
    read = (lambda b: b["y"]) if as_dict else (lambda b: b[1])
    model = Recorder(label_of=read, x_of=(lambda b: b["x"]) if as_dict else (lambda b: b[0]))
    noise = LabelNoise(kind=kind, sigma=1.0, flip_prob=0.5, num_classes=5)
    _trainer(max_steps=4, callbacks=[noise]).fit(model, loader)
    assert torch.equal(x, x0) and torch.equal(y, y0), "the dataset was modified"
    assert ds.stored["y"] is y and torch.equal(ds.stored["y"], y0)
    assert y.data_ptr() == ds.y.data_ptr()
    changed = sum(int((read(b) != (y0 if whole else y0[4 * i : 4 * i + 4])).sum()) for i, (_, b) in enumerate(model.train_seen))
    assert changed > 0, "no noise reached training_step"


# ---------------------------------------------------------------------------------------------- kinds


def test_flip_rate_and_uniform_over_other_classes():
    c, tau, n = 5, 0.3, 200_000
    y = torch.arange(n) % c
    cb = LabelNoise(kind="flip", flip_prob=tau, num_classes=c, seed=3)
    (noisy,) = cb.noisy_batch((y,), _fake_trainer())
    assert noisy.dtype == y.dtype
    mask = cb._last["mask"]
    assert torch.equal(mask, noisy != y), "a flipped label equal to the original"
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
    # Fresh every step: the next batch flips other positions.
    (noisy2,) = cb.noisy_batch((y,), _fake_trainer(step=1))
    assert not torch.equal(noisy2, noisy)


def test_flip_extremes():
    y = torch.arange(1000) % 3
    (same,) = LabelNoise(kind="flip", flip_prob=0.0, num_classes=3).noisy_batch((y,), _fake_trainer())
    assert torch.equal(same, y)
    (all_,) = LabelNoise(kind="flip", flip_prob=1.0, num_classes=3).noisy_batch((y,), _fake_trainer())
    assert (all_ != y).all() and ((all_ >= 0) & (all_ < 3)).all()


def test_rademacher_exactly_pm_sigma_and_gaussian_moments():
    y = torch.arange(-50.0, 50.0).repeat(100)  # integer-valued floats: y ± 4 is exact
    cb = LabelNoise(kind="rademacher", sigma=4.0)
    (noisy,) = cb.noisy_batch((y,), _fake_trainer())
    eps = noisy - y
    assert set(eps.unique().tolist()) == {-4.0, 4.0}
    assert abs((eps > 0).float().mean().item() - 0.5) < 0.02
    y2 = torch.zeros(4, 3, 2, dtype=torch.float64)  # any shape, any float dtype
    (n2,) = cb.noisy_batch((y2,), _fake_trainer())
    assert n2.dtype == torch.float64 and n2.shape == y2.shape and set(n2.abs().unique().tolist()) == {4.0}
    g = LabelNoise(kind="gaussian", sigma=2.0)
    (ng,) = g.noisy_batch((torch.zeros(100_000),), _fake_trainer())
    assert abs(ng.mean().item()) < 0.03 and abs(ng.std().item() - 2.0) < 0.03


def test_same_seed_same_noise_other_seed_other_noise():
    y = torch.zeros(64)

    def run(seed, steps=3):
        cb = LabelNoise(sigma=1.0, seed=seed)
        return torch.stack([cb.noisy_batch((y,), _fake_trainer(step=s))[0] for s in range(steps)])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    # The draw is CounterRNG(seed, "label_noise", rank): one draw per step.
    assert torch.equal(run(5), CounterRNG(5, "label_noise", 0).rademacher((64,), n=3))


# ---------------------------------------------------------------------------------------------- schedules


def test_schedules_level_at():
    const = LabelNoise(sigma=2.0)
    assert [const.level_at(s) for s in (0, 1, 10**6)] == [2.0, 2.0, 2.0]
    win = LabelNoise(sigma=2.0, schedule="window", start_step=3, stop_step=6)
    assert [win.level_at(s) for s in range(8)] == [0, 0, 0, 2, 2, 2, 0, 0]
    per = LabelNoise(kind="flip", flip_prob=0.2, num_classes=3, schedule="periodic", start_step=2, period_on=3, period_off=2)
    on = [per.level_at(s) > 0 for s in range(14)]
    assert on == [False, False, True, True, True, False, False, True, True, True, False, False, True, True]
    assert per.level_at(2) == 0.2
    paper = LabelNoise(schedule="periodic")  # 5000 on / 5000 off
    assert paper.level_at(4999) == 4.0 and paper.level_at(5000) == 0.0 and paper.level_at(10000) == 4.0
    dec = LabelNoise(sigma=4.0, schedule="decay", start_step=10, decay_until=20)
    assert [dec.level_at(s) for s in (0, 9, 10, 15, 19, 20, 100)] == [0, 0, 4.0, 2.0, pytest.approx(0.4), 0, 0]


def test_periodic_schedule_in_training_exact_steps():
    data = TensorDataset(torch.zeros(64, 1), torch.zeros(64))
    model = Recorder()
    cb = LabelNoise(sigma=1.0, schedule="periodic", start_step=1, period_on=2, period_off=3)
    _trainer(max_steps=12, callbacks=[cb]).fit(model, DataLoader(data, batch_size=4))
    noisy_steps = [step for step, b in model.train_seen if b[1].abs().sum() > 0]
    assert [s for s, _ in model.train_seen] == list(range(12))
    assert noisy_steps == [1, 2, 6, 7, 11]
    assert cb.counter == 12  # one draw per step, on or off


def test_logging_at_log_steps(tmp_path):
    data = TensorDataset(torch.zeros(64, 1), torch.arange(64) % 4)
    model = Recorder()
    cb = LabelNoise(kind="flip", flip_prob=0.5, num_classes=4, schedule="periodic", period_on=4, period_off=4)
    trainer = _trainer(
        max_steps=16, callbacks=[cb], logger=CSVLogger(str(tmp_path)), log_every_n_steps=3,
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    rows = [r for r in rows if r.get("label_noise/active")]
    steps = [int(r["step"]) for r in rows]
    # TensorBoard step t = SGD steps done (as the model's dynamics tags); values of the step that ended at t.
    assert steps == [3, 6, 9, 12, 15]
    for r in rows:
        step = int(r["step"]) - 1  # index of the last SGD step before the log
        assert float(r["label_noise/active"]) == float(cb.level_at(step) > 0)
        assert float(r["label_noise/flip_prob"]) == pytest.approx(cb.level_at(step))
        seen = dict(model.train_seen)[step][1]
        clean = torch.arange(64)[8 * (step % 8) : 8 * (step % 8) + 8] % 4
        assert float(r["label_noise/flipped_frac"]) == pytest.approx((seen != clean).float().mean().item())


# ---------------------------------------------------------------------------------------------- scope


def test_validation_test_predict_untouched():
    val = TensorDataset(torch.zeros(8, 1), torch.zeros(8))
    train = TensorDataset(torch.zeros(16, 1), torch.zeros(16))
    model = Recorder()
    cb = LabelNoise(sigma=1.0)
    trainer = _trainer(max_steps=4, val_check_interval=2, num_sanity_val_steps=1, callbacks=[cb])
    trainer.fit(model, DataLoader(train, batch_size=4), DataLoader(val, batch_size=4))
    assert len(model.val_seen) >= 3 and all(torch.equal(b[1], torch.zeros(4)) for b in model.val_seen)
    assert all(b[1].abs().sum() > 0 for _, b in model.train_seen)
    model.val_seen.clear()
    trainer.validate(model, DataLoader(val, batch_size=4), verbose=False)
    trainer.test(model, DataLoader(val, batch_size=4), verbose=False)
    trainer.predict(model, DataLoader(val, batch_size=4))
    assert len(model.val_seen) == 6 and all(torch.equal(b[1], torch.zeros(4)) for b in model.val_seen)


def test_sam_both_passes_see_the_same_noisy_labels():
    sam = pytest.importorskip("lightning_lnsgd.strategies.sam")
    train = TensorDataset(torch.randn(16, 1), torch.zeros(16))
    model = Recorder()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1)
    _trainer(max_steps=3, strategy=sam.SAMStrategy(rho=0.05), callbacks=[LabelNoise(sigma=1.0)]).fit(
        model, DataLoader(train, batch_size=4)
    )
    steps = [s for s, _ in model.train_seen]
    assert steps == [0, 0, 1, 1, 2, 2]  # two closure calls per step
    for i in range(0, 6, 2):
        a, b = model.train_seen[i][1][1], model.train_seen[i + 1][1][1]
        assert torch.equal(a, b) and a.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- resume and DDP


class IndexedData(LightningDataModule):
    def __init__(self, n=24, b=4):
        super().__init__()
        self.y = torch.arange(n, dtype=torch.float32) * 10
        self.ds = TensorDataset(torch.randn(n, 1), self.y, torch.arange(n))
        self.b = b

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=self.b, shuffle=False)


def _noise_by_step(model, y):
    return {s: b[1] - y[b[2]] for s, b in model.train_seen}


def test_resume_reproduces_uninterrupted_noise(tmp_path):
    def fit(max_epochs, ckpt=None, callbacks=()):
        dm, model = IndexedData(), Recorder(label_of=lambda b: b[1])
        cb = LabelNoise(kind="gaussian", sigma=1.0, target=1, seed=11, schedule="periodic", period_on=4, period_off=2)
        trainer = _trainer(tmp_path, max_epochs=max_epochs, callbacks=[cb, *callbacks], enable_checkpointing=bool(callbacks))
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model, dm

    ck = tmp_path / "ck"
    by_step = ModelCheckpoint(dirpath=ck, filename="mid-{step}", save_top_k=-1, every_n_train_steps=4)
    by_epoch = ModelCheckpoint(dirpath=ck, filename="end-{step}", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    full, dm = fit(3, callbacks=[by_step, by_epoch])  # 6 steps per epoch, 18 steps
    epoch_end, mid = ck / "end-step=6.ckpt", ck / "mid-step=8.ckpt"  # end of epoch 0; inside epoch 1
    want = {s: b[1] for s, b in full.train_seen}
    # Resume at an epoch boundary: exactly the labels of the uninterrupted run.
    resumed, _ = fit(3, ckpt=str(epoch_end))
    assert [s for s, _ in resumed.train_seen] == list(range(6, 18))
    for s, b in resumed.train_seen:
        assert torch.equal(b[1], want[s]), s
    # Resume mid-epoch: whatever batch Lightning replays, step s gets the noise of step s.
    resumed_mid, _ = fit(3, ckpt=str(mid))
    full_noise, mid_noise = _noise_by_step(full, dm.y), _noise_by_step(resumed_mid, dm.y)
    assert min(mid_noise) == 8
    for s, eps in mid_noise.items():  # (y + ε) − y on other clean labels: equal up to rounding
        torch.testing.assert_close(eps, full_noise[s], rtol=0, atol=1e-5)
    # (Lightning replays a plain DataLoader from the start of the epoch on a mid-epoch resume, so
    # the clean labels of step 8 differ from the uninterrupted run's; the noise does not.)


def _run_two_ranks(out_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "callbacks" / "_noise_ddp.py"), str(out_dir)],
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


def test_ddp_two_ranks_draw_different_noise(tmp_path):
    # A real 2-process gloo DDP run (Trainer(devices=2, strategy="ddp")). Both ranks are started here,
    # in parallel, as Lightning's launcher would (LOCAL_RANK etc. set), which halves the wall time:
    # importing Lightning dominates it.
    for attempt in range(2):  # a second try only if the first could not start (e.g. a port taken meanwhile)
        codes, outs = _run_two_ranks(tmp_path)
        if codes == [0, 0]:
            break
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    noise = [torch.stack([y for _, _, y in s]) for s in seen]  # clean labels are 0
    assert noise[0].shape == noise[1].shape == (3, 4)
    assert not torch.equal(noise[0], noise[1])
    for r in (0, 1):
        # Each rank draws CounterRNG(seed, "label_noise", rank=r), one draw per step.
        assert torch.equal(noise[r], 2.0 * CounterRNG(7, "label_noise", rank=r).rademacher((4,), n=3))
        assert [s for s, _, _ in seen[r]] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- fast engine


class FastModule:
    """Stands in for a fused module: declares its label layout and the SGD steps done so far."""

    def __init__(self, replica_seeds, k, done=0):
        self.replica_seeds, self.k, self.sgd_steps_done = replica_seeds, k, done

    def label_noise_layout(self):
        return self.replica_seeds, self.k


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "flip"])
def test_fast_engine_chunking_and_replicas(kind):
    B, steps = 5, 6
    y = torch.zeros(B, dtype=torch.int64) if kind == "flip" else torch.zeros(B)
    opts = dict(kind=kind, sigma=1.5, flip_prob=0.5, num_classes=4, seed=9, schedule="periodic", period_on=2, period_off=1)

    def plain(replica_seeds):  # one step per batch, per-step noise as a (steps, B) tensor
        cb, mod, rows = LabelNoise(**opts), FastModule(replica_seeds, 1), []
        for t in range(steps):
            mod.sgd_steps_done = t
            lab = y.expand(1, B).clone() if replica_seeds is None else y.expand(1, 1, B).clone()
            (out,) = cb.noisy_batch((lab,), _fake_trainer(mod, step=1000))  # global_step is ignored
            rows.append(out.reshape(B))
        return torch.stack(rows)

    def chunked(replica_seeds, k):
        cb, mod, chunks = LabelNoise(**opts), FastModule(replica_seeds, k), []
        for t0 in range(0, steps, k):
            mod.sgd_steps_done = t0
            lab = y.expand(k, B) if replica_seeds is None else y.expand(len(replica_seeds), k, B)
            (out,) = cb.noisy_batch((lab.clone(),), _fake_trainer(mod))
            chunks.append(out)
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
        single = plain([s])
        assert torch.equal(stacked[r], single), r
    assert not torch.equal(stacked[0], stacked[1])
    # Replica streams are CounterRNG(replica_stream_seed(seed, r), "label_noise").
    if kind == "rademacher":
        want = 1.5 * CounterRNG(replica_stream_seed(9, 22), "label_noise").rademacher((B,), n=steps)
        want[[2, 5]] = 0
        assert torch.equal(stacked[1], want)


def test_fast_engine_layout_errors():
    cb = LabelNoise()
    with pytest.raises(ValueError, match=r"leading dims \(2, 3\)"):
        cb.noisy_batch((torch.zeros(3, 3, 4),), _fake_trainer(FastModule([1, 2], 3)))
    with pytest.raises(ValueError, match="steps_per_batch=0"):
        cb.noisy_batch((torch.zeros(3),), _fake_trainer(FastModule(None, 0)))
    # A module whose label_noise_layout() returns None (its generic path) gets plain per-step noise.
    generic = FastModule(None, 1)
    generic.label_noise_layout = lambda: None
    (out,) = LabelNoise(sigma=1.0, seed=4).noisy_batch((torch.zeros(3),), _fake_trainer(generic))
    assert torch.equal(out, CounterRNG(4, "label_noise").rademacher((3,)))


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigma=-1.0), r"`sigma` must be a finite float >= 0.*-1\.0"),
        (dict(kind="flip", flip_prob=1.5, num_classes=3), r"`flip_prob` must be a probability in \[0, 1\], got 1\.5"),
        (dict(kind="flip", flip_prob=-0.1, num_classes=3), r"`flip_prob`.*-0\.1"),
        (dict(kind="flip", num_classes=1), r"`num_classes` must be an int >= 2.*got 1"),
        (dict(kind="laplace"), r"`kind` must be.*'laplace'"),
        (dict(schedule="periodic", period_on=0), r"`period_on` to be a positive int.*got 0"),
        (dict(schedule="periodic", period_off=-5), r"`period_off` to be a positive int.*got -5"),
        (dict(schedule="decay"), r"needs `decay_until`.*got None"),
        (dict(schedule="decay", start_step=10, decay_until=5), r"`decay_until`.*> `start_step` \(10\); got 5"),
        (dict(start_step=5, stop_step=5), r"`stop_step` must be None or an int > `start_step` \(5\), got 5"),
        (dict(start_step=-1), r"`start_step` must be an int >= 0, got -1"),
        (dict(schedule="cosine"), r"`schedule` must be.*'cosine'"),
        (dict(target=1.5), r"`target` must be"),
    ],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelNoise(**kwargs)


def test_first_batch_errors():
    t = _fake_trainer()
    with pytest.raises(ValueError, match=r"`target='label'` is not in the training batch: no key 'label' among \['x', 'y'\]"):
        LabelNoise(target="label").noisy_batch({"x": X, "y": Y}, t)
    with pytest.raises(ValueError, match=r"keys \['y', 'target', 'label'\].*keys \['x', 'out'\]"):
        LabelNoise().noisy_batch({"x": X, "out": Y}, t)
    with pytest.raises(ValueError, match=r"index 5 is not valid for a tuple of length 2.*Tensor\(float32, \[3, 2\]\)"):
        LabelNoise(target=5).noisy_batch((X, Y), t)
    with pytest.raises(ValueError, match=r"kind='flip' needs integer class labels.*batch\[1\] has dtype torch.float32"):
        LabelNoise(kind="flip", num_classes=3).noisy_batch((X, Y), t)
    with pytest.raises(ValueError, match=r"kind='rademacher' needs floating-point labels.*torch.int64"):
        LabelNoise().noisy_batch((X, Y.long()), t)
    with pytest.raises(ValueError, match=r"kind='gaussian' needs floating-point"):
        LabelNoise(kind="gaussian").noisy_batch((X, Y.long()), t)
    with pytest.raises(ValueError, match=r"num_classes=3 needs labels in \[0, 2\].*label 3"):
        LabelNoise(kind="flip", num_classes=3).noisy_batch((X, torch.tensor([0, 1, 3])), t)
    with pytest.raises(ValueError, match=r"needs labels in \[0, 2\].*label -1"):
        LabelNoise(kind="flip", num_classes=3).noisy_batch((X, torch.tensor([0, -1, 2])), t)
    with pytest.raises(ValueError, match=r"which is a tuple, not a tensor"):
        LabelNoise(target=0).noisy_batch(((X, Y), Y), t)


def test_errors_in_a_real_fit_and_wrapper_removed():
    data = TensorDataset(torch.zeros(8, 1), torch.zeros(8))
    trainer = _trainer(max_steps=2, callbacks=[LabelNoise(kind="flip", num_classes=3)])
    with pytest.raises(ValueError, match="needs integer class labels"):
        trainer.fit(Recorder(), DataLoader(data, batch_size=4))
    assert "batch_to_device" not in trainer.strategy.__dict__
    # num_classes missing and nowhere to infer it from: a clear error at setup.
    trainer = _trainer(max_steps=2, callbacks=[LabelNoise(kind="flip")])
    with pytest.raises(ValueError, match=r"kind='flip' needs `num_classes`.*got None"):
        trainer.fit(Recorder(), DataLoader(data, batch_size=4))


# ---------------------------------------------------------------------------------------------- example


def test_classification_example_with_flip_noise():
    from lightning_lnsgd.examples.classification import GaussianMixtureDataModule, MLPClassifier

    dm = GaussianMixtureDataModule(dim=5, num_classes=4, n_train=256, n_val=128, batch_size=32, center_scale=2.0)
    model = MLPClassifier(hidden=16, lr=0.5)  # dim / num_classes taken from the datamodule
    cb = LabelNoise(kind="flip", flip_prob=0.2)  # num_classes taken from the model
    trainer = _trainer(max_epochs=4, callbacks=[cb])
    trainer.fit(model, dm)
    assert cb.num_classes == 4 and cb.counter == 32
    assert "val/acc" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics
    assert trainer.callback_metrics["val/acc"] > 0.4  # chance is 0.25


def test_classifier_yaml_config(tmp_path):
    cli = pytest.importorskip("lightning_lnsgd.cli")
    path = ROOT / "configs" / "classifier_label_noise.yaml"
    os.chdir(tmp_path)  # the run writes logs under the working directory
    try:
        run = cli.main(["fit", "--config", str(path), "--trainer.fast_dev_run", "2"])
    finally:
        os.chdir(ROOT)
    noise = [c for c in run.trainer.callbacks if isinstance(c, LabelNoise)]
    assert len(noise) == 1 and noise[0].kind == "flip" and noise[0].counter == 2
