"""Label-noise SGD as a Lightning callback: fresh noise on the training labels at every step.

:class:`LabelNoise` adds the label noise of the paper (``docs/label-noise.md``, science §3) to an
unmodified LightningModule and DataModule:

* ``kind="rademacher"``: ỹ = y + ε with ε uniform on {−σ, +σ} (float labels, any shape);
* ``kind="gaussian"``: ỹ = y + ε with ε ~ N(0, σ²) (float labels, any shape);
* ``kind="flip"``: with probability τ each integer class label is replaced by a class drawn
  uniformly from the *other* ``num_classes − 1`` classes.

Mechanism. Lightning hands callbacks the batch in ``on_train_batch_start`` but ignores any
return value, and ``training_step`` then receives that same object. Rather than mutating the
label tensor in place (which would corrupt the user's dataset whenever the batch tensor is a
view of, or is, the stored tensor), the callback wraps the strategy's ``batch_to_device`` for
the duration of ``fit``. ``batch_to_device`` is the single call through which the training loop
obtains the batch that every later hook and ``training_step`` receive; it runs *after* the
module's or datamodule's transfer hooks (whichever ``_DataHookSelector`` picked). The wrapper
returns a NEW container (new tuple / list / dict copy along the path to the label) holding a
NEW noisy label tensor; nothing the DataLoader returned is ever written to. The wrapper only
acts while ``trainer.training`` (validation, test, predict and the sanity check pass through),
and it is removed in ``teardown`` and ``on_exception``.

Randomness comes from :class:`~lightning_lnsgd.rng.CounterRNG` (stream ``"label_noise"``,
``rank = trainer.global_rank``): the draw for training batch ``t`` is a pure function of
``(seed, rank, t)``. The draw counter advances by one per SGD step whether or not noise is on,
is saved in the checkpoint, and is therefore resume-exact.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
from ..compat import Callback, LightningModule, Trainer

from ..protocol import step_layout
from ..rng import CounterRNG, replica_stream

__all__ = ["LabelNoise"]

_DEFAULT_KEYS = ("y", "target", "label")
_STREAM = "label_noise"


def replica_stream_seed(seed: int, replica_seed: int) -> int:
    """The CounterRNG seed of one stacked replica: a hash of (callback seed, replica seed).

    Used by the fast-engine protocol; a run whose module declares ``([r], 1)`` as its layout
    draws exactly the noise that replica ``r`` of a stacked run draws.
    """
    return replica_stream(seed, replica_seed)


class LabelNoise(Callback):
    r"""Adds fresh label noise to every training batch (label-noise SGD).

    Args:
        kind: ``"rademacher"`` (ε = ±σ, float labels), ``"gaussian"`` (ε ~ N(0, σ²), float
            labels) or ``"flip"`` (integer class labels, replaced with probability τ by a
            uniformly drawn *different* class).
        sigma: noise level σ for rademacher/gaussian, in label units (≥ 0). Paper: 4.
        flip_prob: flip probability τ ∈ [0, 1] for ``kind="flip"``.
        num_classes: number of classes for ``kind="flip"`` (≥ 2). ``None``: taken at setup from
            the LightningModule's or DataModule's ``num_classes`` attribute / hyperparameter.
        target: where the label is in the batch: an index for sequences, a key for mappings
            (or an attribute name for dataclass batches); a dotted path such as ``"1.y"`` or
            ``"0.1"`` reaches into nested batches. ``None``: the last element of a sequence,
            the key ``"y"``, ``"target"`` or ``"label"`` of a mapping (recursively if that
            element is itself a container).
        seed: seed of the noise stream; identical seeds give identical noise, each DDP rank
            draws its own stream.
        schedule: when noise is on, in optimizer steps (``trainer.global_step``):
            ``"constant"``: full level in ``[start_step, stop_step)``;
            ``"window"``: the same, named for when a window is meant;
            ``"periodic"``: on for ``period_on`` steps, off for ``period_off`` steps, repeating
            from ``start_step`` (paper: 5000 / 5000), within ``[start_step, stop_step)``;
            ``"decay"``: level falls *linearly* from full at ``start_step`` to 0 at
            ``decay_until`` and stays 0 after.
        start_step: first optimizer step with noise (steps before it are clean).
        stop_step: first optimizer step without noise again (``None``: never stops).
        period_on: length of the "on" phase of ``"periodic"``, in optimizer steps (> 0).
        period_off: length of the "off" phase of ``"periodic"``, in optimizer steps (> 0).
        decay_until: optimizer step at which ``"decay"`` reaches 0 (> ``start_step``).

    Logged every ``trainer.log_every_n_steps``: ``label_noise/active`` (0/1), the level
    ``label_noise/sigma`` or ``label_noise/flip_prob``, and for flips
    ``label_noise/flipped_frac``, the fraction of labels flipped in that batch.

    Example::

        trainer = Trainer(callbacks=[LabelNoise(kind="flip", flip_prob=0.1, num_classes=10)])
    """

    def __init__(
        self,
        kind: Literal["rademacher", "gaussian", "flip"] = "rademacher",
        sigma: float | list[float] = 4.0,
        flip_prob: float = 0.1,
        num_classes: int | None = None,
        target: int | str | None = None,
        seed: int = 0,
        schedule: Literal["constant", "window", "periodic", "decay"] = "constant",
        start_step: int = 0,
        stop_step: int | None = None,
        period_on: int = 5000,
        period_off: int = 5000,
        decay_until: int | None = None,
    ) -> None:
        if kind not in ("rademacher", "gaussian", "flip"):
            raise ValueError(f"LabelNoise: `kind` must be 'rademacher', 'gaussian' or 'flip', got {kind!r}.")
        sigmas = sigma if isinstance(sigma, (list, tuple)) else [sigma]
        if not sigmas or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in sigmas):
            raise ValueError(
                "LabelNoise: `sigma` must be a finite float >= 0 (the noise level in label units), or a list of them (one"
                f" per stacked replica), got {sigma!r}."
            )
        if not isinstance(flip_prob, (int, float)) or isinstance(flip_prob, bool) or not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"LabelNoise: `flip_prob` must be a probability in [0, 1], got {flip_prob!r}.")
        if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
            raise ValueError(f"LabelNoise: `num_classes` must be an int >= 2 (or None), got {num_classes!r}.")
        if target is not None and not isinstance(target, (int, str)) or isinstance(target, bool):
            raise ValueError(
                f"LabelNoise: `target` must be an int index, a str key / dotted path, or None, got {target!r}."
            )
        if not _is_int(seed):
            raise ValueError(f"LabelNoise: `seed` must be an int, got {seed!r}.")
        if schedule not in ("constant", "window", "periodic", "decay"):
            raise ValueError(
                f"LabelNoise: `schedule` must be 'constant', 'window', 'periodic' or 'decay', got {schedule!r}."
            )
        if not _is_int(start_step) or start_step < 0:
            raise ValueError(f"LabelNoise: `start_step` must be an int >= 0, got {start_step!r}.")
        if stop_step is not None and (not _is_int(stop_step) or stop_step <= start_step):
            raise ValueError(
                f"LabelNoise: `stop_step` must be None or an int > `start_step` ({start_step}), got {stop_step!r}."
            )
        if schedule == "periodic":
            for name, value in (("period_on", period_on), ("period_off", period_off)):
                if not _is_int(value) or value <= 0:
                    raise ValueError(
                        f"LabelNoise: schedule='periodic' needs `{name}` to be a positive int (steps), got {value!r}."
                    )
        if schedule == "decay" and (decay_until is None or not _is_int(decay_until) or decay_until <= start_step):
            raise ValueError(
                "LabelNoise: schedule='decay' needs `decay_until`, the optimizer step at which the level reaches 0,"
                f" as an int > `start_step` ({start_step}); got {decay_until!r}."
            )
        self.kind = kind
        self.sigma: float | list[float] = [float(v) for v in sigmas] if isinstance(sigma, (list, tuple)) else float(sigma)
        self.flip_prob = float(flip_prob)
        self.num_classes = num_classes
        self.target = target
        self.seed = int(seed)
        self.schedule = schedule
        self.start_step = int(start_step)
        self.stop_step = stop_step
        self.period_on = int(period_on)
        self.period_off = int(period_off)
        self.decay_until = decay_until

        self.counter = 0  # training batches (SGD steps) drawn so far: the whole random state
        self._rngs: dict[tuple[Any, int], CounterRNG] = {}
        self._trainer: Trainer | None = None
        self._strategy: Any = None
        self._wrapper: Any = None
        self._saved_attr: Any = None  # the instance attribute `batch_to_device` we shadowed, if any
        self._pending: Any = None  # the noisy batch the wrapper produced, awaiting on_train_batch_start
        self._checked = False  # first-batch checks done
        self._last: dict[str, Any] = {}  # what the last draw did, for logging

    # ------------------------------------------------------------------ schedule

    @property
    def level(self) -> float:
        """The full noise level: σ (label units) or τ (probability); the mean of a per-replica σ list."""
        if self.kind == "flip":
            return self.flip_prob
        return sum(self.sigma) / len(self.sigma) if isinstance(self.sigma, list) else self.sigma

    @property
    def level_name(self) -> str:
        return "flip_prob" if self.kind == "flip" else "sigma"

    def level_at(self, step: int) -> float:
        """The σ (rademacher/gaussian) or τ (flip) in force at optimizer step ``step``; 0 when off.

        With a per-replica σ list this is the mean over replicas (what gets logged).
        """
        return self.level * self.schedule_factor(step)

    def _levels(self, first: int, k: int) -> list[float]:
        """``[level_at(first), …, level_at(first + k − 1)]``; one value repeated when the schedule is flat there."""
        last = first + k - 1
        inside = first >= self.start_step and (self.stop_step is None or last < self.stop_step)
        if k > 1 and inside and self.schedule in ("constant", "window"):  # the fused path's common case
            return [self.level] * k
        return [self.level_at(s) for s in range(first, first + k)]

    def schedule_factor(self, step: int) -> float:
        """The schedule's multiplier of the full level at optimizer step ``step``, in [0, 1]."""
        step = int(step)
        if step < self.start_step or (self.stop_step is not None and step >= self.stop_step):
            return 0.0
        if self.schedule == "periodic":
            on = (step - self.start_step) % (self.period_on + self.period_off) < self.period_on
            return 1.0 if on else 0.0
        if self.schedule == "decay":
            assert self.decay_until is not None
            frac = (self.decay_until - step) / (self.decay_until - self.start_step)
            return max(0.0, frac)
        return 1.0

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._checked = False  # a new fit may bring new data: redo the first-batch checks
        if self.kind == "flip" and self.num_classes is None:
            self.num_classes = _find_num_classes(pl_module, trainer)
            if self.num_classes is None:
                raise ValueError(
                    "LabelNoise: kind='flip' needs `num_classes` (an int >= 2); got None, and neither the"
                    " LightningModule nor the DataModule has a `num_classes` attribute or hyperparameter."
                )
        self._install(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._uninstall()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        pending, self._pending = self._pending, None
        if batch is not pending:
            raise RuntimeError(
                "LabelNoise: the training batch did not pass through `trainer.strategy.batch_to_device`, so no"
                " noise could be added (is `training_step` taking `dataloader_iter`? That mode is not supported)."
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Logged on the SGD-step grid, at TensorBoard step t = SGD steps done, like the model's
        # dynamics tags: the values at t describe SGD step t − 1 (with k steps per batch, the row
        # of that step in the batch, so the fused path logs what k = 1 would).
        every, last = trainer.log_every_n_steps, self._last
        if every <= 0 or not last:
            return
        base, k = last["base"], last["k"]
        grid = range(base + every - base % every, base + k + 1, every)
        if not grid:
            return
        # Logging steps only: the reductions and host syncs below are paid once per log_every_n_steps.
        if self.kind == "flip" and last.get("labels") is not None:
            self._check_class_range(last["labels"])
        for t in grid:
            row = t - 1 - base
            level = last["levels"][row]
            values = {"label_noise/active": float(level > 0), f"label_noise/{self.level_name}": level}
            if self.kind == "flip":
                mask, axis = last.get("mask"), last.get("step_axis")
                if mask is not None and axis is not None:
                    mask = mask.select(axis, row)
                values["label_noise/flipped_frac"] = float(mask.float().mean()) if mask is not None else 0.0
            for logger in trainer.loggers:
                logger.log_metrics(values, step=t)

    def state_dict(self) -> dict[str, Any]:
        return {"counter": self.counter, "seed": self.seed, "kind": self.kind}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counter = int(state_dict["counter"])

    # ------------------------------------------------------------------ the wrapper

    def _install(self, trainer: Trainer) -> None:
        self._uninstall()
        strategy = trainer.strategy
        inner = strategy.batch_to_device  # bound method, or another wrapper (e.g. a second callback)
        self._saved_attr = strategy.__dict__.get("batch_to_device", _MISSING)

        def batch_to_device(batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
            batch = inner(batch, device=device, dataloader_idx=dataloader_idx)
            if trainer.training and batch is not None:
                batch = self.noisy_batch(batch, trainer)
                self._pending = batch
            return batch

        batch_to_device._label_noise = self  # type: ignore[attr-defined]
        strategy.batch_to_device = batch_to_device
        self._trainer, self._strategy, self._wrapper = trainer, strategy, batch_to_device

    def _uninstall(self) -> None:
        strategy, wrapper = self._strategy, self._wrapper
        if strategy is None:
            return
        if strategy.__dict__.get("batch_to_device") is wrapper:
            if self._saved_attr is _MISSING:
                del strategy.batch_to_device
            else:
                strategy.batch_to_device = self._saved_attr
        self._trainer = self._strategy = self._wrapper = self._saved_attr = self._pending = None

    # ------------------------------------------------------------------ noise

    def noisy_batch(self, batch: Any, trainer: Trainer | None = None) -> Any:
        """A copy of ``batch`` whose label is replaced by a noisy copy; ``batch`` is not modified.

        Advances the draw counter by one per SGD step in the batch (one, or ``k`` under the
        fast-engine protocol), whether or not the schedule has noise on at this step.
        """
        module = trainer.lightning_module if trainer is not None else None
        replica_seeds, k, declared = _layout(module)
        base = _steps_done(module, trainer)
        steps = range(base, base + k)
        levels = self._levels(base, k)
        self._last = {"active": any(lv > 0 for lv in levels), "levels": levels, "base": base, "k": k}

        path, labels = _locate(batch, self.target)
        if not self._checked:
            self._check_labels(labels, path, replica_seeds, k)
            self._checked = True
        if labels.device.type == "cpu" and self.kind == "flip":
            self._check_class_range(labels)  # cheap on CPU; on accelerators done at logging steps (a sync)
        lead = ((0 if replica_seeds is None else 1) + 1) if declared else 0  # leading (R?, k) dims of the label
        self._last["step_axis"] = lead - 1 if lead else None
        _check_layout_shape(labels, replica_seeds, k, lead, path)

        rng = self._rng(replica_seeds, 0 if trainer is None else trainer.global_rank)
        if not self._last["active"]:
            self.counter += k  # keep step t's draw the same whatever the schedule did before
            if self.kind == "flip":
                self._last["mask"] = None
                self._last["labels"] = labels
            return batch
        rng.counter = self.counter
        per_step = tuple(labels.shape[lead:])
        n = None if lead == 0 else k
        dev = labels.device
        if isinstance(self.sigma, list) and self.kind != "flip":
            # One σ per stacked replica: (R, k, 1, …) = σ_r × the schedule factor of row i.
            if replica_seeds is None or len(replica_seeds) != len(self.sigma):
                raise ValueError(
                    f"LabelNoise: `sigma` lists {len(self.sigma)} values (one per replica), but the module stacks"
                    f" {0 if replica_seeds is None else len(replica_seeds)} replicas; give one float, or one value"
                    " per replica of a TwoLayerLinear with `replicas`."
                )
            factors = torch.tensor([self.schedule_factor(s) for s in steps], dtype=torch.float64, device=dev)
            sig = torch.tensor(self.sigma, dtype=torch.float64, device=dev)
            level: float | torch.Tensor = (sig[:, None] * factors[None, :]).view(
                len(self.sigma), k, *([1] * len(per_step))
            )
        elif len(set(levels)) == 1:
            level = levels[0]
        else:  # per-row levels under the fast-engine protocol, broadcast over the step axis
            level = torch.tensor(levels, dtype=torch.float64, device=dev).view(k, *([1] * len(per_step)))

        if self.kind == "flip":
            c = int(self.num_classes)  # type: ignore[arg-type]
            z = rng.bits(per_step, n, dev)
            # One 64-bit draw per label (one counter step per SGD step): the high 32 bits decide
            # the flip (P = τ up to 2^-32), the low 32 bits pick an offset in {1..c-1}, so the new
            # class is uniform over the other c-1 classes and never the original.
            u = ((z >> 32) & 0xFFFFFFFF).to(torch.float64) * (2.0**-32)
            offset = 1 + (((z & 0xFFFFFFFF) * (c - 1)) >> 32)
            mask = u < level
            flipped = torch.remainder(labels.to(torch.int64) + offset, c).to(labels.dtype)
            noisy = torch.where(mask, flipped, labels)
            self._last["mask"] = mask
            self._last["labels"] = labels
        else:
            if self.kind == "rademacher":
                eps = rng.rademacher(per_step, n, dev, dtype=labels.dtype)
            else:
                eps = rng.normal(per_step, n, dev, dtype=labels.dtype)
            noisy = labels + (eps * level if isinstance(level, float) else (eps * level).to(labels.dtype))
        self.counter = rng.counter
        return _replace(batch, path, noisy)

    def _rng(self, replica_seeds: list[int] | None, rank: int) -> CounterRNG:
        key = (None if replica_seeds is None else tuple(replica_seeds), rank)
        rng = self._rngs.get(key)
        if rng is None:
            seeds: int | list[int] = (
                self.seed if replica_seeds is None else [replica_stream_seed(self.seed, r) for r in replica_seeds]
            )
            rng = self._rngs[key] = CounterRNG(seeds, stream=_STREAM, rank=rank)
        return rng

    # ------------------------------------------------------------------ checks

    def _check_labels(self, labels: torch.Tensor, path: tuple, replica_seeds: Any, k: int) -> None:
        where = _path_str(path)
        if self.kind == "flip":
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(
                    f"LabelNoise: kind='flip' needs integer class labels, but the label at {where} has dtype"
                    f" {labels.dtype}. Use kind='rademacher' or 'gaussian' for real-valued labels."
                )
        elif not labels.is_floating_point():
            raise ValueError(
                f"LabelNoise: kind={self.kind!r} needs floating-point labels, but the label at {where} has dtype"
                f" {labels.dtype}. Use kind='flip' (with `num_classes`) for integer class labels."
            )

    def _check_class_range(self, labels: torch.Tensor) -> None:
        if labels.numel() == 0:
            return
        lo, hi = int(labels.min()), int(labels.max())
        c = self.num_classes
        if lo < 0 or hi >= c:  # type: ignore[operator]
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"LabelNoise: kind='flip' with num_classes={c} needs labels in [0, {c - 1}], but the batch has"  # type: ignore[operator]
                f" label {bad}. Set `num_classes` to the number of classes."
            )


class _Missing:
    pass


_MISSING = _Missing()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _find_num_classes(pl_module: LightningModule, trainer: Trainer) -> int | None:
    for obj in (pl_module, getattr(pl_module, "hparams", None), getattr(trainer, "datamodule", None)):
        if obj is None:
            continue
        value = obj.get("num_classes") if isinstance(obj, Mapping) else getattr(obj, "num_classes", None)
        if _is_int(value) and value >= 2:
            return int(value)
    return None


def _layout(module: Any) -> tuple[list[int] | None, int, bool]:
    """``(replica_seeds or None, steps_per_batch, declared)`` from the module's :class:`~lightning_lnsgd.protocol.MultiStepModule` layout."""
    layout = step_layout(module)
    if layout is None:
        return None, 1, False
    return (None if layout.replica_seeds is None else list(layout.replica_seeds)), layout.steps, True


def _steps_done(module: Any, trainer: Trainer | None) -> int:
    """The optimizer step of the batch's first SGD step: ``trainer.global_step`` (which counts SGD steps)."""
    return 0 if trainer is None else int(trainer.global_step)


def _check_layout_shape(labels: torch.Tensor, replica_seeds: Any, k: int, lead: int, path: tuple) -> None:
    if lead == 0:
        return
    expect = ([len(replica_seeds)] if replica_seeds is not None else []) + [k]
    if list(labels.shape[:lead]) != expect:
        raise ValueError(
            f"LabelNoise: `label_noise_layout()` says the label has leading dims {tuple(expect)}"
            " (replicas, steps_per_batch), but the label at"
            f" {_path_str(path)} has shape {tuple(labels.shape)}."
        )


# ---------------------------------------------------------------------- batch navigation


def _describe(obj: Any, depth: int = 0) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor({str(obj.dtype).replace('torch.', '')}, {list(obj.shape)})"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v, depth + 1)}" for k, v in obj.items()) + "}"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = ", ".join(f"{f.name}={_describe(getattr(obj, f.name), depth + 1)}" for f in dataclasses.fields(obj))
        return f"{type(obj).__name__}({fields})"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(f"{i}: {_describe(v, depth + 1)}" for i, v in enumerate(obj))
        return f"{type(obj).__name__}[{inner}]"
    return type(obj).__name__


def _path_str(path: tuple) -> str:
    return "batch" + "".join(f"[{p!r}]" for p in path)


def _default_step(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        for key in _DEFAULT_KEYS:
            if key in obj:
                return key
        raise ValueError(
            f"LabelNoise: `target` is None, so the label is looked up under the keys {list(_DEFAULT_KEYS)}, but the"
            f" training batch is a {type(obj).__name__} with keys {list(obj.keys())}. Set `target` to the label's key."
        )
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for key in _DEFAULT_KEYS:
            if hasattr(obj, key):
                return key
        names = [f.name for f in dataclasses.fields(obj)]
        raise ValueError(
            f"LabelNoise: `target` is None, but the training batch {type(obj).__name__} has none of the fields"
            f" {list(_DEFAULT_KEYS)} (it has {names}). Set `target` to the label's field name."
        )
    if isinstance(obj, (tuple, list)) and len(obj) > 0:
        return len(obj) - 1
    raise ValueError(
        "LabelNoise: cannot find a label in the training batch, which is "
        f"{_describe(obj)}. Batches must be a tuple, list, dict or dataclass holding the label; set `target`."
    )


def _child(obj: Any, step: Any, batch: Any, target: Any) -> Any:
    def fail(what: str) -> ValueError:
        return ValueError(
            f"LabelNoise: `target={target!r}` is not in the training batch: {what}. The batch is"
            f" {_describe(batch)}. Set `target` to an index (sequences), a key (mappings) or a dotted path."
        )

    if isinstance(obj, Mapping):
        if step in obj:
            return step
        if isinstance(step, str) and step.lstrip("-").isdigit() and int(step) in obj:
            return int(step)
        raise fail(f"no key {step!r} among {list(obj.keys())}")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(step, str) and hasattr(obj, step):
            return step
        raise fail(f"{type(obj).__name__} has no field {step!r}")
    if isinstance(obj, (tuple, list)):
        if isinstance(step, str) and step.lstrip("-").isdigit():
            step = int(step)
        if _is_int(step) and -len(obj) <= step < len(obj):
            return step % len(obj)
        raise fail(f"index {step!r} is not valid for a {type(obj).__name__} of length {len(obj)}")
    raise fail(f"cannot index a {type(obj).__name__} with {step!r}")


def _get(obj: Any, step: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, (type, Mapping)):
        return getattr(obj, step)
    return obj[step]


def _locate(batch: Any, target: int | str | None) -> tuple[tuple, torch.Tensor]:
    """The path (tuple of keys / indices) to the label tensor, and the tensor."""
    if target is None:
        steps: list[Any] = []
    elif isinstance(target, str) and isinstance(batch, Mapping) and target in batch:
        steps = [target]  # a key that happens to contain dots
    elif isinstance(target, str):
        steps = target.split(".")
    else:
        steps = [target]
    path: list[Any] = []
    obj = batch
    for step in steps:
        key = _child(obj, step, batch, target)
        path.append(key)
        obj = _get(obj, key)
    while target is None and not isinstance(obj, torch.Tensor):  # default: descend into the last element
        key = _default_step(obj)
        path.append(key)
        obj = _get(obj, key)
    if not isinstance(obj, torch.Tensor):
        raise ValueError(
            f"LabelNoise: `target={target!r}` selects {_path_str(tuple(path))}, which is a {type(obj).__name__},"
            f" not a tensor. The batch is {_describe(batch)}."
        )
    return tuple(path), obj


def _replace(obj: Any, path: tuple, value: Any) -> Any:
    """A copy of ``obj`` with the element at ``path`` replaced; containers are shallow-copied, never mutated."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    new_child = _replace(_get(obj, key), rest, value)
    if isinstance(obj, tuple):
        items = list(obj)
        items[key] = new_child
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        return tuple(items) if type(obj) is tuple else type(obj)(items)
    if isinstance(obj, list):
        out = copy.copy(obj)
        out[key] = new_child
        return out
    if isinstance(obj, Mapping):
        try:
            out = copy.copy(obj)
            out[key] = new_child
        except TypeError:  # read-only mapping
            out = {**obj, key: new_child}
        return out
    out = copy.copy(obj)  # dataclass
    object.__setattr__(out, key, new_child)
    return out
