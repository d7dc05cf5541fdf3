"""A user-style classifier and datamodule for the callback tests, built on a given Lightning package."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn


class Backbone(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


def user_classes(lightning: ModuleType) -> tuple[type, type]:
    """``(UserModel, BlobData)`` subclassing ``lightning``'s LightningModule and LightningDataModule.

    UserModel: ``backbone.fc1``, ``backbone.fc2``, ``head``; logs ``val/acc`` (a torchmetrics object) and
    ``val/loss``. BlobData: labels y = [⟨x, teacher⟩ > 0]; ``teacher`` is the monitor's reference vector.
    """

    class UserModel(lightning.LightningModule):
        def __init__(self, d: int = 10, h: int = 32, lr: float = 0.2) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.backbone = Backbone(d, h)
            self.head = nn.Linear(h, 2)
            from torchmetrics.classification import BinaryAccuracy

            self.val_acc = BinaryAccuracy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            self.val_acc(logits.argmax(-1), y)
            self.log("val/acc", self.val_acc)
            self.log("val/loss", nn.functional.cross_entropy(logits, y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    class BlobData(lightning.LightningDataModule):
        def __init__(self, d: int = 10, n: int = 512) -> None:
            super().__init__()
            self.save_hyperparameters()
            g = torch.Generator().manual_seed(1)
            self.teacher = torch.randn(d, generator=g)
            self.x = torch.randn(n, d, generator=g)
            self.y = (self.x @ self.teacher > 0).long()
            self.xv = torch.randn(200, d, generator=g)
            self.yv = (self.xv @ self.teacher > 0).long()

        def train_dataloader(self) -> Any:
            ds = torch.utils.data.TensorDataset(self.x, self.y)
            return torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

        def val_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.xv, self.yv), batch_size=64)

    return UserModel, BlobData
