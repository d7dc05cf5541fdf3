"""What :class:`~lightning_lnsgd.TwoLayerLinear` measures and writes: the escape from the lazy ball, the
``dynamics/*`` and loss tags, and the divergence error."""

from __future__ import annotations

from collections.abc import Iterator
from types import EllipsisType
from typing import TYPE_CHECKING

import torch

from ..callbacks._common import log_metrics
from ..callbacks.label_noise import LabelNoise
from ..compat import plain_summary_writer, trainer_of
from ..metrics import lazy_distance
from ..strategies import sam_settings
from . import functional as F
from .dynamics import STATS, dynamics_from_stats, weight_stats
from .replica_runs import ReplicaRuns

if TYPE_CHECKING:  # pragma: no cover
    from .model import TwoLayerLinear

__all__ = ["DivergenceError", "ESCAPE_RESOLUTION", "Recorder"]

#: Steps between two checks of the lazy ball (``phase/escape_step``), whatever the logging interval.
ESCAPE_RESOLUTION = 100


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or weights."""


class Recorder:
    """Escape steps, dynamics tags and divergence checks of one :class:`TwoLayerLinear` (its replicas included).

    The escape steps live in the model's ``escape_step`` buffer (saved in checkpoints); the recorder remembers which
    of them it has written, so each replica's ``phase/escape_step`` is logged once.

    Per-replica values go, for a TensorBoard logger, into each replica's own run (:class:`ReplicaRuns`) under the
    plain tag, and for any other logger into the run itself as ``<tag>/r{k}``; the mean over replicas is the plain
    tag of the run itself. Past ``log_replicas`` replicas only the means are logged (see :attr:`logs_replicas`).
    """

    #: Replicas per block when the whole stack is reduced (statistics, finiteness): bounds the temporaries.
    STATS_BLOCK = 64

    def replica_blocks(
        self, W: torch.Tensor, a: torch.Tensor, *like_W: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(W, a, *like_W)`` cut together along the replica axis (``W``'s axis −3, ``a``'s −2) into blocks of
        :attr:`STATS_BLOCK` replicas, for reductions that are per replica: their temporaries are a block's, not the
        stack's, and their values the same."""
        n = self.STATS_BLOCK
        return zip(W.split(n, -3), a.split(n, -2), *(t.split(n, -3) for t in like_W))

    def __init__(self, model: TwoLayerLinear) -> None:
        self.model = model
        self.logged_escape = torch.zeros(model.W.shape[:-2], dtype=torch.bool)
        #: The replicas' own TensorBoard runs (the model returns it from ``configure_callbacks``).
        self.replica_runs = ReplicaRuns(model)

    def escape_every(self) -> int:
        """SGD steps between two checks of the lazy ball."""
        every = self.model.trainer.log_every_n_steps
        return min(ESCAPE_RESOLUTION, every) if every > 0 else ESCAPE_RESOLUTION

    @property
    def logs_replicas(self) -> bool:
        """Whether per-replica values go to the loggers: a stacked model with at most ``log_replicas`` replicas. Past
        that only the means are logged, and each replica's results are in ``replicas.csv``."""
        K = self.model.replicas
        return K is not None and K <= self.model.hparams.log_replicas

    #: Relative margin of :meth:`inside_lazy_ball_sq`, far above the rounding of a neuron's squared distance.
    INSIDE_MARGIN = 1e-6

    def inside_lazy_ball_sq(self) -> float:
        """A squared distance from its initial weights below which a neuron is inside the lazy ball (radius 1/√m)
        by :attr:`INSIDE_MARGIN`: a replica with such a neuron has not escaped (``lazy_distance ≤ 1``) whatever
        the rounding of the full check. The numba kernel's escape check stops at such a neuron."""
        return (1.0 - self.INSIDE_MARGIN) / self.model.W.shape[-2]

    @property
    def escape_open(self) -> bool:
        """Whether some replica's escape step is still to be logged."""
        return not bool(self.logged_escape.all())

    @torch.no_grad()
    def update_escape(
        self, step: int, every: int = 1, lazy: torch.Tensor | None = None, rows: slice | EllipsisType = ...
    ) -> None:
        """Records the escape step of replicas that are outside the lazy ball for the first time (no host sync).

        ``lazy`` holds ``dynamics/lazy_distance`` at ``S`` check steps ``step, step + every, …`` (shape ``(S,)`` +
        replica axes); by default that of the current weights at ``step``. A replica still inside the ball gets the
        first of them at which it is out. ``rows``: the replicas ``lazy`` covers, as an index of the replica axis (a
        rank's block under DDP; ``...``: all of them).
        """
        model = self.model
        escape = model.escape_step[rows]  # a view: the update writes into the buffer
        if lazy is None:
            lazy = lazy_distance(model.W[rows], model.W0[rows]).unsqueeze(0)
        left = lazy > 1.0  # (S,) + replica axes
        steps = step + every * torch.arange(len(lazy), device=left.device)
        steps = steps.reshape((-1,) + (1,) * (left.ndim - 1))
        first = torch.where(left, steps, torch.iinfo(torch.int64).max).amin(0)
        new = left.any(0) & (escape < 0)
        escape.copy_(torch.where(new, first, escape))

    def log_new_escapes(self) -> None:
        """Logs ``phase/escape_step`` once per replica (into its own run, see :meth:`log_scalars`), at the escape
        step."""
        escape = self.model.escape_step.detach().cpu()
        new = (escape >= 0) & ~self.logged_escape
        if not bool(new.any()):
            return
        self.logged_escape |= new
        if escape.ndim == 0:
            self.log_scalars({"phase/escape_step": float(escape)}, int(escape))
            return
        for k in torch.nonzero(new).flatten().tolist():
            self.log_scalars({}, int(escape[k]), {k: {"phase/escape_step": float(escape[k])}})

    def check_finite(self, step: int) -> None:
        """Raises :class:`DivergenceError` if a replica's weights are not finite at ``step`` (a host sync)."""
        model = self.model
        W, a = model.W.detach(), model.a.detach()
        if W.ndim < 3:
            finite = torch.isfinite(W).all() & torch.isfinite(a).all()
        else:  # isfinite makes a temporary the size of its input
            blocks = self.replica_blocks(W, a)
            finite = torch.cat([torch.isfinite(w).flatten(-2).all(-1) & torch.isfinite(v).all(-1) for w, v in blocks])
        if not bool(finite.all()):
            self.raise_divergence(step, None if finite.ndim == 0 else torch.nonzero(~finite).flatten().tolist())

    @torch.no_grad()
    def values(self, W: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every logged tag (``dynamics/*``, ``train/loss``, ``test/loss``) of the weights ``W``, ``a``, on device."""
        W0, teacher = self.model.W0, self.teacher()
        if W.ndim < 3:
            return self.values_from_stats(weight_stats(W, a, W0, teacher))
        blocks = self.replica_blocks(W, a, W0)
        return self.values_from_stats(torch.cat([weight_stats(w, v, w0, teacher) for w, v, w0 in blocks], -2))

    @torch.no_grad()
    def values_from_stats(self, stats: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tags of :meth:`values` from the :func:`~lightning_lnsgd.twolayer.dynamics.weight_stats` of the
        weights (as the fused numba kernel returns them), float64."""
        model = self.model
        teacher = self.teacher()
        values = {f"dynamics/{k}": v for k, v in dynamics_from_stats(stats, model.W.shape[-2], teacher).items()}
        trainer = trainer_of(model)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is not None and hasattr(dm, "x_train"):
            theta = stats[..., len(STATS) :]
            values["train/loss"] = F.half_mse_of_theta(theta, dm.x_train, dm.y_train)
            values["test/loss"] = F.half_mse_of_theta(theta, dm.x_test, dm.y_test)
        return values

    def teacher(self) -> torch.Tensor:
        """θ⋆ of the datamodule (zeros without one), on the weights' device and in their dtype."""
        model = self.model
        return model.teacher if model.teacher is not None else model.W0.new_zeros(model.W0.shape[-1])

    def log_dynamics(self, step: int) -> None:
        """Logs the tags of the current weights at ``step``."""
        model = self.model
        self.log_dynamics_at([step], {tag: v.unsqueeze(0) for tag, v in self.values(model.W, model.a).items()})

    def log_dynamics_at(self, steps: list[int], values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Logs ``values`` (each ``(len(steps), …)``) at ``steps``: one device-to-host copy per tag.

        Returns the means over replicas logged at the last step."""
        host = {tag: v.detach().double().cpu() for tag, v in values.items()}
        finite = torch.stack([torch.isfinite(v).reshape(len(steps), -1).all(1) for v in host.values()]).all(0)
        if not bool(finite.all()):
            self.raise_divergence(steps[int(torch.nonzero(~finite)[0])])
        # Means and per-replica rows of all steps at once, as Python floats: no tensor op per step and tag.
        means_all = {tag: (v.reshape(len(steps), -1).mean(1) if v.ndim > 1 else v).tolist() for tag, v in host.items()}
        per_replica = {tag: v.tolist() for tag, v in host.items() if v.ndim > 1} if self.logs_replicas else {}
        means: dict[str, float] = {}
        for i, step in enumerate(steps):
            means = {tag: m[i] for tag, m in means_all.items()}
            rows: dict[int, dict[str, float]] = {}
            for tag, v in per_replica.items():
                for k, x in enumerate(v[i]):
                    rows.setdefault(k, {})[tag] = x
            self.log_scalars(means, step, rows)
        return means

    def log_scalars(
        self, values: dict[str, float], step: int, replicas: dict[int, dict[str, float]] | None = None
    ) -> None:
        """Writes ``values`` to every logger at SGD step ``step``, and replica k's ``{tag: value}`` of ``replicas``
        into its own run of a TensorBoard logger, as ``<tag>/r{k}`` (each after its plain tag) to any other logger."""
        replicas = replicas if replicas and self.logs_replicas else {}
        runs = self.replica_runs
        flat: dict[str, float] | None = None
        for logger in self.model.loggers:
            if runs.serves(logger):
                log_metrics(logger, values, step)
                runs.write(logger, replicas, step)
                continue
            if flat is None:
                flat = {}
                for tag in dict.fromkeys([*values, *(t for row in replicas.values() for t in row)]):
                    if tag in values:
                        flat[tag] = values[tag]
                    flat.update({f"{tag}/r{k}": row[tag] for k, row in sorted(replicas.items()) if tag in row})
            log_metrics(logger, flat, step)

    def drain_writers(self) -> None:
        """Waits until the TensorBoard writers this recorder writes to have written out what they were given.

        A ``SummaryWriter`` writes on a thread of its own (about 0.1 ms of Python per event); draining it here, once
        per Lightning step, keeps that work from competing with the next kernel call's threads for the cores."""
        for logger in self.model.loggers:
            writer = plain_summary_writer(logger)
            if writer is not None:
                writer.flush()
        self.replica_runs.flush()

    def raise_divergence(self, step: int, replicas: list[int] | None = None) -> None:
        """Raises :class:`DivergenceError` naming the step, the replicas and what is in play: the step size η in
        force, the label-noise level σ when noise is on at ``step``, SAM's radius ρ when a SAM strategy runs."""
        model = self.model
        trainer = trainer_of(model)
        eta = _worst(self.step_size(), replicas)
        noise = None  # (symbol, level in force) of an active LabelNoise
        for cb in trainer.callbacks if trainer is not None else []:
            if isinstance(cb, LabelNoise):
                level = cb.sigma if cb.kind != "flip" else cb.level
                level = _worst(level, replicas) * cb.schedule_factor(step)
                if level > 0:
                    noise = ("τ" if cb.kind == "flip" else "σ", level)
        sam = sam_settings(trainer.strategy) if trainer is not None else None
        rho = _worst(sam[0], replicas) if sam is not None else None
        where = f" in replicas {replicas}" if replicas else ""
        in_play = [f"η={eta:g}"]
        if noise is not None:
            in_play.append(f"{noise[0]}={noise[1]:g}")
            if noise[0] == "σ":
                in_play.append(f"η·σ={eta * noise[1]:g}")
        if rho is not None:
            in_play.append(f"SAM ρ={rho:g}")
        knobs = ["`model.lr`"]
        if noise is not None:
            knobs.append(f"LabelNoise's `{'sigma' if noise[0] == 'σ' else 'flip_prob'}`")
        if rho is not None:
            knobs.append("the SAM strategy's `rho`")
        if noise is not None and noise[0] == "σ":
            cause = "A step size η too large for the noise level σ (η·σ too large) is the usual cause"
        elif noise is not None:
            cause = "A step size η too large is the usual cause"
        else:
            cause = "The step size η is too large for clean SGD on this data (no label noise is in play)"
        if rho is not None:
            cause += ", or a SAM radius ρ too large for it"
        raise DivergenceError(
            f"Training diverged: non-finite loss or weights at step {step}{where} with {', '.join(in_play)}. "
            f"{cause}; lower {' or '.join(knobs)}."
        )

    def step_size(self) -> float | list[float]:
        """The step size η in force (one per replica with replicas): the optimizer's on the generic path, the
        ``lr_per_replica`` buffer the fused engine steps with otherwise."""
        trainer = trainer_of(self.model)
        if not self.model.fused and trainer is not None and trainer.optimizers:
            return float(trainer.optimizers[0].param_groups[0]["lr"])
        lr = self.model.lr_per_replica.detach().cpu()
        return float(lr) if lr.ndim == 0 else [float(v) for v in lr]


def _worst(value: float | list[float], replicas: list[int] | None) -> float:
    """``value``, or with one value per replica the largest over ``replicas`` (all of them when ``None``)."""
    if not isinstance(value, (list, tuple)):
        return float(value)
    return max(float(value[r]) for r in (replicas if replicas else range(len(value))))
