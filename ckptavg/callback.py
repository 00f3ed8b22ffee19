"""``CheckpointAverager``: the Lightning adapter over :class:`ckptavg.CheckpointWindow`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from . import _evaluation
from .merges import DEFAULT_ALPHA, check_alpha, coefficients
from .window import CheckpointWindow, load_state

MERGED_PREFIX = "merged/"
MERGED_FILENAME = "merged.safetensors"


class CheckpointAverager(Callback):
    """Keep a rolling window of checkpoints, preview their merge during validation, and finish
    the run with the merged model instead of relying on a decay schedule.

    Args:
        window: snapshots kept (the oldest is evicted).
        every_n_steps: snapshot at every optimizer step (``trainer.global_step``, so gradient
            accumulation is accounted for) that is a multiple of this.
        every_n_epochs: snapshot at the end of every this many training epochs. When neither
            cadence is given, a snapshot is taken at the end of every epoch.
        start_step: no snapshot at or before this optimizer step (skip the warm-up).
        merge: ``"sma"``, ``"wma"`` or ``"ema"``: the merge used for previews and at the end.
        alpha: the EMA coefficient, in (0, 1].
        storage: ``"cpu"`` (host memory; saved inside Lightning checkpoints) or ``"disk"``
            (safetensors files in ``dirpath``, reopened on resume).
        dirpath: where the disk window and ``merged.safetensors`` go; by default
            ``<trainer.log_dir or default_root_dir>/ckptavg``. On a resumed run without an explicit
            ``dirpath``, the folder recorded in the checkpoint is reused.
        preview: in each validation run, once the window holds two snapshots, evaluate the merged
            weights on the same data and log every validation metric again as ``merged/<name>``.
        merge_at_end: when training ends, load the merged weights into the module and write them
            to ``dirpath/merged.safetensors`` (the trainer's own checkpoints keep the raw weights,
            so training can be resumed).

    Example::

        from lightning.pytorch import Trainer
        from ckptavg import CheckpointAverager

        trainer = Trainer(max_steps=2000, callbacks=[CheckpointAverager(window=8, every_n_steps=100)])
        trainer.fit(model, train_loader, val_loader)   # logs val_loss and merged/val_loss
        # model now holds the SMA of the last 8 snapshots; merged.safetensors is in the log dir
    """

    def __init__(
        self,
        window: int = 8,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        start_step: int = 0,
        merge: Literal["sma", "wma", "ema"] = "sma",
        alpha: float = DEFAULT_ALPHA,
        storage: Literal["cpu", "disk"] = "cpu",
        dirpath: str | os.PathLike[str] | None = None,
        preview: bool = True,
        merge_at_end: bool = True,
    ):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("give every_n_steps or every_n_epochs, not both")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
        coefficients(merge, 1, alpha)  # validates the method name
        if not isinstance(merge, str):
            raise ValueError(f"merge must be 'sma', 'wma' or 'ema', got {merge!r}")
        if storage not in ("cpu", "disk"):
            raise ValueError(f"storage must be 'cpu' or 'disk', got {storage!r}")
        self.window_size = window
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs if every_n_steps is not None or every_n_epochs is not None else 1
        self.start_step = start_step
        self.merge = merge.lower()
        self.alpha = check_alpha(alpha)
        self.storage = storage
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.preview = preview
        self.merge_at_end = merge_at_end
        self.final_metrics: dict[str, dict[str, float]] = {}
        self._window: CheckpointWindow | None = None
        self._pending_state: dict[str, Any] | None = None
        self._default_dirpath: Path | None = None
        self._rank, self._world_size = 0, 1
        self._last_validation: tuple[int, tuple[int, ...], dict[str, float], dict[str, float]] | None = None

    # -- where things live --------------------------------------------------------------------------

    @property
    def window(self) -> CheckpointWindow:
        """The underlying window (created on first use, after a checkpoint has been restored)."""
        if self._window is None:
            self._window = self._build_window()
        return self._window

    def _resolved_dirpath(self) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        if self._pending_state is not None and self._pending_state.get("dirpath"):
            return Path(self._pending_state["dirpath"])  # a resumed run reuses the original folder
        if self._default_dirpath is not None:
            return self._default_dirpath
        return Path("ckptavg")

    def _window_dirpath(self) -> Path:
        base = self._resolved_dirpath() / "window"
        return base / f"rank{self._rank}" if self._world_size > 1 else base

    def _build_window(self) -> CheckpointWindow:
        if self.storage == "disk":
            win = CheckpointWindow(self.window_size, storage="disk", dirpath=self._window_dirpath())
        else:
            win = CheckpointWindow(self.window_size)
        if self._pending_state is not None and self._pending_state.get("window") is not None:
            win.load_state_dict(self._pending_state["window"])
        self._pending_state = None
        return win

    # -- lifecycle ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        root = trainer.log_dir or trainer.default_root_dir  # log_dir is broadcast from rank 0
        self._default_dirpath = Path(root) / "ckptavg"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._window is not None:
            self._window.close()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window is not None and self._window.steps and self._window.steps[-1] > trainer.global_step:
            # A new fit with the same callback object: its snapshots belong to another run.
            rank_zero_warn(
                f"CheckpointAverager: the window holds snapshots up to step {self._window.steps[-1]} but training "
                f"starts at step {trainer.global_step}; starting a new window"
            )
            self._window.close()
            self._window = None

    # -- snapshots ----------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > self.start_step and step % self.every_n_steps == 0:
            self._snapshot(pl_module, step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if trainer.global_step > self.start_step:
                self._snapshot(pl_module, trainer.global_step)

    def _snapshot(self, pl_module: pl.LightningModule, step: int) -> None:
        steps = self.window.steps
        if steps and step <= steps[-1]:
            return  # the same optimizer step seen again (gradient accumulation, or a resumed run)
        self.window.snapshot(pl_module, step=step)

    # -- performance preview ------------------------------------------------------------------------

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        raw = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if not k.startswith(MERGED_PREFIX)}
        merged_metrics: dict[str, float] = {}
        # Every rank must take the same decision: the preview runs collective operations.
        if self.preview and trainer.strategy.reduce_boolean_decision(len(self.window) >= 2, all=True):
            collected = self._evaluate(trainer, pl_module, swap_in_merge=True)
            self._publish(trainer, collected)
            merged_metrics = {k: _scalar(v) for k, v in collected["callback"].items()}
            raw = {k: v for k, v in raw.items() if k in merged_metrics}
        self._last_validation = (trainer.global_step, tuple(self.window.steps), raw, merged_metrics)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, swap_in_merge: bool) -> dict[str, dict[str, Any]]:
        """Run validation once more, on the merged weights swapped in or on the module's current
        weights, and return what it logged."""
        with _evaluation.isolated_validation(trainer) as loop:
            if swap_in_merge:
                with self.window.swapped(pl_module, self.merge, self.alpha):
                    loop.run()
            else:
                loop.run()
            return _evaluation.collected_metrics(trainer)

    def _publish(self, trainer: pl.Trainer, collected: dict[str, dict[str, Any]]) -> None:
        """Add the preview's metrics as ``merged/<name>``: callback metrics, progress bar, loggers."""
        connector = trainer._logger_connector
        connector._callback_metrics.update({MERGED_PREFIX + k: v for k, v in collected["callback"].items()})
        connector._progress_bar_metrics.update({MERGED_PREFIX + k: v for k, v in collected["pbar"].items()})
        logged = {MERGED_PREFIX + k: v for k, v in collected["log"].items()}
        if logged:
            connector.log_metrics(logged)  # the same step the raw validation metrics were logged at

    # -- end of the run -----------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.merge_at_end:
            return
        if len(self.window) == 0:
            rank_zero_warn("CheckpointAverager: no snapshot was taken, so the model keeps its raw weights")
            return
        validate = _evaluation.has_validation(trainer)
        last = self._last_validation
        fresh = last is not None and last[0] == trainer.global_step and last[1] == tuple(self.window.steps) and last[3]
        raw = last[2] if fresh else (self._scalars(self._evaluate(trainer, pl_module, swap_in_merge=False)) if validate else {})

        merged = self.window.merge(self.merge, self.alpha)
        load_state(pl_module, merged)
        _broadcast_module(pl_module)  # every rank ends with rank 0's merged weights, bit for bit
        if self._rank == 0:
            self._export(merged)
        if validate:
            merged_metrics = last[3] if fresh else self._scalars(self._evaluate(trainer, pl_module, swap_in_merge=False))
            self._report_final(trainer, raw, merged_metrics)

    @staticmethod
    def _scalars(collected: dict[str, dict[str, Any]]) -> dict[str, float]:
        return {k: _scalar(v) for k, v in collected["callback"].items()}

    def _export(self, merged: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        steps = self.window.steps
        metadata = {
            "format": "ckptavg.merged",
            "method": self.merge,
            "alpha": repr(self.alpha),
            "steps": json.dumps(steps),
            "coefficients": json.dumps(self.window.weights(self.merge, self.alpha)),
        }
        path = self._resolved_dirpath() / MERGED_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(merged, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        rank_zero_info(f"CheckpointAverager: wrote {self.merge.upper()} of steps {steps[0]}..{steps[-1]} to {path}")
        return path

    def _report_final(self, trainer: pl.Trainer, raw: dict[str, float], merged: dict[str, float]) -> None:
        names = [k for k in merged if k in raw]
        self.final_metrics = {"raw": {k: raw[k] for k in names}, "merged": {k: merged[k] for k in names}}
        if not names:
            return
        logged = {f"final/raw/{k}": raw[k] for k in names} | {f"final/merged/{k}": merged[k] for k in names}
        trainer._logger_connector.log_metrics(dict(logged))
        width = max(len(k) for k in names)
        lines = [f"{'metric':<{width}}  {'raw':>12}  {'merged':>12}  {'change':>8}"]
        for k in names:
            change = (merged[k] - raw[k]) / abs(raw[k]) * 100 if raw[k] else math.nan
            lines.append(f"{k:<{width}}  {raw[k]:>12.6g}  {merged[k]:>12.6g}  {change:>7.2f}%")
        rank_zero_info("CheckpointAverager: final raw vs merged weights\n" + "\n".join(lines))

    # -- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self._window.state_dict() if self._window is not None else None,
            "dirpath": str(self._resolved_dirpath()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._window is not None:
            self._window.close()
            self._window = None
        self._pending_state = dict(state_dict)  # applied when the window is first used


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


def _broadcast_module(module: torch.nn.Module) -> None:
    """Make every rank hold rank 0's values (a no-op outside ``torch.distributed``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
