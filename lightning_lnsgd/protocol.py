"""The contract between the plug-ins and a LightningModule that runs many SGD steps per Lightning step.

The plug-ins (:class:`~lightning_lnsgd.LabelNoise`, the SAM strategies) work on any LightningModule, where one
Lightning step is one SGD step of one network. A module may instead fuse work into one Lightning step: run ``k``
SGD steps on a batch that holds the samples of all of them, and/or train ``R`` independent networks ("replicas")
stacked along a leading axis. Such a module tells the plug-ins so by implementing :class:`MultiStepModule`; the
plug-ins know nothing else about it. The paper's :class:`~lightning_lnsgd.TwoLayerLinear` implements it on its fused
path; a module that does not implement it is treated as one network, one SGD step per Lightning step.

What each side relies on:

* **Noise layout** (:meth:`MultiStepModule.step_layout`). For the coming Lightning step the module returns a
  :class:`StepLayout`, or ``None`` when it runs one plain SGD step (its generic path). With a layout, the label
  tensor of the training batch has leading axes ``(R, k)`` (replicas) or ``(k,)`` (no replicas): row ``i`` holds the
  labels of SGD step ``trainer.global_step + i``. ``LabelNoise`` draws one noise row per SGD step, so a fused run sees
  exactly the noise that ``k`` Lightning steps of one SGD step each would see, and replica ``r`` draws from its own
  stream, seeded by ``replica_seeds[r]``: the same replica seed gives the same noise whatever else is stacked.
* **Step count**. The module advances ``trainer.global_step`` by the ``k`` SGD steps it ran, so schedules, logging
  intervals and ``max_steps`` count SGD steps on every path.
* **SAM** (:attr:`MultiStepModule.runs_sam_step`). ``True`` means the module applies the SAM step itself inside its
  fused steps, with the strategy's ``rho``, ``normalize`` and ``adaptive``; the SAM strategy then runs no step of its
  own and leaves the module's (manual) optimisation alone. The strategy refuses ``every_n_steps`` other than 1 for
  such a module.
* **Per-replica settings**. A plug-in setting given as a list (``LabelNoise(sigma=[…])``, ``SAMStrategy(rho=[…])``)
  has one value per replica of the whole module (:attr:`StepLayout.total_replicas`); it is accepted only for a module
  whose layout has exactly that many replicas (and, for ``rho``, that runs the SAM step itself). Row ``i`` of the batch
  takes the value of replica ``replica_index[i]``.
* **Replicas sharded over DDP ranks** (:attr:`StepLayout.replica_index`). A module may split its ``K`` replicas over
  the ranks of a distributed run, each rank stepping a block of them: its layout then lists, in
  ``replica_index``, the replicas (indices in ``0 … K−1``) whose rows this rank's batch holds, and ``replica_seeds``
  holds their seeds only. The streams of a sharded batch are the replicas' own: the plug-ins draw them with the
  rank that :meth:`StepLayout.stream_rank` returns (0, whichever rank runs the replica), so a replica sees the same
  samples and noise as in a one-process run. Without ``replica_index`` the batch holds all replicas (or one
  network), and each rank draws its own streams (the rank is mixed in), as for any DDP module.
* **Per-replica hyper-parameters** (:meth:`MultiStepModule.replica_settings`). A module with stacked replicas says
  what each replica runs with: one flat dict per replica (``{"seed": 3, "lr": 0.001, "sigma": 4.0}``), or ``None``.
  The :class:`~lightning_lnsgd.HParamsSummary` callback then adds them as ``replica/<name>`` columns of TensorBoard's
  HPARAMS tab, for the rows that the module writes, one per replica.
* **A grid of replicas** (:class:`GridModule`, optional). A module that stacks its replicas from named axes (the
  product of ``sigma``, ``lr``, ``seed``, ``rho``, …) returns the column of one axis, one value per replica of the
  whole module, from ``grid_column(name)``. A plug-in setting written as ``"grid"`` (``LabelNoise(sigma="grid")``,
  ``SAMStrategy(rho="grid")``) takes that column at setup (:func:`replica_column`), so that no list is written twice;
  it then behaves exactly as the same list written out.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol, runtime_checkable

from .checks import is_int

__all__ = [
    "GridModule", "MultiStepModule", "StepLayout", "replica_column", "replica_settings", "runs_sam_step", "step_layout"
]


class StepLayout(NamedTuple):
    """How one Lightning step's batch is laid out: see :mod:`lightning_lnsgd.protocol`."""

    #: One noise-stream seed per stacked replica (leading label axis ``R``), or ``None`` for one network.
    replica_seeds: Optional[tuple[int, ...]]
    #: SGD steps ``k`` run in this Lightning step (label axis after the replica axis), ≥ 1.
    steps: int
    #: With replicas sharded over DDP ranks: the index (in ``0 … total_replicas − 1``) of the replica of each row of
    #: the replica axis, one per ``replica_seeds`` entry; ``None``: the batch holds all replicas, in order.
    replica_index: Optional[tuple[int, ...]] = None
    #: With ``replica_index``: ``K``, the number of replicas of the whole module (all ranks together).
    total: Optional[int] = None

    @property
    def replicas(self) -> Optional[int]:
        """``R``, the number of stacked replicas in this batch, or ``None``."""
        return None if self.replica_seeds is None else len(self.replica_seeds)

    @property
    def total_replicas(self) -> Optional[int]:
        """``K``, the replicas of the whole module (``R`` unless they are sharded over ranks), or ``None``."""
        return self.total if self.replica_index is not None else self.replicas

    def rows(self) -> Optional[tuple[int, ...]]:
        """The replica index of each row of the replica axis (``0 … R−1`` unsharded), or ``None``."""
        if self.replica_seeds is None:
            return None
        return self.replica_index if self.replica_index is not None else tuple(range(len(self.replica_seeds)))

    def stream_rank(self, rank: int) -> int:
        """The rank to mix into the random streams of this batch: 0 when sharded (a replica's streams are its own,
        whichever rank steps it), else ``rank`` (each rank draws its own)."""
        return 0 if self.replica_index is not None else int(rank)

    @property
    def leading_shape(self) -> tuple[int, ...]:
        """The leading label axes the layout implies: ``(R, k)`` or ``(k,)``."""
        return (self.steps,) if self.replica_seeds is None else (len(self.replica_seeds), self.steps)


