"""``CheckpointAverager``: the Lightning adapter over :class:`ckptavg.CheckpointWindow`."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from . import _evaluation
from .errors import check_int
from .files import CkptavgWarning, human_size, safetensors_metadata
from .layout import local_tensor, state_tensors
from .methods import DEFAULT_ALPHA, check_alpha, coefficients, method_names
from .recovery import RecoveryEvent, RecoveryPolicy, SpikeGuard
from .sharding import distributed_rank, is_dtensor
from .storage import MANIFEST
from .window import CheckpointWindow

MERGED_PREFIX = "merged/"
ENSEMBLE_PREFIX = "ensemble/"
MERGED_FILENAME = "merged.safetensors"
RAW_STATE_KEY = "ckptavg_raw_state_dict"  # a Lightning checkpoint's raw weights, when its state_dict holds a merge
HOLDS_KEY = "ckptavg_state_dict_holds"  # which merge, of which steps, its state_dict holds
RUN_FRACTION_DIVISOR = 10  # the default window spans the last tenth of the run (see benchmarks/anneal.py)


@dataclass(frozen=True)
class MergeSpec:
    """One merge the callback can preview or finish with: a registered method, its EMA ``alpha``
    and its other options, under a name (the ``merged/<name>/`` prefix of its metrics)."""

    name: str
    method: str
    alpha: float = DEFAULT_ALPHA
    options: dict[str, Any] = field(default_factory=dict)

    def weights(self, window: CheckpointWindow) -> list[float]:
        return window.weights(self.method, self.alpha, **self.options)

    @staticmethod
    def checked(name: str, method: Any, alpha: float, options: Mapping[str, Any], what: str) -> MergeSpec:
        """Validate a method and its options before anything runs (on two snapshots, silently)."""
        if not isinstance(method, str):
            raise ValueError(
                f"{what} must be a merge method's name ({method_names()}), got {method!r}. Explicit weights depend on how "
                "many snapshots the window holds, which changes during a run: merge them offline with CheckpointWindow.merge(weights)"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. post-hoc EMA's short-window warning: no window yet
                coefficients(method, [1, 2], alpha, **options)
        except ValueError as error:
            raise ValueError(f"{what}: {error}") from None
        return MergeSpec(name, method.lower(), check_alpha(alpha), dict(options))


def parse_candidates(candidates: Any, alpha: float, main: MergeSpec) -> dict[str, MergeSpec]:
    """``["wma", "ema"]`` or ``{"name": "method" | {"method": ..., **options}}`` -> named specs."""
    if candidates is None:
        return {}
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    elif isinstance(candidates, Sequence) and not isinstance(candidates, str):
        items = [(c, c) for c in candidates]
    else:
        raise ValueError(
            f"candidates must be a list of method names or a mapping of names to methods, got {candidates!r}"
        )
    specs: dict[str, MergeSpec] = {}
    for name, value in items:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"candidates: a candidate's name must be a non-empty string without '/', got {name!r}")
        if name in specs:
            raise ValueError(f"candidates: the name {name!r} is given twice")
        options = dict(value) if isinstance(value, Mapping) else {}
        method = options.pop("method", None) if isinstance(value, Mapping) else value
        if isinstance(value, Mapping) and method is None:
            raise ValueError(f"candidates[{name!r}] needs a 'method', e.g. {{'method': 'decay', 'shape': 'cosine'}}")
        candidate_alpha = options.pop("alpha", alpha)
        if "decay" in options and method == "ema":
            candidate_alpha = 1.0 - float(options.pop("decay"))
        spec = MergeSpec.checked(name, method, candidate_alpha, options, f"candidates[{name!r}]")
        if name == main.name and spec != main:
            raise ValueError(
                f"candidates: {name!r} is the name of the main merge (merge={main.method!r}); choose another name"
            )
        specs[name] = spec
    return specs


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
            (In ``benchmarks/anneal.py`` this default, with SMA, ends 0.76% below a planned 20%
            cooldown, over 3 seeds.)
        start_step: no snapshot at or before this optimizer step (skip the warm-up).
        merge: the merge method used for previews, restores and at the end: ``"sma"``,
            ``"wma"``, ``"ema"``, ``"decay"`` or any registered name
            (:func:`ckptavg.methods.method_names`).
        merge_options: the method's options by name, for example ``{"shape": "1-sqrt"}`` for
            ``merge="decay"`` (checked at construction).
        alpha: the EMA coefficient, in (0, 1].
        storage: ``"cpu"`` (host memory; saved inside Lightning checkpoints) or ``"disk"``
            (safetensors files in ``dirpath``, reopened on resume).
        dirpath: where the disk window and ``merged.safetensors`` go; by default
            ``<trainer.log_dir or default_root_dir>/ckptavg``. A run resumed (or forked) into
            another folder than the checkpoint's starts its disk window there from hard links to
            the snapshots it inherits; the checkpoint's folder is only read. Resumed in the same
            folder, the window goes on in place (a finished run's folder refuses a fork).
        preview: in each validation run, evaluate the merged weights on the same data and log
            every validation metric again as ``merged/<name>`` (before the first snapshot the
            merge is the current model: the raw numbers are reused), so that ``merged/<name>``
            can be monitored by ModelCheckpoint and EarlyStopping.
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
            window once per snapshot and costs about ten merges (0.7 s for 19M parameters and
            8 snapshots on one CPU thread), so it is off by default. One process only.
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
        merge: str = "sma",
        alpha: float = DEFAULT_ALPHA,
        storage: Literal["auto", "cpu", "disk"] = "auto",
        dirpath: str | os.PathLike[str] | None = None,
        preview: bool = True,
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
        check_int(window, "window", minimum=1)
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            check_int(value, name, minimum=1, optional=True)
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("give every_n_steps or every_n_epochs, not both")
        check_int(start_step, "start_step")
        if merge_options is not None and not isinstance(merge_options, Mapping):
            raise ValueError(f"merge_options must be a mapping of option names to values, got {merge_options!r}")
        merge_options = dict(merge_options or {})
        if "alpha" in merge_options:
            raise ValueError("merge_options: give alpha (or decay) as its own argument")
        if decay is not None:
            if alpha != DEFAULT_ALPHA:
                raise ValueError(f"give alpha or decay, not both (alpha={alpha!r}, decay={decay!r}); alpha = 1 - decay")
            if not 0.0 <= float(decay) < 1.0:  # also rejects NaN
                raise ValueError(f"decay must be in [0, 1), got {decay!r}")
            alpha = 1.0 - float(decay)
        self._main = MergeSpec.checked(str(merge).lower(), merge, alpha, merge_options, "merge")  # before anything runs
        self.candidates = parse_candidates(candidates, alpha, self._main)
        if select is not None and (
            not isinstance(select, str) or not select.removeprefix(MERGED_PREFIX) or select.startswith(ENSEMBLE_PREFIX)
        ):
            raise ValueError(f"select must be the name of a validation metric (e.g. 'val_loss'), got {select!r}")
        if select is not None:
            select = select.removeprefix(
                MERGED_PREFIX
            )  # every candidate is a merge: merged/val_loss is val_loss of each
        if select is not None and not self.candidates:
            raise ValueError(f"select={select!r} chooses among candidates: give candidates=[...] as well")
        self.select = select
        self.log_correlation = bool(log_correlation)
        self.preview_ensemble = bool(preview_ensemble)
        self._ensemble_unsupported = False  # the module's validation never called its forward
        self.last_correlation: dict[str, Any] | None = None  # log_correlation: the latest summary
        if storage not in ("auto", "cpu", "disk"):
            raise ValueError(f"storage must be 'auto', 'cpu' or 'disk', got {storage!r}")
        self.window_size = window
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self._cadence: tuple[int | None, int | None] = (every_n_steps, every_n_epochs)  # (steps, epochs) in effect
        self.start_step = start_step
        self.storage = storage
        self._storage: Literal["cpu", "disk"] = "cpu" if storage == "auto" else storage  # resolved at setup
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.preview = preview
        self.merge_at_end = merge_at_end
        if keep not in ("merged", "best"):
            raise ValueError(f"keep must be 'merged' or 'best', got {keep!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.keep, self.monitor, self.mode = keep, monitor, mode
        self.export_module = export_module
        self.merged_path: Path | None = None  # where the end of the run wrote merged.safetensors (rank 0)
        self._trained = False  # whether this fit ran the training loop (on_train_end)
        self.recovery = RecoveryPolicy.from_value(recover)
        self.spread = spread
        self.final_metrics: dict[str, dict[str, float]] = {}
        self._window: CheckpointWindow | None = None
        self._guard: SpikeGuard | None = None
        self._loss_sum: torch.Tensor | None = None  # losses of the micro-batches of the current step
        self._loss_count = 0
        self._grad_norm: float | None = None
        self._unwatched_warned = False  # training_step returned no loss to watch (said once per fit)
        self._names_checked = False  # select and monitor were found among the logged metrics
        self._checkpoint_merge: MergeSpec | None = None  # what checkpoints' state_dict holds (None: the raw weights)
        self._root: Path | None = None  # the trainer's default_root_dir (absolute), recorded in checkpoints
        self._scaled_lrs: list[tuple[dict[str, Any], float]] = []
        self._last_watched_step = 0
        self._restored_at = -1
        self._pending_state: dict[str, Any] | None = None
        self._default_dirpath: Path | None = None
        self._dirpath_in_use: Path | None = None  # the folder of the window built in this fit
        self._rank, self._world_size = 0, 1
        self._spread = False
        self._last_validation: tuple[int, tuple[int, ...], dict[str, float], dict[str, dict[str, float]]] | None = None
        self._final = self._main  # the merge the end of fit holds (select= may choose another)
        self.selection: dict[str, Any] | None = None  # with select=: what was picked, and every candidate's score

    @property
    def merge(self) -> str:
        """The main merge's method (previews, restores, the end of fit)."""
        return self._main.method

    @property
    def alpha(self) -> float:
        return self._main.alpha

    @property
    def merge_options(self) -> dict[str, Any]:
        return self._main.options

    @property
    def state_key(self) -> str:
        # Two averagers in one Trainer (say an SMA and an EMA window) keep separate checkpoint state.
        return self._key_for(self.storage)

    def _key_for(self, storage: str) -> str:
        return self._generate_state_key(
            window=self.window_size, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs,
            merge=self.merge, storage=storage, dirpath=None if self.dirpath is None else str(self.dirpath),
        )  # fmt: skip

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
        if self._dirpath_in_use is not None:
            return self._dirpath_in_use  # the window's folder for the rest of this fit
        # A resumed run gets its own folder too (its log dir's): the window starts there from links
        # to the snapshots it inherits, and the checkpoint's folder, maybe another run's, is only read.
        if self._default_dirpath is not None:
            return self._default_dirpath
        return Path("ckptavg")

    def _window_dirpath(self) -> Path:
        return self._resolved_dirpath() / "window"  # each rank of a multi-process run uses window/rank<r>

    @property
    def guard(self) -> SpikeGuard | None:
        """The spike guard (``None`` with ``recover=False``)."""
        if self.recovery is not None and self._guard is None:
            self.window  # noqa: B018 - builds the window and the guard, restoring their state
        return self._guard

    @property
    def recovery_events(self) -> list[RecoveryEvent]:
        """Every recovery decision so far, with its evidence (also across a resume): restores, and
        any ``"gave up"`` or ``"accepted"`` events (see :class:`ckptavg.RecoveryEvent`)."""
        return [] if self.guard is None else list(self.guard.events)

    def _build_window(self) -> CheckpointWindow:
        self._dirpath_in_use = self._resolved_dirpath()
        dirpath = self._window_dirpath() if self._storage == "disk" else None
        win = CheckpointWindow(self.window_size, storage=self._storage, dirpath=dirpath, spread=self._spread)
        state = self._pending_state or {}
        if state.get("window") is not None:
            win.load_state_dict(self._relocated(self._own_part(state["window"]), state.get("root")))
        if self.recovery is not None:
            self._guard = SpikeGuard(win, self.recovery, self.merge, self.alpha, self.merge_options)
            if state.get("guard") is not None:
                self._guard.load_state_dict(state["guard"])
        self._pending_state = None
        return win

    # -- lifecycle ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "CheckpointAverager works on FSDP2 shards (DTensor parameters). Lightning's FSDPStrategy wraps FSDP1 "
                "flat parameters, whose state_dict() gathers every full tensor on every rank; use "
                "ModelParallelStrategy and torch.distributed.fsdp.fully_shard in configure_model() instead"
            )
        if self.storage == "auto":
            # A run that writes checkpoints keeps its window on disk: a cpu window would ride in every
            # checkpoint (window x model each); checkpoints then carry the folder's path and steps.
            self._storage = "disk" if trainer.checkpoint_callbacks else "cpu"
        self._checkpoint_merge = self._checkpoint_holds(trainer)
        # DDP replicas are identical: each rank keeps 1/world of the window (FSDP2 shards are already apart).
        self._spread = self.spread and isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1
        self._root = Path(trainer.default_root_dir).absolute()
        root = trainer.log_dir or trainer.default_root_dir  # log_dir is broadcast from rank 0
        averagers = [cb for cb in trainer.callbacks if isinstance(cb, CheckpointAverager)]  # type: ignore[attr-defined]
        index = next(i for i, cb in enumerate(averagers) if cb is self)
        self._default_dirpath = Path(root) / (
            "ckptavg" if index == 0 else f"ckptavg-{index}"
        )  # a second averager: its own folder
        self._names_checked = not _evaluation.has_validation_step(trainer)
        self._check_no_clash(trainer)
        self._run_before_merged_monitors(trainer)

    def _check_no_clash(self, trainer: pl.Trainer) -> None:
        """Two averagers in one Trainer must not publish the same metrics, write the same files or
        both restore the model: refused before the first step, naming what they would share."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self:
                return  # each pair is checked once, by the later of the two
            if not isinstance(other, CheckpointAverager):
                continue
            shared = []
            if self.preview and other.preview and _evaluation.has_validation_step(trainer):
                shared.append(f"the metrics {MERGED_PREFIX}<name> (preview=True)")
            same_folder = self._resolved_dirpath().absolute() == other._resolved_dirpath().absolute()
            if same_folder and self.merge_at_end and other.merge_at_end:
                shared.append(f"the file {self._resolved_dirpath() / MERGED_FILENAME} (merge_at_end=True)")
            if same_folder and self._storage == other._storage == "disk":
                shared.append(f"the disk window in {self._window_dirpath()}")
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

    def _checkpoint_holds(self, trainer: pl.Trainer) -> MergeSpec | None:
        """Which weights a Lightning checkpoint's ``state_dict`` holds: the merge its
        ModelCheckpoint monitors (``merged/<metric>``: the main merge; ``merged/<candidate>/<metric>``:
        that candidate), the raw weights when every ModelCheckpoint monitors a raw metric, and with no
        monitor the main merge when the run ends with it (``merge_at_end``). ``None``: raw."""
        monitors = [str(m) for cb in trainer.checkpoint_callbacks if (m := getattr(cb, "monitor", None))]
        merged = [m for m in monitors if m.startswith(MERGED_PREFIX)]
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            # Sharded strategies save distributed checkpoints, loaded in place: they keep the raw weights.
            if merged:
                rank_zero_warn(
                    f"CheckpointAverager: under {type(trainer.strategy).__name__} checkpoints hold the raw weights; the merge "
                    f"that {merged[0]} measured is ckptavg.load_merged_weights(checkpoint) (or `ckptavg export`)",
                    stacklevel=1,
                )
            return None
        if not merged:
            return None if monitors or not self.merge_at_end else self._main
        specs = [self.candidates.get(m.removeprefix(MERGED_PREFIX).split("/")[0], self._main) for m in merged]
        spec = specs[0]
        if len(merged) < len(monitors) or len({s.name for s in specs}) > 1:
            rank_zero_warn(
                f"CheckpointAverager: the trainer's ModelCheckpoints monitor {monitors}; every checkpoint holds the "
                f"{spec.name} merge as its state_dict, so the others' scores were measured on other weights",
                stacklevel=1,
            )
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "save_weights_only", False) and str(getattr(cb, "monitor", None) or "").startswith(
                MERGED_PREFIX
            ):
                rank_zero_warn(
                    f"CheckpointAverager: ModelCheckpoint(monitor={cb.monitor!r}, save_weights_only=True) saves the raw weights: "  # type: ignore[attr-defined]
                    "Lightning calls no callback when it saves weights only. Drop save_weights_only to save the merged ones",
                    stacklevel=1,
                )
        return spec

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The checkpoint's ``state_dict`` holds the weights its monitored metric measured (see
        :meth:`_checkpoint_holds`); the raw weights ride beside them, for resuming."""
        spec = self._checkpoint_merge
        if spec is None or self._window is None or len(self._window) == 0 or RAW_STATE_KEY in checkpoint:
            return
        with self.window.swapped(pl_module, spec.weights(self.window)):
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

    def _run_before_merged_monitors(self, trainer: pl.Trainer) -> None:
        """Callbacks that monitor ``merged/<metric>`` (EarlyStopping, ModelCheckpoint, ...) read it in
        their own ``on_validation_end``: this callback must publish it first, whatever the list order."""
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        mine = callbacks.index(self)
        monitors = [
            i
            for i, cb in enumerate(callbacks[:mine])
            if str(getattr(cb, "monitor", None) or "").startswith((MERGED_PREFIX, ENSEMBLE_PREFIX))
        ]
        if monitors:
            callbacks.insert(monitors[0], callbacks.pop(mine))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._window is not None:
            self._window.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: finish the writes and free the folder here, so a
        # new run (or a notebook's next attempt) can open it. The window stays readable.
        if self._window is not None:
            self._window.close()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_module:
            try:
                pl_module.get_submodule(self.export_module)
            except AttributeError:
                children = [name for name, _ in pl_module.named_children()]
                raise ValueError(
                    f"export_module={self.export_module!r} is not a submodule of {type(pl_module).__name__} (its children: {children})"
                ) from None
        self._choose_cadence(trainer)
        self._final, self.selection = self._main, None
        if self.candidates and self.preview:
            _info(
                f"CheckpointAverager: each validation also previews {len(self.candidates)} candidate merge(s) "
                f"({', '.join(self.candidates)}): {len(self.candidates) + 1} extra validation runs"
            )
        if self._window is None or len(self._window) == 0:
            self._check_cost(trainer, pl_module)
        self._last_watched_step = trainer.global_step
        self._loss_sum, self._loss_count, self._unwatched_warned = None, 0, False
        self._restored_at, self._last_validation = -1, None  # an earlier fit's, if this callback ran before
        if self._window is not None and self._window.steps and self._window.steps[-1] > trainer.global_step:
            # A new fit with the same callback object: its snapshots belong to another run.
            rank_zero_warn(
                f"CheckpointAverager: the window holds snapshots up to step {self._window.steps[-1]} but training "
                f"starts at step {trainer.global_step}; starting a new window"
            )
            self._window.close()
            self._window, self._guard, self._dirpath_in_use = None, None, None
        if self._pending_state is not None:
            self._check_resumed_model(pl_module)
        elif self._storage == "disk" and self._window is None:
            self._check_folder_is_free()

    def _choose_cadence(self, trainer: pl.Trainer) -> None:
        """Without an explicit cadence: a snapshot every ``steps // (10 x window)`` steps, so that a
        full window spans the last tenth of the run, whatever its epochs are."""
        total = trainer.estimated_stepping_batches
        if self.every_n_steps is not None or self.every_n_epochs is not None:
            self._warn_if_never(trainer, total)
            return
        if not math.isfinite(total):
            self._cadence = (None, 1)
            rank_zero_warn(
                "CheckpointAverager: the run's length is unknown, so a snapshot is taken at the end of every epoch; "
                "set every_n_steps (or every_n_epochs) to choose"
            )
            return
        every = max(1, int(total) // (RUN_FRACTION_DIVISOR * self.window_size))
        self._cadence = (every, None)
        _info(
            f"CheckpointAverager: a snapshot every {every} optimizer steps: the window of {self.window_size} spans the last "
            f"{every * self.window_size} of {int(total)} steps (set every_n_steps or every_n_epochs to choose)"
        )

    def _warn_if_never(self, trainer: pl.Trainer, total: float) -> None:
        """An explicit cadence that no step or epoch of this run reaches: say so now, not after training."""
        if self.every_n_steps is not None and math.isfinite(total):
            first = (max(self.start_step, trainer.global_step) // self.every_n_steps + 1) * self.every_n_steps
            if first > total:
                rank_zero_warn(
                    f"CheckpointAverager: every_n_steps={self.every_n_steps} (after start_step={self.start_step}) is never reached "
                    f"in this run of {int(total)} optimizer steps, so no snapshot will be taken; choose a smaller every_n_steps "
                    "or leave it unset for the automatic cadence",
                    stacklevel=1,
                )
        max_epochs = trainer.max_epochs
        if self.every_n_epochs is not None and max_epochs is not None and 0 < max_epochs < self.every_n_epochs:
            rank_zero_warn(
                f"CheckpointAverager: every_n_epochs={self.every_n_epochs} is never reached in a run of max_epochs={max_epochs}, "
                "so no snapshot will be taken; choose a smaller every_n_epochs",
                stacklevel=1,
            )

    def _check_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say what the window will cost, and refuse, before the first step, a window that cannot fit."""
        model = sum(local_tensor(t).numel() * t.element_size() for t in state_tensors(pl_module).values())
        snapshot = model // self._world_size if self._spread else model
        # The ring's spare row (cpu), or the file written before the oldest is deleted (disk).
        held = (self.window_size + 1) * snapshot
        if self._storage == "cpu":
            held += model  # swapped()'s copy of the raw weights, kept for previews and restore checks
            where, room = "host memory", _available_memory()
            extra = " (the ring, its spare row, and one copy of the model for previews)"
            extra += (
                "; each Lightning checkpoint carries the window (storage='disk' keeps checkpoints small)"
                if trainer.checkpoint_callbacks
                else ""
            )
        else:
            folder = self._window_dirpath()
            where, room = f"disk in {folder}", shutil.disk_usage(_existing_parent(folder)).free
            extra = f", and {human_size(snapshot + model)} of host memory (the staging buffer and one copy of the model for previews)"
        if room is not None and held > room:
            raise ValueError(
                f"CheckpointAverager: a window of {self.window_size} snapshots of {human_size(snapshot)} needs {human_size(held)} of "
                f"{where}, and {human_size(room)} is available. Choose a smaller window"
                + (", or storage='disk'" if self._storage == "cpu" else ", or another dirpath")
            )
        message = f"CheckpointAverager: a window of {self.window_size} snapshots of {human_size(snapshot)}: {human_size(held)} of {where}{extra}"
        if room is not None and held > room / 2:
            rank_zero_warn(message + f"; that is more than half of the {human_size(room)} available")
        else:
            _info(message)

    def _check_folder_is_free(self) -> None:
        """A new disk window needs a folder of its own: the default folder, when an earlier run's
        window holds it, moves on to ``ckptavg_1``, ``ckptavg_2``, ... (as Lightning's versions do);
        a ``dirpath`` given explicitly is refused at the start, not at the first snapshot."""
        folder = self._window_dirpath()
        if self.dirpath is None and self._default_dirpath is not None and (folder / MANIFEST).exists():
            base, version = self._default_dirpath, 1
            while (base.with_name(f"{base.name}_{version}") / "window" / MANIFEST).exists():
                version += 1
            self._default_dirpath = base.with_name(f"{base.name}_{version}")
            _info(
                f"CheckpointAverager: {folder} holds an earlier run's window; this run's goes in {self._window_dirpath()}"
            )
            return
        if (folder / MANIFEST).exists():
            raise FileExistsError(
                f"CheckpointAverager: {folder} already holds a checkpoint window from an earlier run. Resume that run "
                "with trainer.fit(..., ckpt_path=...), give this run its own dirpath, or remove the folder"
            )

    def _check_resumed_model(self, pl_module: pl.LightningModule) -> None:
        """On resume, before any step: the checkpoint's window must fit this model (a buffer added
        or removed under ``strict_loading=False`` would otherwise fail at the first snapshot)."""
        layout = self.window.full_layout  # builds the window from the checkpoint's state
        if layout is None:
            return
        try:
            layout.check(state_tensors(pl_module), what="the model being resumed")
        except ValueError as err:
            raise ValueError(
                f"CheckpointAverager: {err}. The checkpoint's window holds snapshots of the model as it was saved. "
                "Resume with that model, or start a new window for the changed one (a new dirpath, and "
                "drop the averager's state from the checkpoint)"
            ) from None

    # -- snapshots ----------------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._unscale_lr()
        step = trainer.global_step
        if self.guard is not None:
            self._watch(trainer, pl_module, outputs, batch, batch_idx)  # first: an abnormal step is never snapshotted
        every_steps = self._cadence[0]
        if every_steps is not None and step > self.start_step and step % every_steps == 0:
            self._snapshot(trainer, pl_module, step)
        elif trainer.is_last_batch:
            # The epoch's snapshot is taken before its validation, so that the preview measures the
            # window that ModelCheckpoint then saves (it saves at on_train_epoch_end).
            self._epoch_snapshot(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_snapshot(trainer, pl_module)  # already taken at the last batch, unless the epoch was cut short

    def _epoch_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every_epochs = self._cadence[1]
        if every_epochs is not None and (trainer.current_epoch + 1) % every_epochs == 0:
            if trainer.global_step > self.start_step:
                self._snapshot(trainer, pl_module, trainer.global_step)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.guard is not None and (not self.guard.healthy or step == self._restored_at):
            return  # the loss is abnormal (this state must never be merged), or we just restored
        steps = self.window.steps
        if steps and step <= steps[-1]:
            return  # the same optimizer step seen again (gradient accumulation, or a resumed run)
        with _warnings_at(pl_module):
            self.window.snapshot(
                pl_module, step=step, overlap=True
            )  # CUDA: the copy overlaps the next forward/backward
        if self.log_correlation and len(self.window) >= 3 and self.window.sharding is None:
            self._log_correlation(trainer)

    def _log_correlation(self, trainer: pl.Trainer) -> None:
        """``log_correlation``: the window's correlation summary, at the step of the snapshot."""
        summary = self.window.correlation().summary()
        metrics = {f"ckptavg/{k}": float(v) for k, v in summary.items() if k != "verdict"}
        metrics["ckptavg/average_ok"] = float(summary["verdict"] == "average")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.last_correlation = summary

    # -- recovery -----------------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._window is not None:
            self._window.before_update()  # the step must not change weights a snapshot copy still reads
        guard = self.guard
        if guard is None:
            return
        if self.recovery is not None and self.recovery.grad_norm_threshold is not None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self._grad_norm = (
                float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else None
            )
        factor = guard.lr_factor(trainer.global_step + 1)  # the step about to be taken
        if factor != 1.0:
            for group in optimizer.param_groups:
                self._scaled_lrs.append((group, group["lr"]))
                group["lr"] = group["lr"] * factor

    def _unscale_lr(self) -> None:
        """Give the scheduler back its own learning rates (it may overwrite ours anyway)."""
        for group, lr in self._scaled_lrs:
            group["lr"] = lr
        self._scaled_lrs.clear()

    def _watch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Accumulate the micro-batch losses of an optimizer step; judge the step once it is taken."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            if pl_module.automatic_optimization:
                loss = loss * trainer.accumulate_grad_batches  # Lightning hands hooks the loss divided for accumulation
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        elif not pl_module.automatic_optimization and not self._unwatched_warned:
            self._unwatched_warned = True
            rank_zero_warn(
                f"CheckpointAverager: {type(pl_module).__name__}.training_step returned no loss, so recovery cannot watch "
                "the run and is off (NaN snapshots are still refused). Return the loss from training_step (under "
                "manual optimization too: `return loss`) to turn it on, or pass recover=False to silence this",
                stacklevel=1,
            )
        step = trainer.global_step
        if step == self._last_watched_step or self._loss_count == 0:
            return  # still accumulating gradients: no optimizer step yet
        guard = self.guard
        assert guard is not None and self.recovery is not None
        assert self._loss_sum is not None
        mean_loss = float(self._loss_sum) / self._loss_count  # one host sync per optimizer step
        self._loss_sum, self._loss_count, self._last_watched_step = None, 0, step
        known = len(guard.events)
        evaluate = _evaluation.batch_loss(
            pl_module, batch, batch_idx
        )  # run only when a restore is due, to check it helps
        with _warnings_at(pl_module):
            if guard.observe(
                step, mean_loss, self._grad_norm, model=pl_module, evaluate=evaluate
            ):  # every rank acts at the same step
                if guard.restore(pl_module, trainer.optimizers, step).action == "restored":
                    self._restored_at = step  # the restored weights are a merge: not a snapshot of training
        for event in guard.events[known:]:  # the guard has warned; the loggers get the evidence too
            metrics = {
                "ckptavg/restores": float(len(guard.restores)),
                "ckptavg/trigger_level": event.level,
                "ckptavg/trigger_limit": event.limit,
            }
            if event.action != "restored":
                metrics["ckptavg/recovery_gave_up" if event.action == "gave up" else "ckptavg/level_accepted"] = 1.0
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # -- performance preview ------------------------------------------------------------------------

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            return
        if not self._names_checked:
            self._check_metric_names(trainer)
        if trainer.sanity_checking:
            return
        raw = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if not k.startswith(MERGED_PREFIX)}
        measured: dict[str, dict[str, float]] = {}
        if self.preview:
            # Published at every validation, so that monitoring merged/<metric> never finds it
            # missing. Before the first snapshot (or with one taken at this very step) every merge
            # is the current model: the raw run's numbers measured it already.
            steps = self.window.steps
            same = not steps or steps == [trainer.global_step]
            # Every rank must take the same decision: the preview runs collective operations.
            current = (
                _evaluation.last_validation_metrics(trainer)
                if trainer.strategy.reduce_boolean_decision(same, all=True)
                else None
            )
            for spec, prefix in [(self._main, MERGED_PREFIX)] + [
                (c, f"{MERGED_PREFIX}{n}/") for n, c in self.candidates.items()
            ]:
                collected = current or self._evaluate(trainer, pl_module, spec)
                self._publish(trainer, collected, prefix, progress_bar=spec is self._main)
                measured[spec.name] = self._scalars(collected)
            raw = {k: v for k, v in raw.items() if k in measured[self._main.name]}
            if self.preview_ensemble and not self._ensemble_unsupported:
                ensemble_metrics = current or self._evaluate_ensemble(trainer, pl_module)
                if ensemble_metrics is not None:
                    self._publish(trainer, ensemble_metrics, ENSEMBLE_PREFIX, progress_bar=False)
        self._last_validation = (trainer.global_step, tuple(self.window.steps), raw, measured)

    def _check_metric_names(self, trainer: pl.Trainer) -> None:
        """At the first validation (the sanity check, when the trainer runs one): ``select`` and
        ``monitor`` must name metrics the module logs, before any training is spent."""
        logged = sorted(
            k
            for k in trainer.callback_metrics
            if not k.startswith((MERGED_PREFIX, ENSEMBLE_PREFIX, "ckptavg/", "train"))
        )
        if not logged:
            return  # this run logged nothing yet (a sanity check can): the next validation checks
        self._names_checked = True
        for argument, name in (
            ("select", self.select),
            ("monitor", None if self.monitor is None else self.monitor.removeprefix(MERGED_PREFIX)),
        ):
            if name is not None and not any(_is_metric(k, name) for k in logged):
                raise ValueError(
                    f"CheckpointAverager: {argument}={getattr(self, argument)!r} is not a metric the module logs in validation "
                    f"(it logs {logged}); name one of those (merged/<name> for the merge's)"
                )

    def _evaluate_ensemble(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, dict[str, Any]] | None:
        """Run validation once more with the module's forward replaced by the mean of its outputs
        under each snapshot's weights; ``None`` (and a warning, once) if forward was never called."""
        steps = self.window.steps
        members = [[1.0 if i == j else 0.0 for i in range(len(steps))] for j in range(len(steps))]
        forward = pl_module.forward
        own = pl_module.__dict__.get("forward")  # a forward set on the instance (rare) is put back as it was
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

        with _evaluation.isolated_validation(trainer) as loop:
            pl_module.forward = ensemble_forward  # type: ignore[method-assign]  # this run only
            try:
                loop.run()
            finally:
                if own is not None:
                    pl_module.forward = own  # type: ignore[method-assign]
                else:
                    del pl_module.forward  # the class's forward again
            collected = _evaluation.collected_metrics(trainer)
        if calls == 0:
            self._ensemble_unsupported = True
            rank_zero_warn(
                f"CheckpointAverager(preview_ensemble=True): {type(pl_module).__name__}.validation_step never calls "
                "self(...), so the ensemble cannot be swapped in; nothing is logged as ensemble/<metric>"
            )
            return None
        return collected

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, merge: MergeSpec | None
    ) -> dict[str, dict[str, Any]]:
        """Run validation once more, on ``merge`` swapped in (``None``: the module's current
        weights), and return what it logged."""
        with _evaluation.isolated_validation(trainer) as loop:
            if merge is not None:
                with self.window.swapped(pl_module, merge.weights(self.window)):
                    loop.run()
            else:
                loop.run()
            return _evaluation.collected_metrics(trainer)

    def _publish(
        self, trainer: pl.Trainer, collected: dict[str, dict[str, Any]], prefix: str, progress_bar: bool
    ) -> None:
        """Add a preview's metrics as ``<prefix><name>``: callback metrics, loggers, and the progress bar."""
        kinds = ("callback", "log", "pbar") if progress_bar else ("callback", "log")
        _evaluation.publish(trainer, {kind: {prefix + k: v for k, v in collected[kind].items()} for kind in kinds})

    # -- end of the run -----------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True
        if self._window is not None:
            self._window.finish(trainer.global_step)  # a later fork pointed at this folder is refused, not trimming it
        if not self.merge_at_end:
            return
        if len(self.window) == 0:
            rank_zero_warn("CheckpointAverager: no snapshot was taken, so the model keeps its raw weights")
            return
        validate = _evaluation.has_validation(trainer)
        last = self._last_validation
        # The last validation already measured this exact window at this step: reuse its numbers.
        reuse = (
            last
            if last is not None and last[:2] == (trainer.global_step, tuple(self.window.steps)) and last[3]
            else None
        )
        raw, measured = (reuse[2], dict(reuse[3])) if reuse else ({}, {})
        pool = [self._main, *self.candidates.values()] if self.select else [self._main]
        if validate:
            todo = [spec for spec in pool if spec.name not in measured]
            if todo or not raw:
                steps = self.window.steps
                _info(
                    f"CheckpointAverager: validating the raw weights and {', '.join(spec.name for spec in todo)} over steps "
                    f"{steps[0]}..{steps[-1]} ({len(todo) + 1} validation runs)"
                )
                raw = self._scalars(self._evaluate(trainer, pl_module, None))
                for spec in todo:
                    measured[spec.name] = self._scalars(self._evaluate(trainer, pl_module, spec))
        if self.select:
            self._final = self._pick(trainer, pool, measured)
        merged_metrics = measured.get(self._final.name, {})
        keep_raw = bool(
            trainer.strategy.broadcast(self._judge(trainer, raw, merged_metrics), src=0)
        )  # ranks must agree: collectives follow
        if keep_raw:
            with self.window.swapped(pl_module, self._final.weights(self.window)):
                self._export(pl_module)
        else:
            self._hold_merged(pl_module)
        if validate:
            self._report_final(trainer, raw, merged_metrics)
        if self._storage == "disk":
            folder = self._window_dirpath()
            size = sum(p.stat().st_size for p in folder.rglob("*.safetensors") if p.is_file())
            _info(
                f"CheckpointAverager: the disk window ({len(self.window)} snapshots, {human_size(size)}) stays in {folder} for "
                "offline merges (ckptavg.consolidate); delete the folder when you no longer need it"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # fit() from a checkpoint taken at max_steps runs no training loop (no on_train_end): the
        # module must still end with the merged weights.
        if not self._trained and self.merge_at_end and len(self.window) > 0:
            self._hold_merged(pl_module)
        self._trained = False

    def _pick(self, trainer: pl.Trainer, pool: list[MergeSpec], measured: dict[str, dict[str, float]]) -> MergeSpec:
        """``select=``: the merge with the best ``select`` metric at the end (ties: the main merge)."""
        scores = {spec.name: measured.get(spec.name, {}).get(str(self.select), math.nan) for spec in pool}
        valid = {name: score for name, score in scores.items() if math.isfinite(score)}
        if not valid:
            available = sorted(next((m for m in measured.values() if m), {}))
            rank_zero_warn(
                f"CheckpointAverager: select={self.select!r} was not measured (validation logged {available}); "
                f"finishing with the main merge, {self._main.name}"
            )
            return self._main
        sign = 1.0 if self.mode == "min" else -1.0
        picked = min(valid, key=lambda name: sign * valid[name])
        picked = str(trainer.strategy.broadcast(picked, src=0))  # every rank loads the same merge
        self.selection = {
            "by": self.select,
            "mode": self.mode,
            "picked": picked,
            "scores": {n: v if math.isfinite(v) else None for n, v in scores.items()},
        }
        lines = [
            f"  {name:<24} {score:>12.6g}{'  <- picked' if name == picked else ''}" for name, score in scores.items()
        ]
        _info(f"CheckpointAverager: {self.select} of each candidate merge (mode {self.mode}):\n" + "\n".join(lines))
        return next(spec for spec in pool if spec.name == picked)

    def _hold_merged(self, pl_module: pl.LightningModule) -> None:
        """Load the merged weights into the module (on every rank) and export them."""
        self.window.load_into(pl_module, self._final.weights(self.window))  # spread windows gather; shards stay local
        if (self.window.sharding or {}).get("kind") == "replicated":
            _broadcast_module(pl_module)  # every rank ends with rank 0's merged weights, bit for bit
        self._export(pl_module)

    def _judge(self, trainer: pl.Trainer, raw: dict[str, float], merged: dict[str, float]) -> bool:
        """Compare raw and merged on the monitored metric (every dataloader's); warn when the merged
        weights score worse. Returns whether to keep the raw weights."""
        monitor, mode = self._monitored(trainer)
        keys = [k for k in merged if k in raw and _is_metric(k, monitor)]
        sign = 1.0 if mode == "min" else -1.0
        worse = [k for k in keys if sign * (merged[k] - raw[k]) > 0]
        if not worse:
            return False
        keep_raw = self.keep == "best" and sum(sign * (merged[k] - raw[k]) for k in keys) > 0
        details = ", ".join(
            f"{k} {merged[k]:.6g} vs {raw[k]:.6g} ({(merged[k] - raw[k]) / abs(raw[k]) * 100 if raw[k] else math.nan:+.1f}%)"
            for k in worse
        )
        action = (
            "the module keeps its raw weights (keep='best'); merged.safetensors still holds the merged ones"
            if keep_raw
            else "the module holds the merged weights"
            + ("" if self.keep == "best" else " (keep='best' would keep the raw ones)")
        )
        rank_zero_warn(f"CheckpointAverager: the merged weights score worse than the raw ones on {details}: {action}")
        return keep_raw

    def _monitored(self, trainer: pl.Trainer) -> tuple[str, str]:
        """The metric that judges raw against merged, with its own direction: ``monitor`` (with
        ``mode``), else ``select`` (with ``mode``), else the monitor of the trainer's
        ModelCheckpoint or EarlyStopping (with its mode), else ``val_loss`` (lower is better)."""
        if self.monitor is not None:
            return self.monitor.removeprefix(MERGED_PREFIX), self.mode
        if self.select is not None:
            return self.select, self.mode
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            monitor = getattr(cb, "monitor", None)
            if isinstance(monitor, str) and monitor and cb is not self:
                return monitor.removeprefix(MERGED_PREFIX), str(getattr(cb, "mode", "min"))
        return "val_loss", "min"

    @staticmethod
    def _scalars(collected: dict[str, dict[str, Any]]) -> dict[str, float]:
        return {k: _scalar(v) for k, v in collected["callback"].items()}

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
                if self._rank == 0:
                    gathered[name] = full.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        if self._rank != 0:
            return None
        steps = self.window.steps
        final = self._final
        metadata = safetensors_metadata(
            "merged",
            method=final.method,
            alpha=repr(final.alpha),
            steps=json.dumps(steps),
            coefficients=json.dumps(final.weights(self.window)),
            options=json.dumps(
                {k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in final.options.items()}
            ),
        )
        if self.selection is not None:
            metadata["selected"] = self.selection["picked"]
            metadata["selected_by"] = f"{self.selection['by']} ({self.selection['mode']})"
            metadata["candidate_scores"] = json.dumps(self.selection["scores"])
        if self.export_module:
            metadata["module"] = self.export_module
        path = self._resolved_dirpath() / MERGED_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)  # a file or link planted there is replaced, never written through
            if sharded:
                save_file(gathered, str(tmp), metadata=metadata)
            else:
                save_model(module, str(tmp), metadata=metadata)  # tied weights once, as load_model expects
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk keeps no half-written model
            raise
        self.merged_path = path
        _info(f"CheckpointAverager: wrote the {final.name} merge of steps {steps[0]}..{steps[-1]} to {path}")
        return path

    def _report_final(self, trainer: pl.Trainer, raw: dict[str, float], merged: dict[str, float]) -> None:
        names = [k for k in merged if k in raw]
        self.final_metrics = {"raw": {k: raw[k] for k in names}, "merged": {k: merged[k] for k in names}}
        if not names:
            return
        logged = {f"final/raw/{k}": raw[k] for k in names} | {f"final/merged/{k}": merged[k] for k in names}
        _evaluation.publish(trainer, {"log": {k: torch.tensor(v) for k, v in logged.items()}})
        width = max(len(k) for k in names)
        lines = [f"{'metric':<{width}}  {'raw':>12}  {'merged':>12}  {'change':>8}"]
        for k in names:
            change = (merged[k] - raw[k]) / abs(raw[k]) * 100 if raw[k] else math.nan
            lines.append(f"{k:<{width}}  {raw[k]:>12.6g}  {merged[k]:>12.6g}  {change:>7.2f}%")
        _info("CheckpointAverager: final raw vs merged weights\n" + "\n".join(lines))

    # -- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        window = self._window.state_dict() if self._window is not None else None
        if window is not None and window.get("sharding") is not None:
            # Each rank holds a different part, and only rank 0 writes the checkpoint: gather them there.
            window = {"ranks": _gather_to_rank0(window), "world_size": self._world_size}
        return {
            "window": window,
            "root": None
            if self._root is None
            else str(self._root),  # finds a disk window again after the run folder moved
            "guard": self._guard.state_dict() if self._guard is not None else None,
            "merge": self.merge,  # what the merged weights of this checkpoint are (see ckptavg.load_merged_weights)
            "alpha": self.alpha,
            "merge_options": {k: v for k, v in self.merge_options.items() if isinstance(v, (int, float, str, bool))},
            # The main merge's coefficients over the window as saved: what load_merged_weights and
            # `ckptavg export` apply (an option such as a callable decay shape cannot be stored).
            "coefficients": self._main.weights(self._window)
            if self._window is not None and len(self._window)
            else None,
        }

    def _relocated(self, window: dict[str, Any], root: Any) -> dict[str, Any]:
        """A disk window whose run folder moved (copied to another machine, renamed) is found at the
        same place inside this run's ``default_root_dir``, when the recorded folder is gone."""
        recorded = window.get("dirpath")
        if not recorded or Path(recorded).exists() or not root or self._root is None:
            return window
        try:
            moved = self._root / Path(recorded).relative_to(root)
        except ValueError:
            return window  # the window was not inside the old run folder
        if not moved.is_dir():
            return window
        _info(f"CheckpointAverager: the checkpoint's window folder {recorded} is gone; reading it from {moved}")
        return {**window, "dirpath": str(moved)}

    def _own_part(self, window: dict[str, Any]) -> dict[str, Any]:
        """This rank's window state out of a checkpoint (see :meth:`state_dict`)."""
        if "ranks" not in window:
            return window
        parts = window["ranks"]
        spread_cpu = all((p.get("sharding") or {}).get("kind") == "spread" and p.get("storage") == "cpu" for p in parts)
        if window["world_size"] != self._world_size and spread_cpu:
            return CheckpointWindow.combine_states(parts)  # re-spread over this run's ranks on load
        if window["world_size"] != self._world_size:
            raise ValueError(
                f"the checkpoint's CheckpointAverager window was kept by {window['world_size']} processes; this run has "
                f"{self._world_size}. Resume with {window['world_size']} processes, or merge the old disk window "
                "offline with ckptavg.consolidate"
            )
        return window["ranks"][self._rank]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._window is not None:
            self._window.close()
            self._window, self._guard = None, None
        self._dirpath_in_use = None
        self._pending_state = dict(state_dict)  # applied when the window is first used
        recorded = _recorded_storage(state_dict.get("window"))
        if self.storage == "auto" and recorded is not None:
            self._storage = recorded  # the window continues in the tier it was kept in


