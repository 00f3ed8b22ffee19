"""Make a run diverge on purpose, to see recovery work (tests, benchmarks, the demo, your own
settings).

    from ckptavg.lightning.testing import InjectDivergence

    trainer = Trainer(callbacks=[CheckpointAverager(window=8, every_n_steps=50), InjectDivergence({1200})])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..layout import local_tensor


class InjectDivergence(Callback):
    """Make the chosen optimizer steps diverge.

    Args:
        steps: the optimizer steps (``trainer.global_step`` after the step) to sabotage.
        mode: ``"nan"``: one parameter holds NaN during the step's forward pass, so the loss, the
            gradients and, after the optimizer step, the weights turn NaN (like a bad batch);
            ``"lr"``: the learning rate is multiplied by ``lr_factor`` for the step.
        lr_factor: the multiplier for ``mode="lr"``.
        rank: sabotage only this global rank (default: every rank).
    """

    def __init__(
        self,
        steps: Iterable[int],
        mode: Literal["nan", "lr"] = "nan",
        lr_factor: float = 1000.0,
        rank: int | None = None,
    ):
        if mode not in ("nan", "lr"):
            raise ValueError(f"mode must be 'nan' or 'lr', got {mode!r}")
        self.steps, self.mode, self.lr_factor, self.rank = set(steps), mode, lr_factor, rank
        self._undo: list[tuple[Any, Any, Any]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step + 1 not in self.steps or (self.rank is not None and trainer.global_rank != self.rank):
            return
        if self.mode == "lr":
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    self._undo.append((group, "lr", group["lr"]))
                    group["lr"] = group["lr"] * self.lr_factor
        else:
            # The rank's own data (a DTensor's local shard): writing through a DTensor would communicate.
            local = next(t for t in map(local_tensor, pl_module.parameters()) if t.is_floating_point() and t.numel())
            with torch.no_grad():
                local.view(-1)[0] = float("nan")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for target, key, value in self._undo:
            target[key] = value
        self._undo.clear()
