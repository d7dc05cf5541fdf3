import os
import warnings

import pytest

# Lightning prints a lot at INFO on every Trainer; tests only care about results.
os.environ.setdefault("PL_DISABLE_FORK", "0")
warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _quiet_lightning(caplog):
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield
