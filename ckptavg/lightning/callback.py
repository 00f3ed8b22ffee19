"""``CheckpointAverager``: the Lightning adapter over :class:`ckptavg.training.TrainingSession`.

Each hook translates one Lightning event into a session call; the decisions (cadence, recovery,
the end-of-fit pick, judge and export) live in the session. Lightning's private names are read
only in :mod:`ckptavg.lightning._internals`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from ..files import atomic_write
from ..layout import state_tensors
from ..methods import DEFAULT_ALPHA, MergeSpec
from ..recovery import RecoveryEvent, RecoveryPolicy
from ..sharding import is_dtensor
from ..training import (
    ENSEMBLE_PREFIX,
    MERGED_FILENAME,
    MERGED_PREFIX,
    AveragerConfig,
    NamedMerge,
    TrainingSession,
    scalar,
    warnings_pointing_at,
)
from . import _internals

RAW_STATE_KEY = "ckptavg_raw_state_dict"  # a Lightning checkpoint's raw weights, when its state_dict holds a merge
HOLDS_KEY = "ckptavg_state_dict_holds"  # which merge, of which steps, its state_dict holds


class CheckpointAverager(Callback):
    """Keep a rolling window of checkpoints, preview their merge during validation, and finish
    the run with the merged model instead of relying on a decay schedule.

    Args:
        window: snapshots kept (the oldest is evicted).
        every_n_steps: snapshot at every optimizer step (``trainer.global_step``, so gradient
            accumulation is accounted for) that is a multiple of this.
        every_n_epochs: snapshot at the end of every this many training epochs. When neither
            cadence is given, it is chosen at ``fit`` start from the run's length (the trainer's
            ``estimated_stepping_batches``): a snapshot every ``steps // (10 x window)`` optimizer
            steps, so that the full window spans the last tenth of the run, in step-based and
            epoch-based runs alike (a run of unknown length: every epoch). The choice is logged.
        start_step: no snapshot at or before this optimizer step (skip the warm-up).
        merge: the merge method used for previews, restores and at the end: ``"sma"``,
            ``"wma"``, ``"ema"``, ``"decay"`` or any registered name
            (:func:`ckptavg.methods.method_names`), or a :class:`ckptavg.MergeSpec` (a method
            with its options).
        merge_options: the method's options by name, for example ``{"shape": "1-sqrt"}`` for
            ``merge="decay"`` (checked at construction).
        alpha: the EMA coefficient, in (0, 1].
        storage: ``"cpu"`` (host memory; saved inside Lightning checkpoints), ``"disk"``
            (safetensors files in ``dirpath``, reopened on resume) or ``"auto"`` (disk when the
            trainer writes checkpoints, else cpu).
        dirpath: where the disk window and ``merged.safetensors`` go; by default
            ``<trainer.log_dir or default_root_dir>/ckptavg``. A run resumed (or forked) into
            another folder than the checkpoint's starts its disk window there from hard links to
            the snapshots it inherits; the checkpoint's folder is only read. Resumed in the same
            folder, the window goes on in place (a finished run's folder refuses a fork).
        preview: in each validation run, evaluate the merged weights on the same data and log
            every validation metric again as ``merged/<name>`` (before the first snapshot the
            merge is the current model: the raw numbers are reused), so that ``merged/<name>``
            can be monitored by ModelCheckpoint and EarlyStopping.
        preview_every: preview at every this many validations (the first included); the ones
            between log no ``merged/`` metrics, so nothing may monitor them (refused at fit start).
        preview_batches: the validation batches each preview (and each candidate) evaluates: a
            count, a fraction in (0, 1], or ``None`` for all. The raw metrics keep every batch;
            the ``merged/`` ones are then on the first batches only (said at fit start).
        merge_at_end: when training ends, load the merged weights into the module and write them
            to ``dirpath/merged.safetensors`` (the trainer's own checkpoints keep the raw weights,
            so training can be resumed).
        recover: restore a merged stable point when training diverges, and keep training (see
            :class:`ckptavg.RecoveryPolicy` for the rule: conservative, it judges a smoothed loss,
            and checks on the current batch that restoring helps): ``True`` (default policy),
            ``False``, a ``RecoveryPolicy``, or a mapping of its fields (for YAML configs).
        spread: under DDP, keep only ``1/world`` of every snapshot on each rank (host memory per rank
            ``window x model / world``); merges are computed on the slices and gathered into every
            replica. ``False`` keeps a full window on every rank. (FSDP2 shards, under
            ``ModelParallelStrategy``, are always kept apart: each rank snapshots, merges and
            restores its own shards.)
        keep: what the module holds after fit: ``"merged"`` (the merged weights, always) or
            ``"best"`` (the merged weights unless they score worse than the raw ones on
            ``monitor``; then the raw weights, and ``merged.safetensors`` is still written). In
            both cases, merged weights that score worse are reported in a warning.
        monitor: the validation metric that judges raw against merged at the end; by default the
            ``monitor`` of the trainer's ModelCheckpoint or EarlyStopping (``merged/`` removed),
            else ``val_loss``.
        mode: ``"min"`` or ``"max"``: whether a lower or a higher ``monitor`` is better (by
            default taken from the callback whose monitor is used).
        export_module: the submodule whose merged weights ``merged.safetensors`` holds, by its
            attribute path in the LightningModule (``"model"``), so that the file loads into that
            model on its own: names without the prefix, a ``torch.compile`` wrapper unwrapped,
            tied weights stored once (load with ``safetensors.torch.load_model``). By default
            the whole LightningModule.
        decay: the EMA decay in the spelling of timm's ModelEma, ema-pytorch and Lightning's
            EMAWeightAveraging: ``alpha = 1 - decay``. Give ``alpha`` or ``decay``, not both.
            Note that the EMA here runs over the window's snapshots, not over every step, and is
            seeded with the oldest snapshot, which keeps the weight of the whole tail
            (``(1 - alpha)^(N-1)``): a decay close to 1 puts almost all weight on the oldest
            snapshot (``decay=0.999`` over 8 snapshots: 99.3%), unlike a per-step EMA.
        candidates: more merges to preview at each validation, each logged as
            ``merged/<name>/<metric>`` (one more validation run each): a list of method names
            (``["wma", "ema"]``) or a mapping of names to a method name or to
            ``{"method": ..., **options}`` (``{"cos": {"method": "decay", "shape": "cosine"}}``;
            ``alpha`` or ``decay`` there for an EMA). Checked at construction.
        select: a validation metric (``"val_loss"``): at the end of fit, the merge with the best
            value of it, among ``merge`` and the ``candidates`` (``mode`` says whether lower or
            higher is better), is the one the module holds and ``merged.safetensors`` stores,
            with the pick and every candidate's score in its metadata (``averager.selection``).
            Chosen on the validation data, the picked merge's score on that data is optimistic:
            choose on a second validation loader (``select="val_loss/dataloader_idx_1"``) and
            report the first.
        log_correlation: after each snapshot (from the third), log the window's correlation
            summary (:meth:`CheckpointWindow.correlation`): ``ckptavg/min_weight_cosine``,
            ``ckptavg/update_cosine``, ``ckptavg/deviation_corr``, ``ckptavg/relative_spread``
            and ``ckptavg/average_ok`` (1 when the verdict is "average"). It reads the whole
            window once per snapshot and costs about ten merges, so it is off by default. One process only.
        preview_ensemble: in each validation, also evaluate the prediction ensemble of the
            window's snapshots (the mean of their outputs) and log ``ensemble/<metric>``: what the
            merge gives up against the ensemble it approximates. The module's ``forward`` is
            replaced for that run, so ``validation_step`` must call ``self(...)``; otherwise a
            warning says so and nothing is logged. Costs one validation run with every snapshot
            swapped in for each batch (``window`` forward passes and weight copies per batch).

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
        merge: str | MergeSpec = "sma",
        alpha: float = DEFAULT_ALPHA,
        storage: Literal["auto", "cpu", "disk"] = "auto",
        dirpath: str | os.PathLike[str] | None = None,
        preview: bool = True,
        preview_every: int = 1,
        preview_batches: int | float | None = None,
        merge_at_end: bool = True,
        recover: bool | RecoveryPolicy | dict[str, Any] = True,
        spread: bool = True,
        decay: float | None = None,
        keep: Literal["merged", "best"] = "merged",
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        export_module: str | None = None,
        merge_options: dict[str, Any] | None = None,
        candidates: list[str] | dict[str, Any] | None = None,
        select: str | None = None,
        log_correlation: bool = False,
        preview_ensemble: bool = False,
    ):
        self.config = AveragerConfig(
            window=window, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, start_step=start_step,
            merge=merge, alpha=alpha, storage=storage, dirpath=dirpath, preview=preview, preview_every=preview_every,
            preview_batches=preview_batches, merge_at_end=merge_at_end,
            recover=recover, spread=spread, decay=decay, keep=keep, monitor=monitor, mode=mode,
            export_module=export_module, merge_options=merge_options, candidates=candidates, select=select,
            log_correlation=log_correlation, preview_ensemble=preview_ensemble,
        )  # fmt: skip
        self.session = TrainingSession(
            self.config, name="CheckpointAverager", info=_info, warn=_warn, log_metrics=self._log_metrics
        )
        self._trainer: pl.Trainer | None = None
        self._ensemble_unsupported = False  # the module's validation never called its forward
        self.merged_path: Path | None = None  # where the end of the run wrote merged.safetensors (rank 0)
        self._trained = False  # whether this fit ran the training loop (on_train_end)
        self._unwatched_warned = False  # training_step returned no loss to watch (said once per fit)
        self._names_checked = False  # select and monitor were found among the logged metrics
        self._checkpoint_merge: NamedMerge | None = None  # what checkpoints' state_dict holds (None: raw)

    # The settings, by their argument names (read-only views of the config).
    window_size = property(lambda self: self.config.window)
    every_n_steps = property(lambda self: self.config.every_n_steps)
    every_n_epochs = property(lambda self: self.config.every_n_epochs)
    start_step = property(lambda self: self.config.start_step)
    storage = property(lambda self: self.config.storage)
    dirpath = property(lambda self: self.session.dirpath)
    preview = property(lambda self: self.config.preview)
    merge_at_end = property(lambda self: self.config.merge_at_end)
    spread = property(lambda self: self.config.spread)
    keep = property(lambda self: self.config.keep)
    monitor = property(lambda self: self.config.monitor)
    mode = property(lambda self: self.config.mode)
    export_module = property(lambda self: self.config.export_module)
    select = property(lambda self: self.config.select)
    log_correlation = property(lambda self: self.config.log_correlation)
    preview_ensemble = property(lambda self: self.config.preview_ensemble)
    recovery = property(lambda self: self.config.recovery)
    candidates = property(lambda self: self.session.candidates)
    merge = property(lambda self: self.session.main.method, doc="The main merge's method.")
    alpha = property(lambda self: self.session.main.alpha)
    merge_options = property(lambda self: self.session.main.options)
    # What the run did.
    window = property(lambda self: self.session.window, doc="The window (built on first use).")
    guard = property(lambda self: self.session.guard, doc="The spike guard (``None`` with ``recover=False``).")
    final_metrics = property(lambda self: self.session.final_metrics)
    selection = property(lambda self: self.session.selection)
    last_correlation = property(lambda self: self.session.last_correlation)
    _storage = property(lambda self: self.session.storage)

    @property
    def recovery_events(self) -> list[RecoveryEvent]:
        """Every recovery decision so far, with its evidence (also across a resume): restores, and
        any ``"gave up"`` or ``"accepted"`` events (see :class:`ckptavg.RecoveryEvent`)."""
        return self.session.recovery_events

    @property
    def state_key(self) -> str:
        # Two averagers in one Trainer (say an SMA and an EMA window) keep separate checkpoint state.
        return self._key_for(self.storage)

    def _key_for(self, storage: str) -> str:
        return self._generate_state_key(
            window=self.window_size, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs,
            merge=self.merge, storage=storage, dirpath=None if self.dirpath is None else str(self.dirpath),
        )  # fmt: skip

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self._trainer.loggers if self._trainer is not None else []:
            logger.log_metrics(metrics, step=step)

    # -- lifecycle ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _internals.check_version()
        self._trainer = trainer
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "CheckpointAverager works on FSDP2 shards (DTensor parameters). Lightning's FSDPStrategy wraps FSDP1 "
                "flat parameters, whose state_dict() gathers every full tensor on every rank; use "
                "ModelParallelStrategy and torch.distributed.fsdp.fully_shard in configure_model() instead"
            )
        averagers = [cb for cb in trainer.callbacks if isinstance(cb, CheckpointAverager)]  # type: ignore[attr-defined]
        index = next(i for i, cb in enumerate(averagers) if cb is self)
        root = trainer.log_dir or trainer.default_root_dir  # log_dir is broadcast from rank 0
        self.session.bind(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            # A run that writes checkpoints keeps its window on disk: a cpu window would ride in every
            # checkpoint (window x model each); checkpoints then carry the folder's path and steps.
            storage=("disk" if trainer.checkpoint_callbacks else "cpu") if self.storage == "auto" else self.storage,
            # DDP replicas are identical: each rank keeps 1/world of the window (FSDP2 shards are already apart).
            spread=self.spread and isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1,
            default_dirpath=Path(root) / ("ckptavg" if index == 0 else f"ckptavg-{index}"),  # a second: its own
            root=Path(trainer.default_root_dir).absolute(),
        )
        self._checkpoint_merge = self._checkpoint_holds(trainer)
        self._names_checked = not _internals.has_validation_step(trainer)
        self._check_no_clash(trainer)
        self.session.check_judges_see_previews(
            [
                f"{type(cb).__name__}(monitor={cb.monitor!r})"
                for cb in trainer.callbacks  # type: ignore[attr-defined]
                if str(getattr(cb, "monitor", None) or "").startswith(MERGED_PREFIX)
            ]
        )
        # Callbacks that monitor merged/<metric> read it in their own on_validation_end: this
        # callback must publish it first, whatever the list order.
        _internals.move_before(
            trainer,
            self,
            lambda cb: str(getattr(cb, "monitor", None) or "").startswith((MERGED_PREFIX, ENSEMBLE_PREFIX)),
        )

    def _check_no_clash(self, trainer: pl.Trainer) -> None:
        """Two averagers in one Trainer must not publish the same metrics, write the same files or
        both restore the model: refused before the first step, naming what they would share."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self:
                return  # each pair is checked once, by the later of the two
            if not isinstance(other, CheckpointAverager):
                continue
            mine, theirs = self.session, other.session
            shared = []
            if self.preview and other.preview and _internals.has_validation_step(trainer):
                shared.append(f"the metrics {MERGED_PREFIX}<name> (preview=True)")
            same_folder = mine.folder.absolute() == theirs.folder.absolute()
            if same_folder and self.merge_at_end and other.merge_at_end:
                shared.append(f"the file {mine.folder / MERGED_FILENAME} (merge_at_end=True)")
            if same_folder and mine.storage == theirs.storage == "disk":
                shared.append(f"the disk window in {mine.window_folder}")
            if self.recovery is not None and other.recovery is not None:
                shared.append("restoring the model after a spike (recover)")
            if shared:
                raise ValueError(
                    "CheckpointAverager: two CheckpointAveragers in this Trainer would share "
                    + "; ".join(shared)
                    + ". "
                    "To preview several merges of one window use candidates=[...]; otherwise give the second its own dirpath "
                    "and preview=False, merge_at_end=False or recover=False where they overlap"
                )

    def _checkpoint_holds(self, trainer: pl.Trainer) -> NamedMerge | None:
        """Which weights a Lightning checkpoint's ``state_dict`` holds: the merge its
        ModelCheckpoint monitors (``merged/<metric>``: the main merge; ``merged/<candidate>/<metric>``:
        that candidate), the raw weights when every ModelCheckpoint monitors a raw metric, and with no
        monitor the main merge when the run ends with it (``merge_at_end``). ``None``: raw."""
        monitors = [str(m) for cb in trainer.checkpoint_callbacks if (m := getattr(cb, "monitor", None))]
        merged = [m for m in monitors if m.startswith(MERGED_PREFIX)]
        main = self.session.main
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            # Sharded strategies save distributed checkpoints, loaded in place: they keep the raw weights.
            if merged:
                _warn(
                    f"CheckpointAverager: under {type(trainer.strategy).__name__} checkpoints hold the raw weights; the merge "
                    f"that {merged[0]} measured is ckptavg.load_merged_weights(checkpoint) (or `ckptavg export`)"
                )
            return None
        if not merged:
            return None if monitors or not self.merge_at_end else main
        chosen = [self.candidates.get(m.removeprefix(MERGED_PREFIX).split("/")[0], main) for m in merged]
        spec = chosen[0]
        if len(merged) < len(monitors) or len({s.name for s in chosen}) > 1:
            _warn(
                f"CheckpointAverager: the trainer's ModelCheckpoints monitor {monitors}; every checkpoint holds the "
                f"{spec.name} merge as its state_dict, so the others' scores were measured on other weights"
            )
        for cb in trainer.checkpoint_callbacks:
            monitor = str(getattr(cb, "monitor", None) or "")
            if getattr(cb, "save_weights_only", False) and monitor.startswith(MERGED_PREFIX):
                _warn(
                    f"CheckpointAverager: ModelCheckpoint(monitor={monitor!r}, save_weights_only=True) saves the raw weights: "
                    "Lightning calls no callback when it saves weights only. Drop save_weights_only to save the merged ones"
                )
        return spec

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The checkpoint's ``state_dict`` holds the weights its monitored metric measured (see
        :meth:`_checkpoint_holds`); the raw weights ride beside them, for resuming."""
        spec = self._checkpoint_merge
        if spec is None or not self.session.has_snapshots or RAW_STATE_KEY in checkpoint:
            return
        with spec.swapped(self.window, pl_module):
            merged = {k: v.detach().clone() for k, v in trainer.strategy.lightning_module_state_dict().items()}
        checkpoint[RAW_STATE_KEY], checkpoint["state_dict"] = checkpoint["state_dict"], merged
        checkpoint[HOLDS_KEY] = {"merge": spec.name, "steps": self.window.steps}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Resuming continues the raw run (Lightning has just loaded the merged state_dict); testing or
        # validating a checkpoint keeps the merged weights it scored.
        if trainer.state.fn == "fit" and RAW_STATE_KEY in checkpoint:
            raw = checkpoint[RAW_STATE_KEY]
            if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
                raise ValueError(
                    f"the checkpoint's field {RAW_STATE_KEY!r} must map names to tensors (the raw weights to resume)"
                )
            trainer.strategy.load_model_state_dict(
                {"state_dict": checkpoint[RAW_STATE_KEY]}, strict=pl_module.strict_loading
            )
        states = checkpoint.get("callbacks") or {}
        if self.storage == "auto" and self.state_key not in states:
            # A checkpoint of ckptavg 0.1, whose default tier was "cpu": its window continues here.
            legacy = next((states[k] for k in (self._key_for("cpu"), self._key_for("disk")) if k in states), None)
            if legacy is not None:
                self.load_state_dict(legacy)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.session.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: finish the writes and free the folder here, so a
        # new run (or a notebook's next attempt) can open it. The window stays readable.
        self.session.close()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_module:
            try:
                pl_module.get_submodule(self.export_module)
            except AttributeError:
                children = [name for name, _ in pl_module.named_children()]
                raise ValueError(
                    f"export_module={self.export_module!r} is not a submodule of {type(pl_module).__name__} (its children: {children})"
                ) from None
        self.session.plan(trainer.estimated_stepping_batches, trainer.max_epochs, trainer.global_step)
        self._unwatched_warned = False
        self.session.begin(pl_module, trainer.global_step, checkpoints_carry_window=bool(trainer.checkpoint_callbacks))

    # -- snapshots ----------------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.session.restore_learning_rates()
        step = trainer.global_step
        if self.guard is not None:
            self._watch(trainer, pl_module, outputs, batch, batch_idx)  # first: an abnormal step is never snapshotted
        if self.session.snapshot_due(step):
            self._snapshot(pl_module, step)
        elif trainer.is_last_batch:
            # The epoch's snapshot is taken before its validation, so that the preview measures the
            # window that ModelCheckpoint then saves (it saves at on_train_epoch_end).
            self._epoch_snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_snapshot(trainer, pl_module)  # already taken at the last batch, unless the epoch was cut short

    def _epoch_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session.epoch_snapshot_due(trainer.current_epoch, trainer.global_step):
            self._snapshot(pl_module, trainer.global_step)

    def _snapshot(self, pl_module: pl.LightningModule, step: int) -> None:
        # Under DiLoCoStrategy the model being trained is the global (merged) one, not this replica.
        global_state = getattr(self._trainer.strategy, "global_state", None) if self._trainer is not None else None
        with _warnings_at(pl_module):
            self.session.snapshot(global_state() if callable(global_state) else pl_module, step)

    # -- recovery -----------------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.session.before_optimizer_step([optimizer], trainer.global_step + 1)  # the step about to be taken

    def _watch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Hand the session each micro-batch's loss; it judges the step once the step is taken."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            if pl_module.automatic_optimization:
                loss = loss * trainer.accumulate_grad_batches  # Lightning hands hooks the loss divided for accumulation
            self.session.add_loss(loss)
        elif not pl_module.automatic_optimization and not self._unwatched_warned:
            self._unwatched_warned = True
            _warn(
                f"CheckpointAverager: {type(pl_module).__name__}.training_step returned no loss, so recovery cannot watch "
                "the run and is off (NaN snapshots are still refused). Return the loss from training_step (under "
                "manual optimization too: `return loss`) to turn it on, or pass recover=False to silence this"
            )
        evaluate = _internals.batch_loss(pl_module, batch, batch_idx)  # run only when a restore is due
        with _warnings_at(pl_module):
            self.session.end_step(trainer.global_step, pl_module, trainer.optimizers, evaluate)

    # -- performance preview ------------------------------------------------------------------------

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            return
        if not self._names_checked:
            logged = [
                k
                for k in trainer.callback_metrics
                if not k.startswith((MERGED_PREFIX, ENSEMBLE_PREFIX, "ckptavg/", "train"))
            ]
            if logged:  # a sanity check may log nothing yet: the next validation checks
                self._names_checked = True
                self.session.check_metric_names(logged)
        if trainer.sanity_checking:
            return
        raw = {k: scalar(v) for k, v in trainer.callback_metrics.items() if not k.startswith(MERGED_PREFIX)}
        measured: dict[str, dict[str, float]] = {}
        if self.session.preview_due(trainer.global_step):
            # Published at every validation, so that monitoring merged/<metric> never finds it missing.
            # Every rank must take the same decision: the preview runs collective operations.
            same = trainer.strategy.reduce_boolean_decision(
                self.session.merge_is_current(trainer.global_step), all=True
            )
            current = _internals.last_validation_metrics(trainer) if same else None
            for spec, prefix in self.session.previews():
                collected = current or self._evaluate(trainer, pl_module, spec, self.config.preview_batches)
                self._publish(trainer, collected, prefix, progress_bar=spec is self.session.main)
                measured[spec.name] = self._scalars(collected)
            raw = {k: v for k, v in raw.items() if k in measured[self.session.main.name]}
            if self.preview_ensemble and not self._ensemble_unsupported:
                ensemble_metrics = current or self._evaluate_ensemble(trainer, pl_module)
                if ensemble_metrics is not None:
                    self._publish(trainer, ensemble_metrics, ENSEMBLE_PREFIX, progress_bar=False)
        elif self.preview:
            _internals.unpublish(trainer, (MERGED_PREFIX, ENSEMBLE_PREFIX))
        self.session.record_validation(trainer.global_step, raw, measured)

    def _evaluate_ensemble(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, Any]] | None:
        """Run validation once more with the module's forward replaced by the mean of its outputs
        under each snapshot's weights; ``None`` (and a warning, once) if forward was never called."""
        steps = self.window.steps
        members = [[1.0 if i == j else 0.0 for i in range(len(steps))] for j in range(len(steps))]
        forward = pl_module.forward
        calls = 0

        def ensemble_forward(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            outputs = []
            for weights in members:
                with self.window.swapped(pl_module, weights):
                    outputs.append(forward(*args, **kwargs))
            if not all(isinstance(o, torch.Tensor) for o in outputs):
                raise TypeError(
                    f"preview_ensemble averages tensor outputs; {type(pl_module).__name__}.forward returned {type(outputs[0]).__name__}"
                )
            return torch.stack(outputs).mean(0)

        with _internals.isolated_validation(trainer) as loop:
            with _internals.forward_replaced(pl_module, ensemble_forward):  # this run only
                loop.run()
            collected = _internals.collected_metrics(trainer)
        if calls == 0:
            self._ensemble_unsupported = True
            _warn(
                f"CheckpointAverager(preview_ensemble=True): {type(pl_module).__name__}.validation_step never calls "
                "self(...), so the ensemble cannot be swapped in; nothing is logged as ensemble/<metric>"
            )
            return None
        return collected

    def _evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        merge: NamedMerge | None,
        batches: int | float | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Run validation once more (on its first ``batches``: a count or a fraction; ``None``: all),
        on ``merge`` swapped in (``None``: the module's current weights), and return what it logged."""
        with _internals.isolated_validation(trainer, batches) as loop:
            if merge is not None:
                with merge.swapped(self.window, pl_module):
                    loop.run()
            else:
                loop.run()
            return _internals.collected_metrics(trainer)

    def _publish(
        self, trainer: pl.Trainer, collected: dict[str, dict[str, Any]], prefix: str, progress_bar: bool
    ) -> None:
        """Add a preview's metrics as ``<prefix><name>``: callback metrics, loggers, and the progress bar."""
        kinds = ("callback", "log", "pbar") if progress_bar else ("callback", "log")
        _internals.publish(trainer, {kind: {prefix + k: v for k, v in collected[kind].items()} for kind in kinds})

    # -- end of the run -----------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True

        def evaluate(merge: NamedMerge | None) -> dict[str, float]:
            return self._scalars(self._evaluate(trainer, pl_module, merge))

        self.session.finish(
            trainer.global_step,
            pl_module,
            evaluate=evaluate if _internals.has_validation(trainer) else None,
            monitored=self._monitored(trainer),
            export=lambda merge: self._export(pl_module),
            agree=lambda value: trainer.strategy.broadcast(value, src=0),
            publish=lambda metrics: _internals.publish(
                trainer, {"log": {k: torch.tensor(v) for k, v in metrics.items()}}
            ),
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fit() from a checkpoint taken at max_steps runs no training loop (no on_train_end): the
        # module must still end with the merged weights.
        if not self._trained and self.merge_at_end and len(self.window) > 0:
            self.session.hold_merged(pl_module, lambda merge: self._export(pl_module))
        self._trained = False

    def _monitored(self, trainer: pl.Trainer) -> tuple[str, str]:
        """The metric that judges raw against merged (see :meth:`TrainingSession.monitored`): here the
        fallback is the monitor of the trainer's ModelCheckpoint or EarlyStopping, with its mode."""
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            monitor = getattr(cb, "monitor", None)
            if isinstance(monitor, str) and monitor and cb is not self:
                return self.session.monitored((monitor.removeprefix(MERGED_PREFIX), str(getattr(cb, "mode", "min"))))
        return self.session.monitored(None)

    @staticmethod
    def _scalars(collected: dict[str, dict[str, Any]]) -> dict[str, float]:
        return {k: scalar(v) for k, v in collected["callback"].items()}

    def _export(self, pl_module: pl.LightningModule) -> Path | None:
        """Rank 0 writes the module's (merged) weights (see ``export_module``); sharded tensors are
        gathered one at a time."""
        from safetensors.torch import save_file, save_model

        module: torch.nn.Module = pl_module.get_submodule(self.export_module) if self.export_module else pl_module
        module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper: export the model's own names
        tensors = state_tensors(module)
        sharded = any(is_dtensor(t) for t in tensors.values())
        gathered = {}
        if sharded:
            for name, tensor in tensors.items():
                full = tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]  # collective
                if self.session.rank == 0:
                    gathered[name] = full.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        if self.session.rank != 0:
            return None
        path = self.session.folder / MERGED_FILENAME
        metadata = self.session.merged_metadata()
        if sharded:
            atomic_write(path, lambda tmp: save_file(gathered, str(tmp), metadata=metadata))
        else:
            atomic_write(path, lambda tmp: save_model(module, str(tmp), metadata=metadata))  # tied weights once
        self.merged_path = path
        steps = self.window.steps
        _info(
            f"CheckpointAverager: wrote the {self.session.final.name} merge of steps {steps[0]}..{steps[-1]} to {path}"
        )
        return path

    # -- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict, adopt_storage=self.storage == "auto")


@contextmanager
def _warnings_at(pl_module: pl.LightningModule) -> Iterator[None]:
    """ckptavg's warnings from inside a hook point at the module's ``training_step`` (the user's code
    that produced the step), not at a line of this callback."""

    def training_step_source() -> tuple[str, int, str]:
        step_fn = type(pl_module).training_step
        try:
            where = inspect.getsourcefile(step_fn) or "<unknown>", inspect.getsourcelines(step_fn)[1]
        except (OSError, TypeError):
            where = "<unknown>", 0
        return *where, type(pl_module).__module__

    with warnings_pointing_at(training_step_source):
        yield


_log = logging.getLogger("lightning.pytorch.callbacks.ckptavg")  # Lightning's handler prints it; its level is ours


@rank_zero_only
def _info(message: str) -> None:
    """What the callback does, said once (rank 0), through Lightning's logging."""
    _log.info(message)


def _warn(message: str) -> None:
    rank_zero_warn(message, stacklevel=1)
