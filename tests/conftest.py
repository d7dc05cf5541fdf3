import os
import warnings

import pytest

# Triton reads TRITON_INTERPRET when it is first imported, and any test may import it first
# (through the package's backend discovery), so set it before all tests: without a GPU the
# kernel tests run Triton's CPU interpreter.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Lightning prints a lot at INFO on every Trainer; tests only care about results.
os.environ.setdefault("PL_DISABLE_FORK", "0")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _quiet_lightning(caplog):
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield
