"""Label-noise SGD as a Lightning callback: fresh noise on the training labels at every step.

:class:`LabelNoise` adds the label noise of the paper (``docs/label-noise.md``, science §3) to an unmodified
LightningModule and DataModule, with either Lightning package (``pytorch_lightning`` or ``lightning.pytorch``):

* ``kind="rademacher"``: ỹ = y + ε with ε uniform on {−σ, +σ} (float labels, any shape);
* ``kind="gaussian"``: ỹ = y + ε with ε ~ N(0, σ²) (float labels, any shape);
* ``kind="flip"``: class labels (integer indices, or one-hot float rows) are redrawn by a noise model,
  ``transition``: ``"symmetric"`` (with probability τ a uniformly drawn *other* class), ``"pair"`` (with
  probability τ, c → (c + 1) mod C) or a C × C row-stochastic matrix T (c → j with probability T[c, j]).

Entries equal to ``ignore_index`` (default −100, PyTorch's padding label) are never changed, never counted and
never range-checked, for every kind.

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
:mod:`lightning_lnsgd.protocol`; the callback knows nothing else about it. Replicas that such a module shards over
DDP ranks draw their own streams with rank 0, whichever rank steps them (the protocol's ``stream_rank``).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch

from ..checks import is_int, is_real
from ..compat import Callback, LightningModule, Trainer, rank_zero_info
from ..protocol import StepLayout, replica_column, step_layout
from . import noise_draw
from ._common import log_metrics
from .batch import Swap, locate, path_str, replace, swap_in
from .label_targets import (
    NUM_CLASSES_NAMES,
    VOCAB_NAME,
    ClassTargets,
    find_num_classes,
    ignored_entries,
)
from .noise_schedule import NoiseSchedule

__all__ = ["NUM_CLASSES_NAMES", "LabelNoise"]

_KINDS = ("rademacher", "gaussian", "flip")

#: The default flip probability τ of ``"symmetric"`` and ``"pair"``.
DEFAULT_FLIP_PROB = 0.1

Transition = Literal["symmetric", "pair"] | list[list[float]] | torch.Tensor


class LabelNoise(Callback):
    r"""Adds fresh label noise to every training batch (label-noise SGD).

    Args:
        kind: ``"rademacher"`` (ε = ±σ, float labels), ``"gaussian"`` (ε ~ N(0, σ²), float labels) or ``"flip"``
            (class labels redrawn by the noise model ``transition``).
        sigma: noise level σ ≥ 0 for rademacher/gaussian, in label units (paper: 4); or a list of them, one per
            stacked replica of a :class:`~lightning_lnsgd.protocol.MultiStepModule` with that many replicas; or
            ``"grid"``: that list, taken at setup from the module's grid axis ``sigma``
            (:func:`~lightning_lnsgd.protocol.replica_column`).
        flip_prob: flip probability τ ∈ [0, 1] of ``transition="symmetric"`` or ``"pair"``; ``None``: 0.1. Must
            be ``None`` with a transition matrix (the matrix holds the probabilities).
        num_classes: number of classes C for ``kind="flip"`` (≥ 2). ``None``: the size of a ``transition``
            matrix, else found at setup (logged with its source): the model's output space (a Hugging Face model's
            ``config.num_labels`` for a ``*Classification`` head, its output embeddings' size for a language-model
            head, else the ``out_features``/``out_channels`` of the last layer with parameters) and the names
            ``num_classes``, ``num_labels`` on the LightningModule, its ``hparams``, its ``model`` attribute and
            that model's ``config``, the module's ``config``, the DataModule and its ``hparams``; sources that
            disagree stop the run. Only when none of them gives a value, ``vocab_size`` at the same places
            (:func:`~lightning_lnsgd.callbacks.label_targets.find_num_classes`).
        target: where the label is in the batch: an index for sequences, a key for mappings (or a field name for
            dataclass batches); a dotted path such as ``"1.y"`` or ``"0.1"`` reaches into nested batches.
            ``None``: the last element of a sequence of two or more, the key ``"y"``, ``"target"``, ``"label"`` or
            ``"labels"`` (Hugging Face batches) of a mapping, first found in that order (recursively if that
            element is itself a container). A batch with no identifiable label (a bare tensor; a one-element
            sequence without ``target``) is refused, never noised.
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
        transition: the flip model of ``kind="flip"``: ``"symmetric"`` (with probability τ, a class drawn uniformly
            from the other C − 1), ``"pair"`` (with probability τ, c → (c + 1) mod C), or a C × C row-stochastic
            matrix T as a nested list or a tensor (label c becomes j with probability T[c, j]; with a schedule
            factor f < 1, the matrix (1 − f)·I + f·T).
        ignore_index: label value that marks "no label" (padding): such entries (for one-hot targets: rows holding
            it) are never changed, never counted in ``label_noise/flipped_frac`` and never range-checked, for every
            kind. Default −100 (PyTorch's ``cross_entropy`` default); 255 for segmentation masks; ``None``: off.

    Labels of ``kind="flip"``: integer class indices in [0, C) of any shape (multi-label 0/1 targets with C = 2:
    each entry flips on its own); or float targets of shape (…, C) whose rows are one-hot, flipped as class
    indices and returned one-hot in the same dtype (float 0/1 targets whose last dim is not C, with C = 2, are
    multi-label). Other float targets (label smoothing, mixup) are refused. An integer dtype that cannot hold
    C − 1 is refused.

    Logged every ``trainer.log_every_n_steps`` SGD steps: ``label_noise/active`` (0/1), the level
    ``label_noise/sigma`` or ``label_noise/flip_prob`` (for a matrix: f · (1/C) Σ_c (1 − T[c, c]), the expected
    fraction changed with balanced classes), and for flips ``label_noise/flipped_frac``, the measured fraction of
    that step's non-ignored labels that changed.

    Example::

        trainer = Trainer(callbacks=[LabelNoise(kind="flip", flip_prob=0.1, num_classes=10)])
    """

    def __init__(
        self,
        kind: Literal["rademacher", "gaussian", "flip"] = "rademacher",
        sigma: float | list[float] | Literal["grid"] = 4.0,
        flip_prob: float | None = None,
        num_classes: int | None = None,
        target: int | str | None = None,
        seed: int = 0,
        schedule: Literal["constant", "periodic", "decay"] = "constant",
        start_step: int = 0,
        stop_step: int | None = None,
        period_on: int = 5000,
        period_off: int = 5000,
        decay_until: int | None = None,
        transition: Transition = "symmetric",
        ignore_index: int | None = -100,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"LabelNoise: `kind` must be 'rademacher', 'gaussian' or 'flip', got {kind!r}.")
        from_grid = isinstance(sigma, str) and sigma == "grid"
        is_list = isinstance(sigma, (list, tuple))
        if not from_grid and not (all(is_real(v, 0) for v in sigma) and len(sigma) > 0 if is_list else is_real(sigma, 0)):
            raise ValueError(
                "LabelNoise: `sigma` must be a finite float >= 0 (the noise level in label units), or a list of them"
                f" (one per stacked replica), or 'grid', got {sigma!r}."
            )
        if flip_prob is not None and not is_real(flip_prob, 0.0, 1.0):
            raise ValueError(f"LabelNoise: `flip_prob` must be a probability in [0, 1] (or None), got {flip_prob!r}.")
        if num_classes is not None and (not is_int(num_classes) or num_classes < 2):
            raise ValueError(f"LabelNoise: `num_classes` must be an int >= 2 (or None), got {num_classes!r}.")
        if isinstance(target, bool) or not (target is None or isinstance(target, (int, str))):
            raise ValueError(
                f"LabelNoise: `target` must be an int index, a str key / dotted path, or None, got {target!r}."
            )
        if not is_int(seed):
            raise ValueError(f"LabelNoise: `seed` must be an int, got {seed!r}.")
        if ignore_index is not None and not is_int(ignore_index):
            raise ValueError(f"LabelNoise: `ignore_index` must be an int (e.g. -100 or 255) or None, got {ignore_index!r}.")
        table = noise_draw.transition_table(transition)
        if table is None and transition not in noise_draw.TRANSITIONS:
            raise ValueError(
                "LabelNoise: `transition` must be 'symmetric', 'pair' or a C x C row-stochastic matrix (nested list"
                f" or tensor), got {transition!r}."
            )
        if kind != "flip" and not (isinstance(transition, str) and transition == "symmetric"):
            raise ValueError(f"LabelNoise: `transition` applies to kind='flip' only, got it with kind={kind!r}.")
        if table is not None:
            if flip_prob is not None:
                raise ValueError(
                    f"LabelNoise: `flip_prob` must not be given with a `transition` matrix (its rows hold the flip"
                    f" probabilities), got flip_prob={flip_prob!r}."
                )
            if num_classes is not None and num_classes != table.num_classes:
                raise ValueError(
                    f"LabelNoise: `num_classes`={num_classes} does not match the {table.num_classes} x"
                    f" {table.num_classes} `transition` matrix; allowed: None or {table.num_classes}."
                )
            num_classes = table.num_classes
        self.schedule = NoiseSchedule(schedule, start_step, stop_step, period_on, period_off, decay_until)
        self.kind = kind
        #: σ in label units, or one σ per stacked replica.
        self.sigma: float | list[float] = (
            [] if from_grid else [float(v) for v in sigma] if is_list else float(sigma)  # type: ignore[union-attr,arg-type]
        )
        #: Whether ``sigma`` is taken from the module's grid (its ``sigma`` axis) at each fit's setup.
        self.sigma_from_grid = from_grid
        #: τ of "symmetric" / "pair"; None with a transition matrix.
        self.flip_prob: float | None = None if table is not None else float(
            DEFAULT_FLIP_PROB if flip_prob is None else flip_prob
        )
        #: "symmetric", "pair" or the matrix's sampler (:class:`~lightning_lnsgd.callbacks.noise_draw.TransitionTable`).
        self.transition: str | noise_draw.TransitionTable = table if table is not None else transition  # type: ignore[assignment]
        #: C of flips: given, the size of a transition matrix, or found at setup (see the ``num_classes`` argument).
        self.num_classes = num_classes
        self._num_classes_given = num_classes
        self.target = target
        self.seed = int(seed)
        self.ignore_index = ignore_index

        #: SGD steps drawn so far (training batches, or k per batch of a multi-step module): the random state.
        self.counter = 0
        self._streams = noise_draw.NoiseStreams(kind, int(seed))
        self._checked = False  # checks of the first training batch done
        self._targets: ClassTargets | None = None  # how flips read the class targets (made once C is known)
        self._swap: Swap | None = None  # the noisy label currently in the training batch
        self._last: dict[str, Any] = {}  # what the last draw did, for logging

    # ------------------------------------------------------------------ levels

    @property
    def level(self) -> float:
        """The full noise level: σ (label units) or τ (probability); for a transition matrix the expected fraction
        of labels changed with balanced classes, (1/C) Σ_c (1 − T[c, c]); the mean of a per-replica σ list."""
        if self.kind == "flip":
            table = self.transition
            return table.mean_flip_rate() if isinstance(table, noise_draw.TransitionTable) else float(self.flip_prob)  # type: ignore[arg-type]
        if self.sigma_from_grid and not self.sigma:
            raise RuntimeError(
                "LabelNoise: sigma='grid' takes its values from the module's grid at the fit's setup; the level is "
                "not known before the fit starts."
            )
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
        self._targets = None
        if self.sigma_from_grid:
            self.sigma = replica_column(pl_module, "sigma", "LabelNoise")
        if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
            raise ValueError(
                f"LabelNoise: {type(pl_module).__name__}.training_step takes `dataloader_iter`, so its batches never"
                " pass through on_train_batch_start; label noise needs training_step(batch, batch_idx)."
            )
        if self.kind == "flip" and self._num_classes_given is None:
            found = find_num_classes(pl_module, getattr(trainer, "datamodule", None))
            if found.value is None:
                raise ValueError(
                    f"LabelNoise: kind='flip' needs `num_classes` (an int >= 2); got None, the model's output layer"
                    f" does not give it, and none of the names {', '.join((*NUM_CLASSES_NAMES, VOCAB_NAME))} holds"
                    f" an int >= 2 on {'; '.join(found.looked[1:])}. Set `num_classes`."
                )
            self.num_classes = found.value
            rank_zero_info(f"LabelNoise: num_classes={found.value}, from {found.source}.")

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

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._raise_invalid()  # the end of fit is a host sync point: report what the last steps saw

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
        Invalid labels are reported at once, on any device.
        """
        path, noisy = self._draw(batch, trainer)
        self._raise_invalid()
        return batch if noisy is None else replace(batch, path, noisy)

    def _draw(self, batch: Any, trainer: Trainer | None) -> tuple[tuple, torch.Tensor | None]:
        """The path to the label and the noisy label of the coming step(s); ``None`` when noise is off."""
        layout = step_layout(trainer.lightning_module) if trainer is not None else None
        replica_seeds = None if layout is None or layout.replica_seeds is None else tuple(layout.replica_seeds)
        k = 1 if layout is None else layout.steps
        lead = 0 if layout is None else len(layout.leading_shape)  # leading (R?, k) axes of the label
        first = 0 if trainer is None else int(trainer.global_step)  # counts SGD steps on every path (protocol)
        factors = self.schedule.factors(first, k)
        full_level = self.level  # a property: read once, not once per SGD step
        levels = [full_level * f for f in factors]
        self._last = {"levels": levels, "first": first, "k": k, "step_axis": lead - 1 if lead else None}

        path, labels = locate(batch, self.target)
        first_batch = not self._checked
        if first_batch:
            self._check_dtype(labels, path)
            self._checked = True
        if layout is not None and tuple(labels.shape[:lead]) != layout.leading_shape:
            raise ValueError(
                f"LabelNoise: the module's step_layout() implies leading label dims {layout.leading_shape}"
                f" (replicas, steps), but the label at {path_str(path)} has shape {tuple(labels.shape)}."
            )
        ignored = ignored_entries(labels, self.ignore_index)
        classes, keep = labels, None if ignored is None else ~ignored
        if self.kind == "flip":
            classes, counted, keep = self._class_targets().classes(labels, ignored, path)
            self._last.update(mask=None, counted=counted)
            # On the CPU (and on the first batch anywhere) a bad label stops the fit at once; on an accelerator the
            # flag stays on the device and is raised at the next logging step or at the end of fit, without a host
            # sync per batch. Bad entries are never changed meanwhile (they are left out of `keep`).
            if labels.device.type == "cpu" or first_batch:
                self._raise_invalid()
        self._check_sigma(layout)
        if not any(level > 0 for level in levels):
            self.counter += k  # step t's draw stays the same whatever the schedule did before
            return path, None

        shape = tuple(classes.shape[lead:])
        matrix = isinstance(self.transition, noise_draw.TransitionTable)
        replica_levels = None  # one σ per row of the replica axis (a rank's block of replicas when they are sharded)
        if isinstance(self.sigma, list) and self.kind != "flip" and layout is not None:
            replica_levels = [self.sigma[i] for i in layout.rows() or ()]
        # A matrix's draw takes the schedule factor f: a label is redrawn from T with probability f.
        full = 1.0 if matrix else self.level
        level = noise_draw.label_levels(factors, full, replica_levels, labels.device, len(shape))
        noisy, mask, self.counter = self._streams.draw(
            classes, self.counter, self._stream_rank(trainer, layout), replica_seeds,
            None if lead == 0 else k, lead, level, self.num_classes, self.transition, keep,
        )
        if self.kind == "flip":
            self._last["mask"] = mask
            if self._class_targets().one_hot:
                noisy = self._class_targets().to_one_hot(noisy, mask, labels)  # type: ignore[arg-type]
        return path, noisy

    @staticmethod
    def _stream_rank(trainer: Trainer | None, layout: StepLayout | None) -> int:
        """The rank mixed into the noise stream: the trainer's, except for replicas sharded over ranks (protocol)."""
        rank = 0 if trainer is None else int(trainer.global_rank)
        return rank if layout is None else layout.stream_rank(rank)

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
        self._raise_invalid()
        if not trainer.loggers:
            return
        for t in grid:
            row = t - 1 - first
            level = last["levels"][row]
            values = {"label_noise/active": float(level > 0), f"label_noise/{self.level_name}": level}
            if self.kind == "flip":
                values["label_noise/flipped_frac"] = self._flipped_frac(last["mask"], last["counted"], row)
            for logger in trainer.loggers:
                log_metrics(logger, values, t)

    def _flipped_frac(self, mask: torch.Tensor | None, counted: torch.Tensor | None, row: int) -> float:
        """The fraction of the non-ignored labels of step row ``row`` that changed."""
        if mask is None:
            return 0.0
        axis = self._last["step_axis"]
        if axis is not None:
            mask = mask.select(axis, row)
            counted = None if counted is None else counted.select(axis, row)
        if counted is None:
            return float(mask.float().mean()) if mask.numel() else 0.0
        total = int(counted.sum())
        return float((mask & counted).sum()) / total if total else 0.0

    # ------------------------------------------------------------------ checks

    def _check_sigma(self, layout: StepLayout | None) -> None:
        if not isinstance(self.sigma, list) or self.kind == "flip":
            return
        replicas = 0 if layout is None or layout.replicas is None else layout.total_replicas
        if replicas != len(self.sigma):
            raise ValueError(
                f"LabelNoise: `sigma` lists {len(self.sigma)} values (one per stacked replica), but the module stacks"
                f" {replicas} replicas; allowed: one float, or one value per replica of a MultiStepModule."
            )

    def _check_dtype(self, labels: torch.Tensor, path: tuple) -> None:
        """First-batch checks of the label's dtype (for flips, of which kind of class target it is)."""
        if self.kind == "flip":
            self._class_targets().check_first(labels, path_str(path))
        elif not labels.is_floating_point():
            raise ValueError(
                f"LabelNoise: kind={self.kind!r} needs floating-point labels, but the label at {path_str(path)} has"
                f" dtype {labels.dtype}. Use kind='flip' (with `num_classes`) for integer class labels."
            )

    def _class_targets(self) -> ClassTargets:
        if self._targets is None:
            self._targets = ClassTargets(int(self.num_classes), self.ignore_index)  # type: ignore[arg-type]
        return self._targets

    def _raise_invalid(self) -> None:
        if self._targets is not None:
            self._targets.invalid.raise_if_any()
