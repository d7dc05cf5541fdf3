"""DynamicsMonitor: the paper's weight-space dynamics of named layers of any LightningModule (docs/metrics.md)."""

from __future__ import annotations

from typing import Any, Literal, Union

from ..compat import pl
import torch
from ..compat import Callback
from ..compat import rank_zero_warn
from torch import nn
from torchmetrics import Metric

from ..metrics.weights import LazyDistance, NeuronAlignment, NeuronNorms, RelativeDistance, Sparsity, outgoing_norms
from ._common import _is_sam_perturbed_pass, _log_scalars, _tensorboards, resolve_weights

__all__ = ["DynamicsMonitor"]

Reference = Union[list[float], str, None]


class DynamicsMonitor(Callback):
    """Logs weight-space dynamics of named layers of any LightningModule.

    For every named layer (weight ``W``, rows = neurons, conv kernels flattened per output channel) it logs, at
    TensorBoard step t = number of SGD steps done (step 0 = the weights at the start of training):

    * ``dynamics/<layer>/norm_sq_mean`` (1/m)Σ‖wᵢ‖², ``frobenius`` ‖W‖_F (:class:`~lightning_lnsgd.metrics.NeuronNorms`);
    * ``relative_distance`` ‖W − W(0)‖_F/‖W(0)‖_F and ``lazy_distance`` √m·minᵢ‖wᵢ − wᵢ(0)‖;
    * ``effective_rank``, ``stable_rank``, ``norm_fraction`` (:class:`~lightning_lnsgd.metrics.Sparsity`);
    * with a reference vector v: ``alignment_mean`` (1/m)Σ|⟨wᵢ,v⟩| and ``cosine_mean``;
    * histograms ``dynamics/<layer>/norm_sq`` (and ``alignment``, ``cosine``);
    * with ``second_layer``: ``dynamics/<second>/outgoing_norm_mean`` (mean over neurons i of the norm of the weights
      leaving neuron i: |aᵢ| for a vector ``a``, the column norm ‖A[:, i]‖ for a matrix), ``oscillation`` (mean over
      i of the squared change of those weights over the last SGD step, (aᵢ(t) − aᵢ(t−1))² for a vector), and the
      histograms ``outgoing_norm`` (and ``values``, the signed aᵢ, for a vector);
    * at ``scatter_steps``: the figure ``dynamics/<layer>/scatter`` (cosine or alignment against ‖wᵢ‖², one point per
      neuron, as the paper's Fig. 2c).

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
    step, so it never sees SAM's perturbed weights (it also checks :func:`lightning_lnsgd.sam.is_perturbed_pass`).
    Its state (W(0) of each layer, the scatter steps done) is saved in checkpoints, so a resumed run keeps measuring
    distances from the original initialisation.
    """

    def __init__(
        self,
        layers: list[str],
        reference: Reference = None,
        second_layer: str | None = None,
        every_n_steps: int | None = None,
        scatter_steps: list[int] | None = None,
        scatter_y: Literal["cosine", "alignment"] = "cosine",
        histograms: bool = True,
        sparsity: bool = True,
        mass: float = 0.9,
    ) -> None:
        if isinstance(layers, str) or not layers:
            raise ValueError(f"DynamicsMonitor: `layers` must be a non-empty list of layer paths, got {layers!r}.")
        if scatter_y not in ("cosine", "alignment"):
            raise ValueError(f"DynamicsMonitor: `scatter_y` must be 'cosine' or 'alignment', got {scatter_y!r}.")
        if every_n_steps is not None and int(every_n_steps) != every_n_steps:
            raise ValueError(f"DynamicsMonitor: `every_n_steps` must be an integer or null, got {every_n_steps!r}.")
        steps = list(scatter_steps or [])
        if any(int(s) != s or s < 0 for s in steps):
            raise ValueError(f"DynamicsMonitor: `scatter_steps` must be integers ≥ 0, got {scatter_steps!r}.")
        if not 0 < mass <= 1:
            raise ValueError(f"DynamicsMonitor: `mass` must be in (0, 1], got {mass!r}.")
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
        self._metrics: dict[str, dict[str, Metric]] = {}
        self._initial: dict[str, torch.Tensor] = {}  # W(0) per layer (CPU copies; saved in checkpoints)
        self._second: tuple[str, nn.Parameter] | None = None
        self._second_before: torch.Tensor | None = None
        self._scatter_done: set[int] = set()
        self._last_logged = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers)

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"initial": dict(self._initial), "scatter_done": sorted(self._scatter_done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._initial = {k: v.clone() for k, v in state_dict.get("initial", {}).items()}
        self._scatter_done = set(state_dict.get("scatter_done", []))
        for name, metrics in self._metrics.items():  # loaded after on_fit_start (restore after setup)
            if name in self._initial:
                for key in ("relative_distance", "lazy_distance"):
                    metrics[key].set_initial(self._initial[name])

    # -- setup ---------------------------------------------------------------------------------------------------
    def _resolve_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        ref: Any = self.reference
        if ref is None:
            return None
        if isinstance(ref, str):
            owners = [o for o in (getattr(trainer, "datamodule", None), pl_module) if o is not None and hasattr(o, ref)]
            if not owners:
                raise ValueError(
                    f"DynamicsMonitor: `reference`={ref!r} is neither an attribute of the datamodule nor of "
                    f"{type(pl_module).__name__}; give a list of floats or the name of a tensor attribute."
                )
            ref = getattr(owners[0], ref)
        if callable(ref) and not isinstance(ref, torch.Tensor):
            ref = ref()
        if ref is None:
            raise ValueError(f"DynamicsMonitor: `reference`={self.reference!r} resolved to None.")
        ref = torch.as_tensor(ref, dtype=torch.float32).detach().flatten()
        return ref

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._weights = resolve_weights(pl_module, self.layers, "DynamicsMonitor.layers")
        for name, p in self._weights.items():
            if p.ndim < 2:
                raise ValueError(
                    f"DynamicsMonitor.layers: {name!r} is a parameter of shape {tuple(p.shape)}; a layer needs a "
                    "weight with ≥ 2 axes (rows = neurons). Name it as `second_layer` instead?"
                )
        if self.second_layer is not None:
            found = resolve_weights(pl_module, [self.second_layer], "DynamicsMonitor.second_layer")
            if len(found) != 1:
                raise ValueError(
                    f"DynamicsMonitor: `second_layer`={self.second_layer!r} must match exactly one layer, "
                    f"matched {sorted(found)}."
                )
            self._second = next(iter(found.items()))
        reference = self._resolve_reference(trainer, pl_module)
        aligned = []
        for name, p in self._weights.items():
            if name not in self._initial:  # not restored from a checkpoint
                self._initial[name] = p.detach().to("cpu", copy=True)
            d = p[0].numel()
            metrics: dict[str, Metric] = {
                "norms": NeuronNorms(),
                "relative_distance": RelativeDistance(self._initial[name]),
                "lazy_distance": LazyDistance(self._initial[name]),
            }
            if self.sparsity:
                metrics["sparsity"] = Sparsity(self.mass)
            if reference is not None and reference.numel() == d:
                metrics["alignment"] = NeuronAlignment(reference)
                aligned.append(name)
            for m in metrics.values():
                # Weights are replicated under DDP and only rank 0 computes: no collective (see metrics.py).
                m.sync_on_compute = False
            self._metrics[name] = {k: m.to(p.device) for k, m in metrics.items()}
        if reference is not None and not aligned:
            dims = {n: p[0].numel() for n, p in self._weights.items()}
            raise ValueError(
                f"DynamicsMonitor: `reference` has {reference.numel()} entries but no layer has that input "
                f"dimension (layers: {dims})."
            )
        if self.scatter_steps and not aligned:
            rank_zero_warn("DynamicsMonitor: `scatter_steps` needs a `reference`; no scatter figure will be drawn.")

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _every(self, trainer: pl.Trainer) -> int:
        return trainer.log_every_n_steps if self.every_n_steps is None else self.every_n_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self._record(trainer, 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        every = self._every(trainer)
        if self._second is None or not trainer.is_global_zero or every <= 0:
            return
        if (trainer.global_step + 1) % every == 0:
            # weights before the next optimizer step: aᵢ(t − 1) for the oscillation at step t
            self._second_before = self._second[1].detach().clone()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _is_sam_perturbed_pass(trainer):  # never the case after the step; guards future call sites
            return
        step, every = trainer.global_step, self._every(trainer)
        due = every > 0 and step % every == 0
        if (due or step in self.scatter_steps) and step != self._last_logged:
            self._record(trainer, step, scalars=due)

    # -- work ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self) -> dict[str, dict[str, torch.Tensor]]:
        """Current values per layer: ``{layer: {metric: tensor}}`` (scalars and per-neuron vectors), on device."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self._weights.items():
            values: dict[str, torch.Tensor] = {}
            for key, metric in self._metrics[name].items():
                metric.reset()
                metric.update(p)
                result = metric.compute()
                values.update(result if isinstance(result, dict) else {key: result})
            out[name] = values
        if self._second is not None:
            name, a = self._second
            values = {"outgoing_norm": outgoing_norms(a.detach())}
            values["outgoing_norm_mean"] = values["outgoing_norm"].mean()
            if a.ndim == 1:
                values["values"] = a.detach().clone()
            if self._second_before is not None and self._second_before.shape == a.shape:
                values["oscillation"] = outgoing_norms(a.detach() - self._second_before).square().mean()
            out[name] = values
        return out

    def _record(self, trainer: pl.Trainer, step: int, scalars: bool = True) -> None:
        self._last_logged = step
        if not trainer.is_global_zero:
            return
        values = self.compute()
        self._second_before = None
        scalar_tags = {
            f"dynamics/{layer}/{k}": v for layer, vals in values.items() for k, v in vals.items() if v.ndim == 0
        }
        if scalars:
            _log_scalars(trainer, scalar_tags, step)
        writers = _tensorboards(trainer)
        if scalars and self.histograms:
            for layer, vals in values.items():
                for k, v in vals.items():
                    if v.ndim == 1:
                        for w in writers:
                            w.add_histogram(f"dynamics/{layer}/{k}", v.detach().float().cpu(), step)
        if step in self.scatter_steps and step not in self._scatter_done:
            self._scatter_done.add(step)
            for layer, vals in values.items():
                if "cosine" in vals and layer in self._weights:
                    fig = self.scatter_figure(vals, layer, step)
                    for w in writers:
                        w.add_figure(f"dynamics/{layer}/scatter", fig, step, close=False)
                    import matplotlib.pyplot as plt

                    plt.close(fig)

    def scatter_figure(self, values: dict[str, torch.Tensor], layer: str, step: int) -> Any:
        """The Fig. 2c scatter: one point per neuron, ‖wᵢ‖² horizontally, cosine or alignment vertically."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
        x = values["norm_sq"].detach().double().cpu().numpy()
        y = values[self.scatter_y].detach().double().cpu().numpy()
        ax.scatter(x, y, s=6, alpha=0.6)
        ax.set_xlabel("‖wᵢ‖²")
        ax.set_ylabel("|cos(wᵢ, v)|" if self.scatter_y == "cosine" else "|⟨wᵢ, v⟩|")
        ax.set_title(f"{layer}, step {step}")
        if self.scatter_y == "cosine":
            ax.set_ylim(0, 1.02)
        fig.tight_layout()
        return fig