@runtime_checkable
class MultiStepModule(Protocol):
    """A LightningModule that runs ``k`` SGD steps and/or ``R`` stacked replicas per Lightning step."""

    @property
    def runs_sam_step(self) -> bool:
        """Whether the module applies the SAM step itself (see :mod:`lightning_lnsgd.protocol`)."""
        ...

    def step_layout(self) -> Optional[StepLayout]:
        """The layout of the coming Lightning step's batch, or ``None`` for one plain SGD step."""
        ...

    def replica_settings(self) -> Optional[list[dict[str, Any]]]:
        """One flat ``{name: bool, int, float or str}`` per stacked replica, the same names in each; ``None`` for one
        network. Called while the module is attached to a trainer (from ``on_fit_start`` on)."""
        ...


@runtime_checkable
class GridModule(Protocol):
    """A module whose stacked replicas are the product of named axes (see :mod:`lightning_lnsgd.protocol`)."""

    def grid_column(self, name: str) -> Optional[list[float]]:
        """The value of axis ``name`` for each replica of the whole module, in replica order; ``None`` when the
        module has no such axis."""
        ...


def replica_column(module: object, name: str, owner: str) -> list[float]:
    """The per-replica values of the grid axis ``name`` of ``module``, for a plug-in setting written ``"grid"``.

    ``owner`` names the plug-in in the error raised when ``module`` declares no such axis.

    >>> class Grid:
    ...     def grid_column(self, name):
    ...         return [1.0, 1.0, 2.0, 2.0] if name == "sigma" else None
    >>> replica_column(Grid(), "sigma", "LabelNoise")
    [1.0, 1.0, 2.0, 2.0]
    """
    column = module.grid_column(name) if isinstance(module, GridModule) else None
    if column is None:
        raise ValueError(
            f"{owner}: {name}='grid' takes one value per replica from the module's grid, but {type(module).__name__} "
            f"has no grid axis {name!r}; add `{name}` to the model's `grid`, or give {name} as a float or a list."
        )
    return [float(v) for v in column]


def step_layout(module: object) -> Optional[StepLayout]:
    """``module.step_layout()`` for a :class:`MultiStepModule`, checked; ``None`` for any other module."""
    if not isinstance(module, MultiStepModule):
        return None
    layout = module.step_layout()
    if layout is None:
        return None
    if not isinstance(layout, StepLayout):
        raise TypeError(
            f"{type(module).__name__}.step_layout() returned {layout!r}; it must return a "
            "lightning_lnsgd.protocol.StepLayout or None."
        )
    if not is_int(layout.steps) or layout.steps < 1:
        raise ValueError(f"{type(module).__name__}.step_layout(): steps={layout.steps!r} must be an int >= 1.")
    if layout.replica_seeds is not None and len(layout.replica_seeds) == 0:
        raise ValueError(f"{type(module).__name__}.step_layout(): replica_seeds is empty; use None for one network.")
    if layout.replica_index is not None:
        index, total = layout.replica_index, layout.total
        if layout.replica_seeds is None or len(index) != len(layout.replica_seeds):
            raise ValueError(
                f"{type(module).__name__}.step_layout(): replica_index={index!r} needs one entry per replica_seeds entry"
                f" (replica_seeds={layout.replica_seeds!r})."
            )
        if not is_int(total) or not all(is_int(i) and 0 <= i < total for i in index):
            raise ValueError(
                f"{type(module).__name__}.step_layout(): replica_index={index!r} must hold indices in 0..total-1 with"
                f" total={total!r} an int (the replicas of the whole module)."
            )
    return layout


def runs_sam_step(module: object) -> bool:
    """Whether ``module`` is a :class:`MultiStepModule` that applies the SAM step itself."""
    return isinstance(module, MultiStepModule) and bool(module.runs_sam_step)


def replica_settings(module: object) -> Optional[list[dict[str, Any]]]:
    """``module.replica_settings()`` for a :class:`MultiStepModule`, checked; ``None`` for any other module."""
    if not isinstance(module, MultiStepModule):
        return None
    rows = module.replica_settings()
    if rows is None:
        return None
    name = f"{type(module).__name__}.replica_settings()"
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"{name} returned {rows!r}; it must return a non-empty list of dicts (one per replica) or None.")
    keys = list(rows[0])
    for k, row in enumerate(rows):
        if list(row) != keys or not all(isinstance(v, (bool, int, float, str)) for v in row.values()):
            raise TypeError(f"{name}[{k}]={row!r}: every replica needs the names {keys} with bool, int, float or str values.")
    return rows
