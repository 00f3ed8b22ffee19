"""Issue 19: the edges a new user and three adversarial rounds found, each reproduced first."""

from __future__ import annotations

import threading

import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar

from ckptavg import CheckpointAverager
from lit_helpers import Regression, data, trainer


class RendersTheBar(Regression):
    """Renders the Rich progress bar in every validation step, as Rich's refresh thread does at
    any moment (deterministically here, in the main thread)."""

    bars: list

    def validation_step(self, batch, batch_idx):
        bar = self.trainer.progress_bar_callback
        self.bars.append(bar)
        if bar is not None and bar.progress is not None:
            bar.progress.refresh()  # renders every column, as the refresh thread does
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("explicit", [True, False])
def test_the_rich_progress_bar_survives_the_preview(tmp_path, explicit):
    thread_errors: list = []
    previous = threading.excepthook
    threading.excepthook = lambda args: thread_errors.append(args.exc_value)
    try:
        model = RendersTheBar()
        model.bars = []
        train, val = data()
        callbacks = [CheckpointAverager(window=3, every_n_steps=4, recover=False)]
        if explicit:
            callbacks.append(RichProgressBar(console_kwargs={"force_terminal": True}))
        run = trainer(tmp_path, callbacks, enable_progress_bar=True, max_epochs=2, val_check_interval=8)
        run.fit(model, train, val)
    finally:
        threading.excepthook = previous
    assert thread_errors == []
    assert isinstance(run.progress_bar_callback, RichProgressBar)  # Lightning's default when rich is installed
    assert all(bar is run.progress_bar_callback for bar in model.bars)  # the preview's runs too
    assert "merged/val_loss" in run.callback_metrics
