"""Callbacks that log the paper's weight-space dynamics for any LightningModule (docs/metrics.md).

* :class:`DynamicsMonitor`: neuron norms, alignment with a reference vector, sparsity and laziness of named layers,
  every N SGD steps, with histograms and the per-neuron scatter of the paper's Fig. 2c.
* :class:`PruningCurve`: a validation metric after global magnitude pruning to several kept fractions (Fig. 1c).
* :class:`HParamsSummary`: the run's hyper-parameters with the final value of chosen metrics in TensorBoard's HPARAMS tab.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from typing import Any, Literal, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.data import extract_batch_size
from torch import nn
from torchmetrics import Metric

from .metrics import LazyDistance, NeuronAlignment, NeuronNorms, RelativeDistance, Sparsity, outgoing_norms

__all__ = ["DynamicsMonitor", "HParamsSummary", "PruningCurve", "resolve_weights"]


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------
def resolve_weights(module: nn.Module, patterns: Sequence[str], field: str = "layers") -> dict[str, nn.Parameter]:
    """Maps layer specifications to weight parameters, keyed by the name used in tags.

    A pattern is matched, in this order, against: module paths (``"backbone.fc1"``: the module's ``weight``
    parameter; the tag name is the module path), then parameter paths (``"W"``, ``"backbone.fc1.weight"``: the tag
    name is the parameter path). ``fnmatch`` globs (``"blocks.*.fc"``) match every such name; a glob that matches a
    module without a ``weight`` parameter skips it. A pattern that matches nothing raises ``ValueError``.
    """
    modules = {name: m for name, m in module.named_modules() if name}
    weighted = {n: m.weight for n, m in modules.items() if isinstance(getattr(m, "weight", None), nn.Parameter)}
    params = dict(module.named_parameters())
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for pattern in patterns:
        matches = [(n, p) for n, p in weighted.items() if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            matches = [(n, p) for n, p in params.items() if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            available = sorted(set(weighted) | set(params))
            shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
            raise ValueError(
                f"`{field}`: {pattern!r} matches no layer (module with a `weight`) and no parameter of "
                f"{type(module).__name__}; available: {shown}."
            )
        for name, p in matches:
            if id(p) not in seen:
                seen.add(id(p))
                found[name] = p
    return found


def _tensorboards(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers (rank 0 only; elsewhere Lightning gives dummies)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _log_scalars(trainer: pl.Trainer, values: dict[str, torch.Tensor], step: int) -> None:
    if not values:
        return
    # one host transfer for all scalars of this step
    floats = torch.stack([v.detach().double().cpu().reshape(()) for v in values.values()]).tolist()
    for lg in trainer.loggers:
        lg.log_metrics(dict(zip(values, floats)), step=step)


def _is_sam_perturbed_pass(trainer: pl.Trainer) -> bool:
    try:
        from .sam import is_perturbed_pass
    except ImportError:  # SAM support not installed in this tree
        return False
    return bool(is_perturbed_pass(trainer))


# ------------------------------------------------------------------------------------------------------------------
# DynamicsMonitor
# ------------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------------
# PruningCurve
# ------------------------------------------------------------------------------------------------------------------
def _global_magnitude_masks(params: Sequence[torch.Tensor], kept: float) -> list[torch.Tensor]:
    """Masks keeping the round(kept·N) entries of largest |w| over all ``params`` together (ties: ``topk``'s pick)."""
    scores = torch.cat([p.detach().abs().flatten() for p in params])
    k = int(round(kept * scores.numel()))
    flat = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        flat[scores.topk(k, sorted=False).indices] = True
    return list(flat.split([p.numel() for p in params]))


class _LogCapture:
    """Stands in for ``LightningModule.log`` during a pruned evaluation: accumulates batch-size weighted values."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Any]] = {}  # name -> [weighted sum, weight, reduce_fx] or [Metric]
        self.batch: Any = None

    def __call__(self, name: str, value: Any, *args: Any, batch_size: int | None = None, reduce_fx: Any = "mean", **kwargs: Any) -> None:
        if isinstance(value, Metric):
            self.sums[name] = [value]
            return
        value = torch.as_tensor(value).detach().double().reshape(())
        if reduce_fx in ("mean", torch.mean):
            w = float(batch_size if batch_size is not None else extract_batch_size(self.batch))
        elif reduce_fx in ("sum", torch.sum):
            w = 1.0
        else:
            raise ValueError(
                f"PruningCurve: {name!r} is logged with reduce_fx={reduce_fx!r}; only 'mean' and 'sum' are supported."
            )
        acc = self.sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=value.device), 0.0, reduce_fx])
        acc[0] = acc[0] + value * w
        acc[1] += w


class PruningCurve(Callback):
    """Validation metric after global magnitude pruning to each kept fraction α (the paper's Fig. 1c).

    For every α in ``kept_fractions`` the round(α·N) entries of largest |w| among the chosen parameters (N entries in
    all, one global threshold) are kept and the rest set to zero; the validation set is run through
    ``validation_step`` and the value logged there under ``monitor`` is read; then the trained weights are put back,
    bit for bit. The pass does not go through Lightning's validation loop: no callback (checkpointing, early
    stopping) and no logger sees the pruned model; ``self.log`` calls are captured (batch-size weighted mean, as
    Lightning's default) and, under DDP, summed over ranks (mean over the union of the ranks' shards).

    Logs ``pruning/<monitor>@<α>`` (scalars, at step = SGD steps done) and the figure ``pruning/<monitor>``; the last
    curve is also kept as :attr:`curve` ``{α: value}``.

    Args:
        kept_fractions: kept fractions α in [0, 1].
        monitor: the key that ``validation_step`` logs (``"val/acc"``, ``"val/loss"``, ...).
        parameters: parameter paths or fnmatch globs (module paths select their ``weight``); default: every
            parameter with ≥ 2 axes (weight matrices, conv kernels; biases and norms are not pruned).
        every_n_validations: also evaluate after every n-th validation during fit (``None``: only at the end of fit).
    """

    def __init__(
        self,
        kept_fractions: list[float] | None = None,
        monitor: str = "val/acc",
        parameters: list[str] | None = None,
        every_n_validations: int | None = None,
    ) -> None:
        fractions = [1.0, 0.5, 0.2, 0.1, 0.05] if kept_fractions is None else list(kept_fractions)
        if not fractions or any(not (0.0 <= float(a) <= 1.0) for a in fractions):
            raise ValueError(f"PruningCurve: `kept_fractions` must be a non-empty list of numbers in [0, 1], got {kept_fractions!r}.")
        if every_n_validations is not None and (int(every_n_validations) != every_n_validations or every_n_validations < 1):
            raise ValueError(f"PruningCurve: `every_n_validations` must be an integer ≥ 1 or null, got {every_n_validations!r}.")
        self.kept_fractions = sorted({float(a) for a in fractions}, reverse=True)
        self.monitor = monitor
        self.parameters = parameters
        self.every_n_validations = every_n_validations
        self.curve: dict[float, float] = {}
        self._validations = 0

    def _params(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        if self.parameters is None:
            chosen = [p for p in pl_module.parameters() if p.ndim >= 2]
        else:
            chosen = list(resolve_weights(pl_module, self.parameters, "PruningCurve.parameters").values())
        if not chosen:
            raise ValueError(f"PruningCurve: no parameter to prune in {type(pl_module).__name__} (`parameters`={self.parameters!r}).")
        return chosen

    def _loaders(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        loaders: Any = trainer.val_dataloaders
        if loaders is None:
            dm = getattr(trainer, "datamodule", None)
            source = dm if dm is not None else pl_module
            loaders = source.val_dataloader()
        return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    @torch.no_grad()
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """One pass of ``validation_step`` over the validation loaders; the value logged under ``monitor``."""
        loaders = self._loaders(trainer, pl_module)
        capture = _LogCapture()
        metric_states = {m: (copy.deepcopy(m.metric_state), m._update_count, m._computed) for m in pl_module.modules() if isinstance(m, Metric)}
        for m in metric_states:
            m.reset()
        pl_module.log = capture  # type: ignore[method-assign]  # instance attribute shadows the method
        try:
            for dl_idx, loader in enumerate(loaders):
                for batch_idx, batch in enumerate(loader):
                    # The module's own transfer hooks, not strategy.batch_to_device: LabelNoise wraps that one
                    # for the whole fit, and the pruned model must be scored on clean labels.
                    batch = pl_module._apply_batch_transfer_handler(batch, pl_module.device, dataloader_idx=dl_idx)
                    capture.batch = batch
                    if len(loaders) > 1:
                        pl_module.validation_step(batch, batch_idx, dl_idx)
                    else:
                        pl_module.validation_step(batch, batch_idx)
            if self.monitor not in capture.sums:
                raise ValueError(
                    f"PruningCurve: `monitor`={self.monitor!r} was not logged by validation_step; "
                    f"it logged {sorted(capture.sums)}."
                )
            acc = capture.sums[self.monitor]
            if len(acc) == 1:  # a torchmetrics Metric: compute() syncs across ranks itself
                value = float(acc[0].compute())
            else:
                total = trainer.strategy.reduce(torch.stack([acc[0], torch.tensor(acc[1], dtype=torch.float64, device=acc[0].device)]), reduce_op="sum")
                value = float(total[0] / total[1]) if acc[2] in ("mean", torch.mean) else float(total[0])
        finally:
            del pl_module.log
            for m, (state, count, computed) in metric_states.items():
                for k, v in state.items():
                    setattr(m, k, v)
                m._update_count, m._computed = count, computed
        return value

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[float, float]:
        """The curve ``{α: monitor value}``; the weights are unchanged afterwards (bit for bit)."""
        params = self._params(pl_module)
        saved = [p.detach().clone() for p in params]
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        curve: dict[float, float] = {}
        try:
            for alpha in self.kept_fractions:
                if alpha < 1.0:
                    with torch.no_grad():
                        for p, mask in zip(params, _global_magnitude_masks(params, alpha)):
                            p.mul_(mask.view_as(p))
                curve[alpha] = self._evaluate(trainer, pl_module)
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            for m, mode in modes.items():
                m.train(mode)
        self.curve = curve
        return curve

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        curve = self.evaluate(trainer, pl_module)
        step = trainer.global_step
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:
            lg.log_metrics({f"pruning/{self.monitor}@{a:g}": v for a, v in curve.items()}, step=step)
        writers = _tensorboards(trainer)
        if writers:
            fig = self.figure(curve, step)
            for w in writers:
                w.add_figure(f"pruning/{self.monitor}", fig, step, close=False)
            import matplotlib.pyplot as plt

            plt.close(fig)

    def figure(self, curve: dict[float, float], step: int) -> Any:
        """The curve as a matplotlib figure (kept fraction on a log axis)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
        alphas = sorted(a for a in curve if a > 0)
        ax.plot([100 * a for a in alphas], [curve[a] for a in alphas], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("weights kept (%)")
        ax.set_ylabel(self.monitor)
        ax.set_title(f"magnitude pruning, step {step}")
        fig.tight_layout()
        return fig

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_validations is None or trainer.state.fn != "fit":
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)


# ------------------------------------------------------------------------------------------------------------------
# HParamsSummary
# ------------------------------------------------------------------------------------------------------------------
def _hparam_value(v: Any) -> Any:
    if isinstance(v, bool) or isinstance(v, (int, float, str)):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


class HParamsSummary(Callback):
    """The run's hyper-parameters and the final value of chosen metrics, in TensorBoard's HPARAMS tab.

    At the start of fit it writes TensorBoard's hparams experiment and session-start records (hyper-parameters of the
    LightningModule and the datamodule, plus ``extra``; nested keys joined with ``/``) naming ``metrics`` as the
    columns; at the end of fit, the session-end record. The HPARAMS tab shows, for each metric, the *last* value of
    the scalar tag of that name in the run, i.e. the final value of a logged curve (``test/loss``,
    ``dynamics/lazy_distance``, ``pruning/val/acc@0.1``...). A metric never logged stays empty.

    It writes before Lightning's own hyper-parameter record (``on_fit_start`` runs first), and TensorBoard uses the
    first record of a run, so the columns are these metrics rather than Lightning's placeholder ``hp_metric``.

    Args:
        metrics: scalar tags to show as columns.
        extra: more hyper-parameters (e.g. the label-noise level σ of a callback).
    """

    def __init__(self, metrics: list[str] | None = None, extra: dict[str, Any] | None = None) -> None:
        self.metrics = list(metrics) if metrics is not None else [
            "train/loss", "test/loss", "dynamics/norm_sq_mean", "dynamics/cosine_mean", "dynamics/lazy_distance",
            "phase/escape_step",
        ]
        if not self.metrics:
            raise ValueError("HParamsSummary: `metrics` must name at least one logged scalar tag.")
        self.extra = dict(extra or {})

    def hyperparameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Flat ``{name: value}`` of the module's and the datamodule's hyper-parameters and ``extra``."""
        params: dict[str, Any] = {}

        def put(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    put(f"{prefix}/{k}" if prefix else str(k), v)
            else:
                params[prefix] = _hparam_value(obj)

        put("model", dict(pl_module.hparams))
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "hparams"):
            put("data", dict(dm.hparams))
        put("", self.extra)
        return params

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = _tensorboards(trainer) if trainer.is_global_zero else []
        if not writers:
            return
        from torch.utils.tensorboard.summary import hparams

        exp, ssi, _ = hparams(self.hyperparameters(trainer, pl_module), {m: 0.0 for m in self.metrics})
        for w in writers:
            fw = w._get_file_writer()  # what Lightning's TensorBoardLogger.log_hyperparams uses too
            fw.add_summary(exp)
            fw.add_summary(ssi)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = _tensorboards(trainer) if trainer.is_global_zero else []
        if not writers:
            return
        from torch.utils.tensorboard.summary import hparams

        _, _, sei = hparams(self.hyperparameters(trainer, pl_module), {m: 0.0 for m in self.metrics})
        for w in writers:
            fw = w._get_file_writer()
            fw.add_summary(sei, trainer.global_step)
            fw.flush()
