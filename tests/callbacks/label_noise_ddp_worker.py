"""Worker of ``test_label_noise.py::test_ddp_two_ranks_draw_their_own_streams``: one rank of a gloo DDP run.

Started once per rank by the test with ``LOCAL_RANK``/``MASTER_PORT``/... and ``LIGHTNING_LNSGD_PACKAGE`` set;
saves ``OUT_DIR/rank{r}.pt``: the served package, the callback's counter, whether the dataset is unchanged, and
``steps``, a list of ``(global_step, sample_indices, noisy_labels)``, one per training batch the rank saw.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_lnsgd import compat
from lightning_lnsgd.callbacks.label_noise import LabelNoise

N, B, STEPS, SIGMA, SEED = 32, 4, 3, 2.0, 7


class Recorder(compat.LightningModule):
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
    labels = torch.zeros(N)
    data = TensorDataset(torch.randn(N, 1), labels, torch.arange(N))
    model = Recorder()
    noise = LabelNoise(kind="rademacher", sigma=SIGMA, target=1, seed=SEED)
    trainer = compat.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[noise],
    )
    trainer.fit(model, DataLoader(data, batch_size=B, shuffle=False))
    result = {
        "package": compat.PACKAGE, "counter": noise.counter, "steps": model.seen,
        "data_unchanged": bool(torch.equal(labels, torch.zeros(N))),
    }
    torch.save(result, os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
