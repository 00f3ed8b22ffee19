"""A tiny LightningModule, its data, and a recorder of the weights at every optimizer step."""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


class Regression(L.LightningModule):
    """A small MLP on a noisy linear target; logs val_loss (a tensor) and val_mae (a torchmetrics
    object), like a typical module."""

    def __init__(self, dropout: float = 0.0, lr: float = 0.05, fail_after_val_calls: int | None = None):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(32, 1)
        )
        self.lr = lr
        self.val_mae = torchmetrics.MeanAbsoluteError()
        self.fail_after_val_calls = fail_after_val_calls
        self.val_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_calls += 1
        if self.fail_after_val_calls is not None and self.val_calls > self.fail_after_val_calls:
            raise RuntimeError("validation failed on purpose")
        x, y = batch
        prediction = self(x)
        self.log("val_loss", torch.nn.functional.mse_loss(prediction, y), prog_bar=True)
        self.val_mae(prediction, y)
        self.log("val_mae", self.val_mae)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(n_train: int = 256, batch_size: int = 16, shuffle: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + 64, 8, generator=generator)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.3 * torch.randn(n_train + 64, 1, generator=generator)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=shuffle)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=16)
    return train, val


def val_loss_of(model: torch.nn.Module, val: DataLoader) -> float:
    """The mean of per-batch MSE (all batches are the same size, so it equals Lightning's)."""
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.mse_loss(model(x), y) for x, y in val]
    return float(torch.stack(losses).mean())


class Recorder(Callback):
    """Records the module's weights after every optimizer step, and the raw weights and metrics at
    the end of each validation run (placed before the averager, it sees them before the preview)."""

    def __init__(self):
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.at_validation: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.at_validation.append(
                (trainer.global_step, {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            )


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def finish() -> None:
    """End a two-process worker: destroy the process group Lightning leaves initialised first (at
    interpreter exit, gloo's threads can otherwise abort the process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(0)


class DigitsClassifier(L.LightningModule):
    """An MLP on scikit-learn's bundled 8x8 digits, AdamW at a constant learning rate: the
    per-batch training loss goes to about zero, with heavy-tailed outliers (a batch holding one
    misclassified example)."""

    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def digits(batch_size: int = 32):
    """scikit-learn's digits (1797 images): 1437 for training (shuffled), 360 for validation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train = DataLoader(TensorDataset(x[:1437], y[:1437]), batch_size=batch_size, shuffle=True)
    return train, DataLoader(TensorDataset(x[1437:], y[1437:]), batch_size=120)


class RegressionData(L.LightningDataModule):
    """:func:`data` as a datamodule (for LightningCLI)."""

    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return data(batch_size=self.batch_size)[0]

    def val_dataloader(self):
        return data(batch_size=self.batch_size)[1]
