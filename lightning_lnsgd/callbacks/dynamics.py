"""DynamicsMonitor: the paper's weight-space dynamics of named layers of any LightningModule (docs/metrics.md).

Three parts, one job each: :class:`LayerMetrics` (the metric set of one weight matrix), :class:`OutgoingWeights`
(the second layer: norms and oscillation of the weights leaving each neuron), and :class:`DynamicsMonitor` (the
callback: which layers, when, and writing to the loggers; figures come from :mod:`._figures`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import nn
from torchmetrics import Metric

from ..compat import Callback, LightningModule, Trainer, rank_zero_warn
from ..metrics import (
    LazyDistance,
    NeuronAlignment,
    NeuronNorms,
    RelativeDistance,
    Sparsity,
    outgoing_norms,
)
from ._common import (
    log_figure,
    log_histograms,
    log_scalars,
    logging_interval,
    other_loggers,
    resolve_weights,
    warn_tensorboard_only,
)
from ._figures import neuron_scatter

__all__ = ["DynamicsMonitor", "LayerMetrics", "OutgoingWeights"]

Reference = Union[list[float], str, None]


class LayerMetrics:
    """The metric set of one weight matrix W (rows = neurons): norms, distances from W(0), optionally the spectral
    sparsity and the alignment with a reference vector v. :meth:`compute` gives ``{name: tensor}`` (0-dim scalars
    and per-neuron ``(m,)`` vectors, on W's device); names and units are those of :mod:`lightning_lnsgd.metrics`.

    The metrics are read on one rank only (weights are replicated under DDP), so they never synchronise.
    """

    def __init__(
        self, initial: torch.Tensor, reference: Optional[torch.Tensor] = None, sparsity: bool = True, mass: float = 0.9
    ) -> None:
        metrics: dict[str, Metric] = {
            "norms": NeuronNorms(),
            "relative_distance": RelativeDistance(initial),
            "lazy_distance": LazyDistance(initial),
        }
        if sparsity:
            metrics["sparsity"] = Sparsity(mass)
        if reference is not None:
            metrics["alignment"] = NeuronAlignment(reference)
        for metric in metrics.values():
            metric.sync_on_compute = False
        self.metrics = metrics

    def to(self, device: torch.device) -> LayerMetrics:
        """Moves the metrics (and their W(0) and v buffers) to ``device``."""
        self.metrics = {k: m.to(device) for k, m in self.metrics.items()}
        return self

    def set_initial(self, initial: torch.Tensor) -> None:
        """Sets W(0) of the distance metrics (e.g. restored from a checkpoint)."""
        for key in ("relative_distance", "lazy_distance"):
            self.metrics[key].set_initial(initial)

    @torch.no_grad()
    def compute(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """The values at W."""
        values: dict[str, torch.Tensor] = {}
        for key, metric in self.metrics.items():
            metric.reset()
            metric.update(W)
            result = metric.compute()
            values.update(result if isinstance(result, dict) else {key: result})
        return values


class OutgoingWeights:
    """The weights *leaving* each neuron of the monitored layer (the next layer ``a`` or ``A``).

    :meth:`compute` gives ``outgoing_norm`` (per neuron, weight), ``outgoing_norm_mean``, ``values`` (the signed aᵢ,
    for a vector ``a``) and, when :meth:`remember` was called before the last SGD step, ``oscillation``: the mean over
    neurons i of ‖A[:, i](t) − A[:, i](t−1)‖² (weight² per SGD step).
    """

    def __init__(self) -> None:
        self.before: Optional[torch.Tensor] = None

    def remember(self, a: torch.Tensor) -> None:
        """Keeps a(t − 1), the weights before the coming optimizer step."""
        self.before = a.detach().clone()

    @torch.no_grad()
    def compute(self, a: torch.Tensor) -> dict[str, torch.Tensor]:
        a = a.detach()
        norms = outgoing_norms(a)
        values = {"outgoing_norm": norms, "outgoing_norm_mean": norms.mean()}
        if a.ndim == 1:
            values["values"] = a.clone()
        if self.before is not None and self.before.shape == a.shape:
            values["oscillation"] = outgoing_norms(a - self.before).square().mean()
        self.before = None
        return values


class DynamicsMonitor(Callback):
    """Logs weight-space dynamics of named layers of any LightningModule.

    For every named layer (weight ``W``, rows = neurons, conv kernels flattened per output channel) it logs, at
    TensorBoard step t = number of SGD steps done (step 0 = the weights at the start of training):

    * ``dynamics/<layer>/norm_sq_mean`` (1/m)Σ‖wᵢ‖², ``frobenius`` ‖W‖_F (:class:`~lightning_lnsgd.metrics.NeuronNorms`);
    * ``relative_distance`` ‖W − W(0)‖_F/‖W(0)‖_F and ``lazy_distance`` √m·minᵢ‖wᵢ − wᵢ(0)‖;
    * ``effective_rank``, ``stable_rank``, ``norm_fraction`` (:class:`~lightning_lnsgd.metrics.Sparsity`);
    * with a reference vector v: ``alignment_mean`` (1/m)Σ|⟨wᵢ,v⟩| and ``cosine_mean``;
    * histograms ``dynamics/<layer>/norm_sq`` (and ``alignment``, ``cosine``);
    * with ``second_layer``: ``dynamics/<second>/outgoing_norm_mean``, ``oscillation`` and the histograms
      ``outgoing_norm`` (and ``values``) (:class:`OutgoingWeights`);
    * at ``scatter_steps``: the figure ``dynamics/<layer>/scatter`` (cosine or alignment against ‖wᵢ‖², one point per
      neuron, as the paper's Fig. 2c).

    The scalars go to every logger of the trainer; the histograms and figures to its TensorBoard loggers only
    (Lightning's logger API carries no histograms or images): each other logger gets one warning at setup naming
    what it will not receive (``histograms=False`` and no ``scatter_steps`` ask for nothing it cannot take).

    Args:
        layers: module paths (``"backbone.fc1"``: its ``weight``), parameter paths (``"W"``) or fnmatch globs
            (``"blocks.*.fc"``); see :func:`resolve_weights`. The tag name is the matched path.
        reference: the vector v for alignment (e.g. the teacher θ⋆): a list of floats, or the name of an attribute
            (a tensor, or a zero-argument callable returning one) of the datamodule, else of the LightningModule,
            e.g. ``"teacher"``. In Python a tensor or a callable is accepted too. Applied to the layers whose input
            dimension equals len(v).
        second_layer: module or parameter path of the layer after the named ones.
        every_n_steps: logging period in SGD steps (default: ``trainer.log_every_n_steps``; ≤ 0: only step 0).
        scatter_steps: SGD steps at which to draw the scatter figure (each once; step 0 is the initialisation).
        scatter_y: ``"cosine"`` or ``"alignment"`` on the scatter's vertical axis.
        histograms: log the TensorBoard histograms.
        sparsity: log the spectral quantities (one small eigen-decomposition per layer and logging step).
        mass: the share of Σ‖wᵢ‖² for ``norm_fraction``.

    Under DDP the weights are identical on every rank, so the values computed on rank 0 are the single-process
    values; the other ranks do no work. The monitor reads the weights in ``on_train_batch_end``, after the optimizer
    step, so it never sees SAM's perturbed weights. Its state (W(0) of each layer, the scatter steps done) is saved
    in checkpoints, so a resumed run keeps measuring distances from the original initialisation.
    """

    def __init__(
        self,
        layers: list[str],
        reference: Reference = None,
        second_layer: Optional[str] = None,
        every_n_steps: Optional[int] = None,
        scatter_steps: Optional[list[int]] = None,
        scatter_y: Literal["cosine", "alignment"] = "cosine",
        histograms: bool = True,
        sparsity: bool = True,
        mass: float = 0.9,
    ) -> None:
        if isinstance(layers, str) or not layers:
            raise ValueError(f"DynamicsMonitor: layers={layers!r} must be a non-empty list of layer paths.")
        if scatter_y not in ("cosine", "alignment"):
            raise ValueError(f"DynamicsMonitor: scatter_y={scatter_y!r} must be 'cosine' or 'alignment'.")
        if every_n_steps is not None and int(every_n_steps) != every_n_steps:
            raise ValueError(f"DynamicsMonitor: every_n_steps={every_n_steps!r} must be an integer or None.")
        steps = list(scatter_steps or [])
        if any(int(s) != s or s < 0 for s in steps):
            raise ValueError(f"DynamicsMonitor: scatter_steps={scatter_steps!r} must be integers ≥ 0.")
        if not 0 < mass <= 1:
            raise ValueError(f"DynamicsMonitor: mass={mass!r} must be in (0, 1].")
        self.layers = list(layers)
        self.reference = reference
        self.second_layer = second_layer
        self.every_n_steps = every_n_steps
        self.scatter_steps = sorted({int(s) for s in steps})
        self.scatter_y = scatter_y
        self.histograms = histograms
        self.sparsity = sparsity
        self.mass = mass
        self._weights: dict[str, nn.Parameter] = {}
        self._reference: Optional[torch.Tensor] = None
        self._metrics: dict[str, LayerMetrics] = {}
        self._initial: dict[str, torch.Tensor] = {}  # W(0) per layer (CPU copies; saved in checkpoints)
        self._second: Optional[tuple[str, nn.Parameter]] = None
        self._outgoing = OutgoingWeights()
        self._scatter_done: set[int] = set()
        self._last_logged = -1

    @property
    def state_key(self) -> str:
        # Two monitors of different layers keep separate checkpoint states (Lightning's state-key convention).
        return f"{type(self).__qualname__}{{'layers': {self.layers!r}}}"

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"initial": dict(self._initial), "scatter_done": sorted(self._scatter_done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._initial = {k: v.clone() for k, v in state_dict.get("initial", {}).items()}
        self._scatter_done = set(state_dict.get("scatter_done", []))

    # -- setup: resolve names, refuse what cannot work -------------------------------------------------------------
    def _resolve_reference(self, trainer: Trainer, pl_module: LightningModule) -> Optional[torch.Tensor]:
        ref: Any = self.reference
        if ref is None:
            return None
        if isinstance(ref, str):
            owners = [o for o in (trainer.datamodule, pl_module) if o is not None and hasattr(o, ref)]
            if not owners:
                raise ValueError(
                    f"DynamicsMonitor: reference={ref!r} is neither an attribute of the datamodule nor of "
                    f"{type(pl_module).__name__}; give a list of floats or the name of a tensor attribute."
                )
            ref = getattr(owners[0], ref)
        if callable(ref) and not isinstance(ref, torch.Tensor):
            ref = ref()
        if ref is None:
            raise ValueError(f"DynamicsMonitor: reference={self.reference!r} resolved to None.")
        return torch.as_tensor(ref, dtype=torch.float32).detach().flatten()

    def _resolve_layers(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # At fit start, not in setup: callbacks' setup runs before the module's, where a model may build its layers.
        self._weights = resolve_weights(pl_module, self.layers, "DynamicsMonitor.layers")
        for name, p in self._weights.items():
            if p.ndim < 2:
                raise ValueError(
                    f"DynamicsMonitor: layers entry {name!r} has shape {tuple(p.shape)}; a layer needs a weight with "
                    "≥ 2 axes (rows = neurons). Name it as `second_layer` instead?"
                )
        if self.second_layer is not None:
            found = resolve_weights(pl_module, [self.second_layer], "DynamicsMonitor.second_layer")
            if len(found) != 1:
                raise ValueError(
                    f"DynamicsMonitor: second_layer={self.second_layer!r} must match exactly one layer, matched "
                    f"{sorted(found)}."
                )
            self._second = next(iter(found.items()))
        self._reference = self._resolve_reference(trainer, pl_module)
        aligned = [n for n in self._weights if self._aligned(n)]
        if self._reference is not None and not aligned:
            dims = {n: p[0].numel() for n, p in self._weights.items()}
            raise ValueError(
                f"DynamicsMonitor: reference has {self._reference.numel()} entries but no layer has that input "
                f"dimension (layers: {dims})."
            )
        if self.scatter_steps and not aligned:
            rank_zero_warn("DynamicsMonitor: `scatter_steps` needs a `reference`; no scatter figure will be drawn.")

    def _aligned(self, name: str) -> bool:
        return self._reference is not None and self._reference.numel() == self._weights[name][0].numel()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dropped = (["the histograms dynamics/*"] if self.histograms else []) + (
            ["the scatter figures dynamics/*/scatter"] if self.scatter_steps else []
        )
        if stage == "fit" and dropped:
            rest = "its scalars go to every logger. "
            # Advice to add a TensorBoard logger only where the trainer has none.
            if len(other_loggers(trainer)) < len(trainer.loggers):
                rest += "The trainer's TensorBoard logger has them"
            else:
                rest += "Add a TensorBoardLogger to see them"
            rest += "; to ask for none, set histograms=False"
            rest += " and no scatter_steps." if self.scatter_steps else "."
            warn_tensorboard_only(type(self).__name__, trainer, " and ".join(dropped), rest)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resolve_layers(trainer, pl_module)
        # After the checkpoint restore: W(0) restored by load_state_dict wins over the current weights.
        for name, p in self._weights.items():
            if name not in self._initial:
                self._initial[name] = p.detach().to("cpu", copy=True)
            reference = self._reference if self._aligned(name) else None
            self._metrics[name] = LayerMetrics(self._initial[name], reference, self.sparsity, self.mass).to(p.device)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _every(self, trainer: Trainer) -> int:
        return logging_interval(trainer, self.every_n_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == 0:
            self._record(trainer, 0)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        every = self._every(trainer)
        if self._second is None or not trainer.is_global_zero or every <= 0:
            return
        if (trainer.global_step + 1) % every == 0:
            self._outgoing.remember(self._second[1])  # aᵢ(t − 1) for the oscillation at step t

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, every = trainer.global_step, self._every(trainer)
        due = every > 0 and step % every == 0
        if (due or step in self.scatter_steps) and step != self._last_logged:
            self._record(trainer, step, scalars=due)

    # -- work ----------------------------------------------------------------------------------------------------
    def compute(self) -> dict[str, dict[str, torch.Tensor]]:
        """Current values per layer: ``{layer: {metric: tensor}}`` (scalars and per-neuron vectors), on device."""
        out = {name: self._metrics[name].compute(p) for name, p in self._weights.items()}
        if self._second is not None:
            name, a = self._second
            out[name] = self._outgoing.compute(a)
        return out

    def _record(self, trainer: Trainer, step: int, scalars: bool = True) -> None:
        self._last_logged = step
        if not trainer.is_global_zero:
            return
        values = self.compute()
        if scalars:
            log_scalars(trainer, _tags(values, ndim=0), step)
            if self.histograms:
                log_histograms(trainer, _tags(values, ndim=1), step)
        if step in self.scatter_steps and step not in self._scatter_done:
            self._scatter_done.add(step)
            for layer in self._weights:
                vals = values[layer]
                if "cosine" in vals:
                    fig = neuron_scatter(vals["norm_sq"], vals[self.scatter_y], self.scatter_y, f"{layer}, step {step}")
                    log_figure(trainer, f"dynamics/{layer}/scatter", fig, step)


def _tags(values: dict[str, dict[str, torch.Tensor]], ndim: int) -> dict[str, torch.Tensor]:
    return {f"dynamics/{layer}/{k}": v for layer, vals in values.items() for k, v in vals.items() if v.ndim == ndim}
