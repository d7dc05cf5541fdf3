"""Helpers shared by the callbacks: layer lookup by name, validation batches, and writing to the trainer's loggers."""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import compat

__all__ = ["resolve_weights"]


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


# ------------------------------------------------------------------------------------------------------------------
# Validation data
# ------------------------------------------------------------------------------------------------------------------
def validation_loaders(trainer: Any, pl_module: Any) -> list[Any]:
    """The validation loaders of the fit: ``trainer.val_dataloaders`` once Lightning has loaded them (from the start
    of training on, when validation runs in the first epoch), else the datamodule's, else the module's
    ``val_dataloader()``. A dict of loaders gives its values, in order."""
    loaders: Any = trainer.val_dataloaders
    if loaders is None:
        dm = trainer.datamodule
        source = dm if dm is not None else pl_module
        try:
            loaders = source.val_dataloader()
        except compat.misconfiguration_errors() as err:
            raise ValueError(
                f"no validation loader: pass `val_dataloaders` to fit or define {type(source).__name__}.val_dataloader()."
            ) from err
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def batch_limit(loader: Any, limit: int | float) -> int | float:
    """How many batches of ``loader`` Lightning's ``limit_val_batches=limit`` lets through (``math.inf``: all of an
    unsized loader). An int caps the count; a float in [0, 1] is a fraction of ``len(loader)``."""
    size = len(loader) if hasattr(loader, "__len__") else math.inf
    if isinstance(limit, int):
        return min(size, limit)
    if limit >= 1.0:
        return size
    if size == math.inf:
        raise ValueError(f"limit_val_batches={limit} is a fraction, but the validation loader has no length.")
    return int(size * limit)


def validation_batches(trainer: Any, pl_module: Any) -> Iterator[tuple[int, int, Any]]:
    """``(dataloader_idx, batch_idx, batch)`` over the validation loaders, within ``trainer.limit_val_batches``, each
    batch moved to the module's device by ``trainer.strategy.batch_to_device`` (the module's transfer hooks)."""
    for dl_idx, loader in enumerate(validation_loaders(trainer, pl_module)):
        limit = batch_limit(loader, trainer.limit_val_batches)
        for batch_idx, batch in enumerate(loader):
            if batch_idx >= limit:
                break
            yield dl_idx, batch_idx, trainer.strategy.batch_to_device(batch, dataloader_idx=dl_idx)


# ------------------------------------------------------------------------------------------------------------------
# Loggers
# ------------------------------------------------------------------------------------------------------------------
def tensorboards(trainer: Any) -> list[Any]:
    """The SummaryWriters of the trainer's TensorBoard loggers, of either Lightning package; empty off rank 0."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if compat.is_tensorboard_logger(lg)]


def other_loggers(trainer: Any) -> list[Any]:
    """The trainer's loggers that are not TensorBoard loggers (CSV, MLflow, W&B, ...): they take what Lightning's
    public logger API carries (``log_hyperparams``, ``log_metrics``), not histograms or images."""
    return [lg for lg in trainer.loggers if not compat.is_tensorboard_logger(lg)]


def warn_tensorboard_only(owner: str, trainer: Any, what: str, rest: str) -> None:
    """One warning per logger of ``trainer`` that is not a TensorBoard logger: ``owner`` writes ``what`` (histograms,
    figures) to TensorBoard loggers only; ``rest`` says what it does instead or how to ask for nothing. On rank 0."""
    for lg in other_loggers(trainer):
        compat.rank_zero_warn(
            f"{owner} writes {what} to TensorBoard loggers only, not to {type(lg).__name__} (Lightning's logger API "
            f"carries scalars and hyper-parameters, not histograms or images); {rest}"
        )


def logging_interval(trainer: Any, every_n_steps: int | None) -> int:
    """A callback's logging period in SGD steps: its own ``every_n_steps``, else ``trainer.log_every_n_steps``."""
    return trainer.log_every_n_steps if every_n_steps is None else every_n_steps


def write_scalars(writer: Any, values: dict[str, float], step: int) -> None:
    """Writes ``values`` into the TensorBoard ``SummaryWriter`` ``writer`` at ``step`` as one event holding a scalar
    per tag: what one ``add_scalar`` per tag writes, read the same by TensorBoard, at a fraction of the cost."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    if values:
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        writer.file_writer.add_summary(summary, step)


# The last value of each tag that the package wrote to a logger (see latest_metrics); the loggers are not kept alive.
_LATEST: weakref.WeakKeyDictionary[Any, dict[str, float]] = weakref.WeakKeyDictionary()


def log_metrics(logger: Any, values: dict[str, float], step: int) -> None:
    """``logger.log_metrics(values, step=step)``, as one event per step for a plain TensorBoard logger."""
    writer = compat.plain_summary_writer(logger)
    if writer is not None:
        write_scalars(writer, values, step)
    elif values:
        logger.log_metrics(values, step=step)
    if values:
        _LATEST.setdefault(logger, {}).update(values)


def latest_metrics(logger: Any) -> dict[str, float]:
    """``{tag: value}``: the last value of each tag that the package's callbacks and models wrote to ``logger``
    through :func:`log_metrics` (what a ``LightningModule.log`` call writes is in ``trainer.callback_metrics``)."""
    return dict(_LATEST.get(logger, {}))


def log_scalars(trainer: Any, values: dict[str, torch.Tensor | float], step: int) -> dict[str, float]:
    """Logs 0-dim tensors or floats to every logger of ``trainer`` at ``step``; returns them as floats."""
    if not values:
        return {}
    # one host transfer for all scalars of this step
    floats = torch.stack([torch.as_tensor(v).detach().double().cpu().reshape(()) for v in values.values()]).tolist()
    out = dict(zip(values, floats))
    for lg in trainer.loggers:
        log_metrics(lg, out, step)
    return out


def log_histograms(trainer: Any, values: dict[str, torch.Tensor], step: int) -> None:
    """Adds each 1-d tensor of ``values`` as a histogram to the trainer's TensorBoard writers."""
    for writer in tensorboards(trainer):
        for tag, v in values.items():
            writer.add_histogram(tag, v.detach().float().cpu(), step)


def log_figure(trainer: Any, tag: str, figure: Any, step: int) -> None:
    """Adds a matplotlib figure to the trainer's TensorBoard writers, then closes it."""
    import matplotlib.pyplot as plt

    try:
        for writer in tensorboards(trainer):
            writer.add_figure(tag, figure, step, close=False)
    finally:
        plt.close(figure)
