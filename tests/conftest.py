import logging
import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test may import it first
# (through the package's backend discovery), so set it before all tests: without a GPU the
# kernel tests run Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Lightning prints device and tip banners at INFO on every Trainer; tests only care about results.
for _name in ("pytorch_lightning", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)
