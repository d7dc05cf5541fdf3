"""GPU check for LabelNoise (run by hand on a CUDA machine: ``python tests/_noise_gpu.py``).

Trains 6 steps on CUDA and on CPU with each kind of noise and checks that the noisy labels that
reach ``training_step`` are identical on both devices, that they are on the GPU, and that the
stored dataset is unchanged. Prints one line per check and exits non-zero on failure.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
from pytorch_lightning import LightningModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_lnsgd.callbacks.label_noise import LabelNoise  # noqa: E402


class Recorder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(y.detach().cpu().clone())
        self.devices_seen = y.device.type
        return self.lin(x).float().mean() * 0 + y.float().mean() * 0 + self.lin.weight.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def run(accelerator: str, kind: str):
    n = 48
    x = torch.randn(n, 3)
    y = torch.arange(n) % 5 if kind == "flip" else torch.linspace(-3, 3, n)
    y0 = y.clone()
    model = Recorder()
    trainer = Trainer(
        accelerator=accelerator, devices=1, max_steps=6, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2,
        callbacks=[LabelNoise(kind=kind, sigma=2.0, flip_prob=0.4, num_classes=5, seed=3)],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    assert torch.equal(y, y0), "dataset modified"
    return torch.stack(model.seen), model.devices_seen


def main() -> int:
    print("cuda available:", torch.cuda.is_available(), torch.__version__)
    if not torch.cuda.is_available():
        return 0
    ok = True
    for kind in ("rademacher", "gaussian", "flip"):
        gpu, dev = run("gpu", kind)
        cpu, _ = run("cpu", kind)
        same = torch.equal(gpu, cpu) if kind != "gaussian" else torch.allclose(gpu, cpu, rtol=0, atol=1e-6)
        print(f"{kind}: device={dev} gpu==cpu: {same} max|diff|={(gpu.double() - cpu.double()).abs().max().item():.3g}")
        ok &= same and dev == "cuda"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
