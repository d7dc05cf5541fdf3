"""Helper for tests/test_noise.py: a 2-process gloo DDP run with LabelNoise.

Usage: ``python tests/_noise_ddp.py OUT_DIR`` (Lightning starts rank 1), or started once per rank with
``LOCAL_RANK``/``MASTER_PORT``/... set, as the test does. Each rank saves ``OUT_DIR/rank{r}.pt``: a list of
``(global_step, sample_indices, noisy_labels)``, one entry per training batch it saw.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
from pytorch_lightning import LightningModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_lnsgd.callbacks.label_noise import LabelNoise  # noqa: E402

N, B, STEPS, SIGMA, SEED = 32, 4, 3, 2.0, 7


class Recorder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append((self.trainer.global_step, idx.clone(), y.clone()))
        return ((self.lin(x).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main(out_dir: str) -> None:
    data = TensorDataset(torch.randn(N, 1), torch.zeros(N), torch.arange(N))
    model = Recorder()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LabelNoise(kind="rademacher", sigma=SIGMA, target=1, seed=SEED)],
    )
    trainer.fit(model, DataLoader(data, batch_size=B, shuffle=False))
    torch.save(model.seen, os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
