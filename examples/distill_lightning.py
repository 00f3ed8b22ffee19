"""Distil the ensemble of a window into one model, with Lightning.

A digits MLP is trained at a constant learning rate with ``CheckpointAverager``; the window's
snapshots then form a prediction ensemble (``window.ensemble``), and a fresh student of the same
size is trained on it with ``ckptavg.ensembles.distillation_loss`` in its ``training_step``. The script
prints the accuracy of the raw model, the merged model, the ensemble and the student.

    python examples/distill_lightning.py [--steps 600]
"""

from __future__ import annotations

import argparse
import copy

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckptavg import CheckpointAverager, Ensemble
from ckptavg.ensembles import distillation_loss


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Student(L.LightningModule):
    """A model of its own, trained to match ``teacher`` (frozen, in eval mode) and the labels."""

    def __init__(self, teacher: nn.Module, temperature: float = 2.0) -> None:
        super().__init__()
        self.net = mlp()
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss = distillation_loss(self.net(x), teacher_logits, y, temperature=self.temperature)
        self.log("distill_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=3e-3)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=397)
    L.seed_everything(0)
    options = dict(
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    classifier = Classifier()
    averager = CheckpointAverager(window=8, merge_at_end=False)
    L.Trainer(callbacks=[averager], **options).fit(classifier, train, val)
    raw = copy.deepcopy(classifier.net)
    merged = averager.window.merged_model(classifier, "sma").net
    # The window holds the LightningModule's names ("net.0.weight"): the ensemble is of that module.
    teacher = Ensemble.from_window(averager.window, classifier, average="probs")
    student = Student(teacher)
    L.Trainer(**options).fit(student, train)
    for name, model in (
        ("raw", raw),
        ("merged (SMA)", merged),
        ("ensemble of the window", teacher),
        ("distilled student", student.net),
    ):
        print(f"{name:<24} accuracy {accuracy(model, x[1400:], y[1400:]):.4f}")


if __name__ == "__main__":
    main()
