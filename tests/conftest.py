import logging
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test may import it first
# (through the package's backend discovery), so set it before all tests: without a GPU the
# kernel tests run Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Lightning prints device and tip banners at INFO on every Trainer; tests only care about results.
for _name in ("pytorch_lightning", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests of many tiny ops: more threads only add OpenMP contention on a shared 2-core
    machine. Used by whole modules through ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
