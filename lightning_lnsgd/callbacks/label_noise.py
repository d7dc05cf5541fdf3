"""Label-noise SGD as a Lightning callback: fresh noise on the training labels at every step.

:class:`LabelNoise` adds the label noise of the paper (``docs/label-noise.md``, science §3) to an unmodified
LightningModule and DataModule, with either Lightning package (``pytorch_lightning`` or ``lightning.pytorch``):

* ``kind="rademacher"``: ỹ = y + ε with ε uniform on {−σ, +σ} (float labels, any shape);
* ``kind="gaussian"``: ỹ = y + ε with ε ~ N(0, σ²) (float labels, any shape);
* ``kind="flip"``: with probability τ each integer class label is replaced by a class drawn uniformly from the
  *other* ``num_classes − 1`` classes.

Mechanism (public callback hooks only). Lightning passes the same batch object to ``on_train_batch_start`` and to
``training_step``. In ``on_train_batch_start`` the callback puts the noisy label into that object
(:func:`~lightning_lnsgd.callbacks.batch.swap_in`: into the deepest mutable container on the path to the label, or,
with none, into the label tensor's values); in ``on_train_batch_end`` it puts the original back exactly, so
whatever the DataLoader yielded and the dataset hold are unchanged after every step. Validation, test and predict
batches never pass through these hooks.

Randomness comes from :class:`~lightning_lnsgd.rng.CounterRNG` (stream ``"label_noise"``,
``rank = trainer.global_rank``): the draw of SGD step ``t`` is a pure function of ``(seed, rank, t)``. The draw
counter advances by one per SGD step whether or not noise is on, is saved in the checkpoint, and is therefore
resume-exact. A module that runs several SGD steps or stacked replicas per Lightning step says so through
:mod:`lightning_lnsgd.protocol`; the callback knows nothing else about it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch

from ..checks import is_int, is_real
from ..compat import Callback, LightningModule, Trainer
from ..protocol import StepLayout, step_layout
from . import noise_draw
from .batch import Swap, locate, path_str, replace, swap_in
from .noise_schedule import NoiseSchedule

__all__ = ["LabelNoise"]

_KINDS = ("rademacher", "gaussian", "flip")



class LabelNoise(Callback):
    r"""Adds fresh label noise to every training batch (label-noise SGD).

    Args:
        kind: ``"rademacher"`` (ε = ±σ, float labels), ``"gaussian"`` (ε ~ N(0, σ²), float labels) or ``"flip"``
            (integer class labels, replaced with probability τ by a uniformly drawn *different* class).
        sigma: noise level σ ≥ 0 for rademacher/gaussian, in label units (paper: 4); or a list of them, one per
            stacked replica of a :class:`~lightning_lnsgd.protocol.MultiStepModule` with that many replicas.
        flip_prob: flip probability τ ∈ [0, 1] for ``kind="flip"``.
        num_classes: number of classes for ``kind="flip"`` (≥ 2). ``None``: taken at setup from the
            LightningModule's or DataModule's ``num_classes`` attribute / hyperparameter.
        target: where the label is in the batch: an index for sequences, a key for mappings (or a field name for
            dataclass batches); a dotted path such as ``"1.y"`` or ``"0.1"`` reaches into nested batches.
            ``None``: the last element of a sequence, the key ``"y"``, ``"target"`` or ``"label"`` of a mapping
            (recursively if that element is itself a container).
        seed: seed of the noise stream; identical seeds give identical noise, each DDP rank draws its own stream.
        schedule: when noise is on, in optimizer steps (``trainer.global_step``), see
            :class:`~lightning_lnsgd.callbacks.noise_schedule.NoiseSchedule`: ``"constant"`` (full level in
            ``[start_step, stop_step)``), ``"periodic"`` (``period_on`` steps on, ``period_off`` off; paper:
            5000 / 5000) or ``"decay"`` (linear from full at ``start_step`` to 0 at ``decay_until``).
        start_step: first optimizer step with noise (steps before it are clean).
        stop_step: first optimizer step without noise again (``None``: never stops).
        period_on: length of the "on" phase of ``"periodic"``, in optimizer steps (> 0).
        period_off: length of the "off" phase of ``"periodic"``, in optimizer steps (> 0).
        decay_until: optimizer step at which ``"decay"`` reaches 0 (> ``start_step``).

    Logged every ``trainer.log_every_n_steps`` SGD steps: ``label_noise/active`` (0/1), the level
    ``label_noise/sigma`` or ``label_noise/flip_prob``, and for flips ``label_noise/flipped_frac``, the fraction
    of that step's labels that were flipped.

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
        schedule: Literal["constant", "periodic", "decay"] = "constant",
        start_step: int = 0,
        stop_step: int | None = None,
        period_on: int = 5000,
        period_off: int = 5000,
        decay_until: int | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"LabelNoise: `kind` must be 'rademacher', 'gaussian' or 'flip', got {kind!r}.")
        is_list = isinstance(sigma, (list, tuple))
        if not (all(is_real(v, 0) for v in sigma) and len(sigma) > 0 if is_list else is_real(sigma, 0)):
            raise ValueError(
                "LabelNoise: `sigma` must be a finite float >= 0 (the noise level in label units), or a list of them"
                f" (one per stacked replica), got {sigma!r}."
            )
        if not is_real(flip_prob, 0.0, 1.0):
            raise ValueError(f"LabelNoise: `flip_prob` must be a probability in [0, 1], got {flip_prob!r}.")
        if num_classes is not None and (not is_int(num_classes) or num_classes < 2):
            raise ValueError(f"LabelNoise: `num_classes` must be an int >= 2 (or None), got {num_classes!r}.")
        if isinstance(target, bool) or not (target is None or isinstance(target, (int, str))):
            raise ValueError(
                f"LabelNoise: `target` must be an int index, a str key / dotted path, or None, got {target!r}."
            )
        if not is_int(seed):
            raise ValueError(f"LabelNoise: `seed` must be an int, got {seed!r}.")
        self.schedule = NoiseSchedule(schedule, start_step, stop_step, period_on, period_off, decay_until)
        self.kind = kind
        #: σ in label units, or one σ per stacked replica.
        self.sigma: float | list[float] = (
            [float(v) for v in sigma] if is_list else float(sigma)  # type: ignore[union-attr,arg-type]
        )
        self.flip_prob = float(flip_prob)
        self.num_classes = num_classes
        self.target = target
        self.seed = int(seed)

        #: SGD steps drawn so far (training batches, or k per batch of a multi-step module): the random state.
        self.counter = 0
        self._streams = noise_draw.NoiseStreams(kind, int(seed))
        self._checked = False  # dtype checks of the first training batch done
        self._swap: Swap | None = None  # the noisy label currently in the training batch
        self._last: dict[str, Any] = {}  # what the last draw did, for logging

    # ------------------------------------------------------------------ levels

    @property
    def level(self) -> float:
        """The full noise level: σ (label units) or τ (probability); the mean of a per-replica σ list."""
        if self.kind == "flip":
            return self.flip_prob
        return sum(self.sigma) / len(self.sigma) if isinstance(self.sigma, list) else self.sigma

    @property
    def level_name(self) -> str:
        """``"flip_prob"`` or ``"sigma"``: the name of the level in the logged tags."""
        return "flip_prob" if self.kind == "flip" else "sigma"

    def schedule_factor(self, step: int) -> float:
        """The schedule's multiplier of the full level at optimizer step ``step``, in [0, 1]."""
        return self.schedule.factor(step)

    def level_at(self, step: int) -> float:
        """The σ (rademacher/gaussian) or τ (flip) in force at optimizer step ``step``; 0 when off.

        With a per-replica σ list this is the mean over replicas (what gets logged).
        """
        return self.level * self.schedule_factor(step)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._checked = False  # a new fit may bring new data: redo the first-batch checks
        if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
            raise ValueError(
                f"LabelNoise: {type(pl_module).__name__}.training_step takes `dataloader_iter`, so its batches never"
                " pass through on_train_batch_start; label noise needs training_step(batch, batch_idx)."
            )
        if self.kind == "flip" and self.num_classes is None:
            self.num_classes = _find_num_classes(pl_module, trainer)
            if self.num_classes is None:
                raise ValueError(
                    "LabelNoise: kind='flip' needs `num_classes` (an int >= 2); got None, and neither the"
                    " LightningModule nor the DataModule has a `num_classes` attribute or hyperparameter."
                )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_sigma(step_layout(pl_module))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._restore()  # a batch skipped by the module's on_train_batch_start (-1) never reached on_train_batch_end
        path, noisy = self._draw(batch, trainer)
        if noisy is not None:
            self._swap = swap_in(batch, path, noisy)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._restore()
        self._log(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def state_dict(self) -> dict[str, Any]:
        return {"counter": self.counter, "seed": self.seed, "kind": self.kind}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counter = int(state_dict["counter"])

    def _restore(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.restore()

    # ------------------------------------------------------------------ noise

    def noisy_batch(self, batch: Any, trainer: Trainer | None = None) -> Any:
        """A copy of ``batch`` whose label is replaced by a noisy copy; ``batch`` is not modified.

        Draws the noise of the coming step(s) of ``trainer`` (``trainer.global_step``, ``global_rank`` and the
        :mod:`~lightning_lnsgd.protocol` layout of ``trainer.lightning_module``; step 0, rank 0, one step without
        a trainer) and advances the draw counter by one per SGD step, whether or not the schedule has noise on.
        """
        path, noisy = self._draw(batch, trainer)
        return batch if noisy is None else replace(batch, path, noisy)

    def _draw(self, batch: Any, trainer: Trainer | None) -> tuple[tuple, torch.Tensor | None]:
        """The path to the label and the noisy label of the coming step(s); ``None`` when noise is off."""
        layout = step_layout(trainer.lightning_module) if trainer is not None else None
        replica_seeds = None if layout is None or layout.replica_seeds is None else tuple(layout.replica_seeds)
        k = 1 if layout is None else layout.steps
        lead = 0 if layout is None else len(layout.leading_shape)  # leading (R?, k) axes of the label
        first = 0 if trainer is None else int(trainer.global_step)  # counts SGD steps on every path (protocol)
        factors = self.schedule.factors(first, k)
        levels = [self.level * f for f in factors]
        self._last = {"levels": levels, "first": first, "k": k, "step_axis": lead - 1 if lead else None}

        path, labels = locate(batch, self.target)
        if not self._checked:
            self._check_dtype(labels, path)
            self._checked = True
        if layout is not None and tuple(labels.shape[:lead]) != layout.leading_shape:
            raise ValueError(
                f"LabelNoise: the module's step_layout() implies leading label dims {layout.leading_shape}"
                f" (replicas, steps), but the label at {path_str(path)} has shape {tuple(labels.shape)}."
            )
        if self.kind == "flip":
            self._last.update(labels=labels, mask=None)
            if labels.device.type == "cpu":
                self._check_class_range(labels)  # cheap on CPU; on accelerators done at logging steps (a sync)
        self._check_sigma(layout)
        if not any(level > 0 for level in levels):
            self.counter += k  # step t's draw stays the same whatever the schedule did before
            return path, None

        shape = tuple(labels.shape[lead:])
        replica_levels = self.sigma if isinstance(self.sigma, list) and self.kind != "flip" else None
        level = noise_draw.label_levels(factors, self.level, replica_levels, labels.device, len(shape))
        noisy, mask, self.counter = self._streams.draw(
            labels, self.counter, 0 if trainer is None else trainer.global_rank, replica_seeds,
            None if lead == 0 else k, lead, level, self.num_classes,
        )
        self._last["mask"] = mask
        return path, noisy

    # ------------------------------------------------------------------ logging

    def _log(self, trainer: Trainer) -> None:
        # On the SGD-step grid, at step t = SGD steps done (the model's dynamics tags use the same grid): the values
        # at t describe SGD step t − 1, row t − 1 − first of the batch, so k steps per batch log what k = 1 would.
        every, last = trainer.log_every_n_steps, self._last
        if every <= 0 or not last:
            return
        first, k = last["first"], last["k"]
        grid = range(first + every - first % every, first + k + 1, every)
        if not grid:
            return
        # Only at logging steps: the reductions and host syncs below are paid once per log_every_n_steps.
        if self.kind == "flip":
            self._check_class_range(last["labels"])
        if not trainer.loggers:
            return
        for t in grid:
            row = t - 1 - first
            level = last["levels"][row]
            values = {"label_noise/active": float(level > 0), f"label_noise/{self.level_name}": level}
            if self.kind == "flip":
                mask = last["mask"]
                if mask is not None and last["step_axis"] is not None:
                    mask = mask.select(last["step_axis"], row)
                values["label_noise/flipped_frac"] = float(mask.float().mean()) if mask is not None else 0.0
            for logger in trainer.loggers:
                logger.log_metrics(values, step=t)

    # ------------------------------------------------------------------ checks

    def _check_sigma(self, layout: StepLayout | None) -> None:
        if not isinstance(self.sigma, list) or self.kind == "flip":
            return
        replicas = 0 if layout is None or layout.replicas is None else layout.replicas
        if replicas != len(self.sigma):
            raise ValueError(
                f"LabelNoise: `sigma` lists {len(self.sigma)} values (one per stacked replica), but the module stacks"
                f" {replicas} replicas; allowed: one float, or one value per replica of a MultiStepModule."
            )

    def _check_dtype(self, labels: torch.Tensor, path: tuple) -> None:
        where = path_str(path)
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
        c = int(self.num_classes)  # type: ignore[arg-type]
        if lo < 0 or hi >= c:
            raise ValueError(
                f"LabelNoise: kind='flip' with num_classes={c} needs labels in [0, {c - 1}], but the batch has"
                f" label {lo if lo < 0 else hi}. Set `num_classes` to the number of classes."
            )


def _find_num_classes(pl_module: LightningModule, trainer: Trainer) -> int | None:
    for obj in (pl_module, getattr(pl_module, "hparams", None), getattr(trainer, "datamodule", None)):
        if obj is None:
            continue
        value = obj.get("num_classes") if isinstance(obj, Mapping) else getattr(obj, "num_classes", None)
        if is_int(value) and value >= 2:
            return int(value)
    return None
