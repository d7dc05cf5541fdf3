"""GPU check (not collected by pytest): the fused engine's hot loop does not synchronise the device with the host, and
a CUDA fit (torch and triton backends) ends with the CPU fit's weights. Run on a CUDA machine:
``PYTHONPATH=. python tests/_engine_gpu_sync.py``. Prints one line per check; exits non-zero on a failure.
"""
import sys

import pytorch_lightning as pl
import torch

from lightning_lnsgd import LabelNoise, SparseTeacherDataModule, TwoLayerLinear
from lightning_lnsgd.twolayer.engine import FusedEngine
from lightning_lnsgd.twolayer.kernels import available_backends

if not torch.cuda.is_available():
    sys.exit("needs CUDA")

calls = {"n": 0}
_run = FusedEngine.run


def strict_run(self, x, y):
    """FusedEngine.run with any host sync an error, after the first (compiling, allocating) call."""
    calls["n"] += 1
    if calls["n"] == 1:
        return _run(self, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return _run(self, x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def fit(accelerator, backend, replicas=None, steps=5000):
    model = TwoLayerLinear(dim=20, width=1000, lr=1e-3, seed=0, steps_per_batch=1000, backend=backend, replicas=replicas)
    data = SparseTeacherDataModule(dim=20, n_train=200, n_test=500, seed=0, steps_per_epoch=5)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, log_every_n_steps=500,
                         callbacks=[LabelNoise(sigma=4.0, seed=0)], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(model, data)
    return model


failed = False
for replicas in (None, 8):
    ref = fit("cpu", "torch", replicas)
    for backend in [b for b in ("torch", "triton") if b in available_backends()]:
        FusedEngine.run = strict_run
        calls["n"] = 0
        try:
            gpu = fit("gpu", backend, replicas)
            err = ((gpu.W.cpu().double() - ref.W.double()).norm() / ref.W.double().norm()).item()
            ok = err <= 1e-5
            print(f"{backend:6s} replicas={replicas}: no host sync in {calls['n'] - 1} engine steps; "
                  f"relative weight error vs CPU after 5000 steps {err:.2e} {'OK' if ok else 'FAIL'}")
            failed |= not ok
        except RuntimeError as e:
            print(f"{backend:6s} replicas={replicas}: FAIL {str(e).splitlines()[0]}")
            failed = True
        finally:
            FusedEngine.run = _run
sys.exit(1 if failed else 0)
