"""The fused path of :class:`~lightning_lnsgd.model.TwoLayerLinear`: k SGD steps per Lightning step.

Per Lightning step the datamodule has drawn the samples of all k steps (and all replicas) and the
:class:`~lightning_lnsgd.LabelNoise` callback has noised their targets, following the
module's ``step_layout()`` (:mod:`lightning_lnsgd.protocol`). The engine runs the k steps with one call of
:func:`lightning_lnsgd.kernels.run_steps` (torch, numba or triton) that returns, for each step of the escape-check
and logging grids, the weights' sums over the neurons (:func:`~lightning_lnsgd.twolayer.dynamics.weight_stats`: the
numba kernel reduces the weights as it produces them, the other backends reduce copies), and records from those, on
the device and without a host sync, the escape step and the dynamics at each logging step. :meth:`FusedEngine.flush`
(called by the model at the end of its training step) writes them to the loggers: the only host syncs are
one per Lightning step.

With the replicas sharded over DDP ranks (:class:`~lightning_lnsgd.twolayer.shard.ReplicaShard`), the engine steps
this rank's block of the stack in place, with the block's η and ρ, and records the block's escapes and dynamics;
:meth:`FusedEngine.flush` then all-gathers the blocks, so that every rank holds, checks and logs the whole stack.
"""

from __future__ import annotations

import threading
import time
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import torch

from ..compat import add_optimizer_steps, rank_zero_info
from ..strategies import sam_settings
from . import kernels
from .data import IndexedInputs
from .dynamics import lazy_from_stats

if TYPE_CHECKING:  # pragma: no cover
    from .model import TwoLayerLinear

__all__ = ["FusedEngine", "HONOURED_PRECISIONS", "prepare_kernel", "refuse_unsupported_settings"]

#: Trainer precisions the fused path honours: it computes in the weights' dtype, which these set (``16-true`` and
#: ``bf16-true`` only on the torch backend; the numba and triton kernels compute in float32 or float64).
HONOURED_PRECISIONS = ("32-true", "64-true", "16-true", "bf16-true")


def refuse_unsupported_settings(model: TwoLayerLinear, trainer: Any) -> None:
    """Raises ``ValueError`` for Trainer settings the fused path of ``model`` would not honour, naming the field,
    its value and ``backend: autograd`` (the generic path, where Lightning applies them).

    The fused path updates the weights itself in closed form, in their dtype, outside Lightning's optimizer loop:
    it has no autocast (mixed precision), no gradient clipping and no gradient accumulation.
    """
    where = (
        f"the fused path (backend={model.hparams.backend!r}, replicas={model.replicas!r}, "
        f"steps_per_batch={model.steps_per_batch})"
    )
    generic = "backend: autograd (the generic path: one unstacked network, steps_per_batch: 1)"
    clip = trainer.gradient_clip_val
    if clip is not None and clip > 0:
        raise ValueError(
            f"TwoLayerLinear: trainer.gradient_clip_val={clip!r} is not applied by {where}, which updates the weights "
            f"in closed form; remove it, or use {generic}."
        )
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"TwoLayerLinear: trainer.accumulate_grad_batches={trainer.accumulate_grad_batches!r} is not applied by "
            f"{where}, which steps at every batch; remove it, or use {generic}."
        )
    precision = str(trainer.precision)
    if precision not in HONOURED_PRECISIONS:
        raise ValueError(
            f"TwoLayerLinear: trainer.precision={precision!r} is not honoured by {where}, which computes in the "
            f"weights' dtype without autocast; use precision {' or '.join(HONOURED_PRECISIONS[:2])}, or {generic}."
        )
    if precision in ("16-true", "bf16-true"):
        try:
            backend = kernels.resolve_backend(model.hparams.backend, trainer.strategy.root_device, tuple(model.W.shape[-2:]))
        except (ImportError, ValueError):
            return  # FusedEngine reports an unusable backend
        if backend != "torch":
            raise ValueError(
                f"TwoLayerLinear: trainer.precision={precision!r} makes the weights half precision, which the {backend} "
                f"kernels of {where} cannot compute in (float32, float64 only); use backend: torch, precision "
                f"32-true or 64-true, or {generic}."
            )


