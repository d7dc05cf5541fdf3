"""Shared test helpers: the Lightning package under test, one quiet Trainer factory, one TensorBoard reader.

* ``lightning`` (fixture, parametrised): each installed Lightning package (``pytorch_lightning`` and, when the
  ``lightning`` extra is installed, ``lightning.pytorch``), so a plug-in test that takes it runs against both.
* ``make_trainer(**overrides)``: a quiet CPU Trainer of the served package (no logger, checkpoints, progress bar,
  model summary or sanity check unless asked for); ``make_trainer(package=lightning, ...)`` builds one of another
  package.
* ``read_scalars(run_dir)``: every scalar tag under a run directory, ``{tag: [(step, value), ...]}`` — the
  package's own :func:`lightning_lnsgd.report.load_scalars`, the reader that ``report`` uses; ``read_replicas(run_dir)``
  the same for each replica of a stacked run; ``read_events(run_dir)`` for images and histograms;
  ``hparams_session_groups(logdir)``: the HPARAMS tab's rows, as TensorBoard's own hparams plugin lists them.
"""

import importlib
import logging
import os
from types import ModuleType
from typing import Any, Optional

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test may import it first
# (through the package's backend discovery), so set it before all tests: without a GPU the
# kernel tests run Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lightning_lnsgd import compat  # noqa: E402
from lightning_lnsgd.report import event_dirs, load_run, load_scalars  # noqa: E402

# Lightning prints device and tip banners at INFO on every Trainer; tests only care about results.
for _name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)

#: Installed Lightning packages, the served one first.
LIGHTNING_PACKAGES = compat.INSTALLED

QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


def make_trainer(package: Optional[ModuleType] = None, **overrides: Any) -> Any:
    """A quiet CPU ``Trainer`` of ``package`` (default: the package ``lightning_lnsgd`` serves)."""
    pkg = compat.pl if package is None else package
    return pkg.Trainer(**{**QUIET, **overrides})


def read_scalars(run_dir: Any) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar under ``run_dir`` (see :func:`lightning_lnsgd.report.load_scalars`)."""
    return load_scalars(run_dir)


def read_replicas(run_dir: Any) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """``{k: {tag: [(step, value), ...]}}`` of each replica of the stacked run under ``run_dir`` (see
    :func:`lightning_lnsgd.report.load_run`)."""
    return load_run(run_dir)[1]


def hparams_session_groups(logdir: Any) -> list[Any]:
    """The session groups (rows) of TensorBoard's HPARAMS tab for ``logdir``, from TensorBoard's own hparams plugin
    handler over its event multiplexer: each with ``.hparams``, ``.metric_values`` and ``.sessions``."""
    from tensorboard import context
    from tensorboard.backend.event_processing import (
        data_provider,
        plugin_event_multiplexer,
    )
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import (
        api_pb2,
        backend_context,
        list_session_groups,
    )

    logdir = str(logdir)
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    tb = base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=data_provider.MultiplexerDataProvider(mux, logdir))
    statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING]
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=statuses)
    handler = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request)
    return list(handler.run().session_groups)


def read_events(run_dir: Any) -> Any:
    """TensorBoard's ``EventAccumulator`` over the one event directory under ``run_dir``, everything loaded: for the
    tags that are not scalars (``.Tags()["images"]``, ``.Images(tag)``, ``.Tags()["histograms"]``, ...)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (directory,) = event_dirs(run_dir)
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.fixture(params=LIGHTNING_PACKAGES, ids=lambda name: name.split(".")[0])
def lightning(request: pytest.FixtureRequest) -> ModuleType:
    """Each installed Lightning package in turn (``pytorch_lightning``, ``lightning.pytorch``), with its ``demos``
    (``BoringModel``, ``RandomDataset``, ...) and ``cli`` submodules imported."""
    for sub in ("demos.boring_classes", "cli"):
        importlib.import_module(f"{request.param}.{sub}")
    return compat.package(request.param)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests of many tiny ops: more threads only add OpenMP contention on a shared 2-core
    machine. Used by whole modules through ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # GPU tests need CUDA; on a machine without it they are reported as skipped, never silently dropped.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