@contextmanager
def _warnings_at(pl_module: pl.LightningModule) -> Iterator[None]:
    """ckptavg's warnings from inside a hook point at the module's ``training_step`` (the user's code
    that produced the step), not at a line of this callback."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CkptavgWarning)
        yield
    if not caught:
        return  # the usual step: no source lookup on the hot path
    step_fn = type(pl_module).training_step
    try:
        filename, lineno = inspect.getsourcefile(step_fn) or "<unknown>", inspect.getsourcelines(step_fn)[1]
    except (OSError, TypeError):
        filename, lineno = "<unknown>", 0
    for warning in caught:
        if issubclass(warning.category, CkptavgWarning):
            warnings.warn_explicit(
                warning.message, warning.category, filename, lineno, module=type(pl_module).__module__
            )
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


_log = logging.getLogger("lightning.pytorch.callbacks.ckptavg")  # Lightning's handler prints it; its level is ours


@rank_zero_only
def _info(message: str) -> None:
    """What the callback does, said once (rank 0), through Lightning's logging."""
    _log.info(message)


def _is_metric(key: str, name: str) -> bool:
    """Whether the logged ``key`` is the metric ``name``, or its value on one of several dataloaders."""
    return key == name or key.startswith(name + "/dataloader_idx_")


def _recorded_storage(window: Any) -> Literal["cpu", "disk"] | None:
    """The tier a checkpoint's window state was kept in (``None``: no window)."""
    if not isinstance(window, Mapping):
        return None
    part = (window.get("ranks") or [None])[0] if "ranks" in window else window
    storage = part.get("storage") if isinstance(part, Mapping) else None
    return storage if storage in ("cpu", "disk") else None


def _available_memory() -> int | None:
    """Host memory available to new allocations (Linux: MemAvailable), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


def _gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, by rank, on rank 0 (``None`` elsewhere)."""
    if distributed_rank()[1] == 1:
        return [obj]
    gathered: list[Any] | None = (
        [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    )
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def _broadcast_module(module: torch.nn.Module) -> None:
    """Make every rank hold rank 0's values (a no-op outside ``torch.distributed``)."""
    if distributed_rank()[1] == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