class FusedEngine:
    """Runs the fused closed-form steps of one :class:`TwoLayerLinear` inside a Lightning fit."""

    def __init__(self, model: TwoLayerLinear) -> None:
        trainer = model.trainer
        self.model = model
        #: The replicas this rank steps, as an index of the replica axis: all of them (``...``), or a block of them
        #: when they are sharded over ranks.
        self.rows: slice | EllipsisType = ... if model.shard is None else model.shard.block
        self.backend = kernels.resolve_backend(model.hparams.backend, model.W.device, tuple(model.W.shape[-2:]))
        if self.backend == "numba" and model.shard is not None:
            kernels.share_cpu_threads(trainer.num_devices)
        sam = sam_settings(trainer.strategy)
        if sam is not None and sam[2]:
            raise ValueError(
                "TwoLayerLinear: adaptive SAM (ASAM) is not available on the fused path; use backend='autograd' "
                "with the SAM strategy, or adaptive=False."
            )
        self.sam_rho, self.sam_normalize = (None, True) if sam is None else (sam[0], sam[1])
        if isinstance(self.sam_rho, list):  # one ρ per replica: the strategy checked the count at setup
            self.sam_rho = torch.tensor(self.sam_rho, dtype=model.W.dtype, device=model.W.device)[self.rows]
        lr = model.lr_per_replica[self.rows]
        replicas = "one network" if model.replica_seeds is None else f"{len(model.replica_seeds)} stacked replicas"
        if model.shard is not None:
            replicas += f" sharded over {len(model.shard.sizes)} ranks ({'+'.join(map(str, model.shard.sizes))})"
        rank_zero_info(
            f"TwoLayerLinear: the fused path on the {self.backend} backend ({model.W.device.type}), {replicas}, "
            f"{'SAM' if self.sam_rho is not None else 'SGD'} in closed form, up to {model.steps_per_batch} SGD steps per"
            " Lightning step; W and a are updated by the engine, not by a torch optimizer, and global_step counts SGD"
            " steps."
        )
        prepare_kernel(self.backend, model.W.dtype, self.sam_rho is not None)
        self.lr: float | torch.Tensor = float(lr) if lr.ndim == 0 else lr
        self._pending: list[tuple[list[int], dict[str, torch.Tensor]]] = []
        # Host-side: does some replica still wait for its escape step? Read at flush; once every replica has
        # escaped, the check grid needs no more weight snapshots.
        self._escape_open = not bool((model.escape_step >= 0).all())
        # Per replica, the neuron the numba kernel's escape check looks at first (see run_steps' `track`); any start
        # is correct, so it is not checkpointed.
        self._track = torch.zeros(model.W.shape[:-2], dtype=torch.int64)[self.rows].contiguous()

    #: Upper bound on the weight snapshots one kernel call keeps (bytes); more marks mean more calls.
    SNAPSHOT_BYTES = 64 * 2**20
    #: On the torch and triton backends, indexed inputs (:class:`~lightning_lnsgd.twolayer.data.IndexedInputs`; the
    #: numba kernel reads their rows itself) are gathered and stepped in segments
    #: that end at multiples of this many SGD steps (counted from step 0 of the fit, so that a replica's segments, and
    #: with them its rounding, are the same whatever else is stacked, sharded or resumed): the gathered inputs of
    #: ``R`` replicas hold at most ``R·SEGMENT_STEPS·B·d`` values.
    SEGMENT_STEPS = 256

    @torch.no_grad()
    def run(self, x: torch.Tensor | IndexedInputs, y: torch.Tensor) -> None:
        """Runs the ``k = x.shape[-3]`` SGD steps of one batch and advances ``global_step`` by k.

        The steps on the escape-check grid (until every replica has escaped) and on the logging grid inside the
        batch are the kernel's snapshot steps, where it returns the weights' statistics: one kernel call covers all k
        steps (on the torch and triton backends, which copy the weights out to reduce them, several when the copies
        would exceed :attr:`SNAPSHOT_BYTES`).
        """
        model, trainer = self.model, self.model.trainer
        k = x.shape[-3]
        start = trainer.global_step
        every = trainer.log_every_n_steps
        check = model.recorder.escape_every()
        W, a = model.W.detach()[self.rows], model.a.detach()[self.rows]  # views: the kernel steps them in place
        against = (model.W0[self.rows], model.recorder.teacher())
        marks = set(range(check - start % check, k + 1, check)) if self._escape_open else set()
        if every > 0:
            marks.update(range(every - start % every, k + 1, every))
        # The numba kernel reduces the weights at the marks itself; the other backends copy them out first.
        per_call = len(marks) or 1
        if self.backend != "numba":
            per_call = max(1, self.SNAPSHOT_BYTES // ((W.numel() + a.numel()) * W.element_size()))
        ordered = sorted(marks)
        ends = [ordered[i : i + per_call][-1] for i in range(0, len(ordered), per_call)][:-1]  # the calls' last steps
        indexed = isinstance(x, IndexedInputs)
        if indexed and self.backend != "numba":  # the numba kernel reads the rows itself; the others get them
            seg = self.SEGMENT_STEPS
            ends = sorted(set(ends).union(range(seg - start % seg, k, seg)))
        # The numba kernel skips the statistics nobody reads. At a check step that is no logging step it needs only
        # the escape check (2), and not even that for the replicas that have escaped (0: their escape step is
        # kept). The weights do not depend on it.
        still_in = (model.escape_step[self.rows] < 0) if self.backend == "numba" and self._escape_open else None
        inside_sq = model.recorder.inside_lazy_ball_sq()
        pos = 0
        for end in [*ends, k]:
            group = [t for t in ordered if pos < t <= end]
            needed = None
            if still_in is not None and group:
                logged = torch.tensor([every > 0 and (start + t) % every == 0 for t in group])
                check_only = torch.where(still_in.reshape(1, -1), 2, 0).to(torch.uint8)
                needed = torch.where(logged[:, None], torch.ones((), dtype=torch.uint8), check_only)
            steps = slice(pos, end)
            if not indexed:
                inputs, index = x[..., steps, :, :], None
            elif self.backend == "numba":
                inputs, index = x.source, x.index[..., steps, :]
            else:
                inputs, index = x.gather(steps, W.dtype), None
            out = kernels.run_steps(
                W, a, inputs, y[..., steps, :], self.lr,
                sam_rho=self.sam_rho, sam_normalize=self.sam_normalize, backend=self.backend,
                snapshots=[t - pos for t in group] if group else None, stats_against=against, stats_needed=needed,
                index=index, track=self._track, inside_sq=inside_sq,
            )
            if out is not None:
                self._record([start + t for t in group], out, check, every)
            pos = end
        # Lightning counts optimizer steps; the fused steps are the run's SGD steps.
        add_optimizer_steps(trainer, k)

    def _record(self, steps: list[int], stats: torch.Tensor, check: int, every: int) -> None:
        """Escape check and dynamics from the :func:`~lightning_lnsgd.twolayer.dynamics.weight_stats` of the weights
        at ``steps`` (kept on device)."""
        model = self.model
        at_check = [i for i, s in enumerate(steps) if s % check == 0] if self._escape_open else []
        if at_check:  # the check steps are evenly spaced by `check`
            lazy = lazy_from_stats(_select(stats, at_check), model.W.shape[-2])
            model.recorder.update_escape(steps[at_check[0]], check, lazy, self.rows)
        at_log = [i for i, s in enumerate(steps) if every > 0 and s % every == 0]
        if at_log:
            values = model.recorder.values_from_stats(_select(stats, at_log))
            self._pending.append(([steps[i] for i in at_log], values))

    def flush(self) -> None:
        """Writes the dynamics and escapes of the last Lightning step (host syncs happen here)."""
        model = self.model
        if model.shard is not None:
            self._gather()
        model.recorder.check_finite(model.trainer.global_step)
        if self._escape_open:
            model.recorder.log_new_escapes()
            self._escape_open = model.recorder.escape_open
        last: dict[str, float] = {}
        for steps, values in self._pending:
            last = model.recorder.log_dynamics_at(steps, values)
        if self._pending:
            model.recorder.drain_writers()
        if "train/loss" in last:
            # For StepProgressBar (Lightning's self.log costs ~1 ms a call, more than 1000 fused steps).
            model.progress_metrics = {"loss": last["train/loss"]}
        self._pending.clear()

    @torch.no_grad()
    def _gather(self) -> None:
        """Every rank's block of the weights, the escape steps and the pending dynamics, on every rank (two
        collectives: the weights in their dtype, the rest in float64, which holds steps and float32 values exactly)."""
        model, shard = self.model, self.model.shard
        assert shard is not None
        W, a = model.W.detach(), model.a.detach()
        full_W, full_a = shard.gather(model, [W[shard.block], a[shard.block]], [0, 0], W.dtype)
        W.copy_(full_W)
        a.copy_(full_a)
        steps = [s for group, _ in self._pending for s in group]
        tags = list(self._pending[0][1]) if self._pending else []
        # The snapshot axis first, then the replica axis: one tensor per tag over all pending steps.
        values = [torch.cat([v[tag] for _, v in self._pending]) for tag in tags]
        gathered = shard.gather(model, [model.escape_step[shard.block], *values], [0] + [1] * len(values), torch.float64)
        model.escape_step.copy_(gathered[0])
        self._pending[:] = [(steps, dict(zip(tags, gathered[1:])))] if steps else []


#: Seconds a kernel may take to get ready before the user is told that it is being compiled.
COMPILE_NOTICE_AFTER = 1.0


def prepare_kernel(backend: str, dtype: torch.dtype, sam: bool) -> None:
    """Gets ``backend``'s kernel ready before the first step (see :func:`kernels.prepare`). When that takes longer
    than :data:`COMPILE_NOTICE_AFTER` (numba compiling on a first run, rather than loading its cache), a log line says
    so while it happens, and another how long it took, so that a first run does not look hung."""
    notice = threading.Timer(
        COMPILE_NOTICE_AFTER, rank_zero_info,
        (
            (
                f"TwoLayerLinear: compiling the {backend} kernel (a few seconds, on the first run only: later runs load "
                "it from the disk cache) ..."
            ),
        ),
    )
    notice.daemon = True
    start = time.perf_counter()
    notice.start()
    try:
        kernels.prepare(backend, dtype, sam)
    finally:
        notice.cancel()
    elapsed = time.perf_counter() - start
    if elapsed > COMPILE_NOTICE_AFTER:
        rank_zero_info(f"TwoLayerLinear: the {backend} kernel was ready after {elapsed:.1f} s.")


def _select(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``t[idx]`` along axis 0 without a host sync: a strided view when ``idx`` is evenly spaced (the usual case:
    the logging interval is a multiple of the check interval), else a gather with an index copied asynchronously."""
    steps = {b - a for a, b in zip(idx, idx[1:])}
    if len(steps) <= 1:
        return t[idx[0] : idx[-1] + 1 : steps.pop() if steps else 1]
    index = torch.tensor(idx)
    if t.device.type == "cuda":  # a pageable host-to-device copy would wait for the kernels in flight
        index = index.pin_memory()
    return t.index_select(0, index.to(t.device, non_blocking=True))
