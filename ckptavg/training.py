"""The framework-neutral training session: every training-time decision of ckptavg, in one place.

A :class:`TrainingSession` owns the window and the spike guard of one training run and decides
when to snapshot, when to restore, which merges to preview, what the run ends with (pick, judge,
hold, report) and what a checkpoint records. It never imports a training framework. An adapter
(the Lightning callback in :mod:`ckptavg.lightning`, the Hugging Face Trainer callback in
:mod:`ckptavg.hf`, or a plain loop) is a thin translation of its framework's hooks into these calls.

What an adapter supplies:

- **where and who**: :meth:`TrainingSession.bind` with the process's rank and world size, the
  resolved storage tier, whether DDP replicas may spread the window, the run's default folder.
- **the run's length**: :meth:`TrainingSession.plan` with the optimizer steps (and epochs) planned.
- **the steps**: after each optimizer step, the micro-batch losses (:meth:`add_loss`) and the step
  (:meth:`end_step`, with a callable that recomputes the current batch's loss for the restore check,
  and the optimizers); before each optimizer step, :meth:`before_optimizer_step`; then
  :meth:`snapshot` when :meth:`snapshot_due` says so.
- **how to evaluate**: for previews and the end of the run, a function from a :class:`NamedMerge`
  (``None``: the current weights) to the validation metrics, run by the framework's own
  evaluation with the merge swapped in (:meth:`CheckpointWindow.swapped`).
- **how to log and say things**: ``info``, ``warn`` and ``log_metrics`` callables (on rank 0).
- **how ranks agree**: ``agree(value)`` returning rank 0's value on every rank (collectives follow).
- **how to write the merged model**: an ``export`` callable, given the merge the module holds.
- **the checkpoint**: :meth:`state_dict` / :meth:`load_state_dict` in the framework's checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import CkptavgWarning, check_int
from .files import human_size, safetensors_metadata
from .layout import local_tensor, state_tensors
from .methods import DEFAULT_ALPHA, MergeSpec, check_alpha, coefficients, method_names
from .recovery import RecoveryEvent, RecoveryPolicy, SpikeGuard
from .sharding import distributed_rank
from .storage import MANIFEST
from .window import CheckpointWindow

MERGED_PREFIX = "merged/"
ENSEMBLE_PREFIX = "ensemble/"
MERGED_FILENAME = "merged.safetensors"
RUN_FRACTION_DIVISOR = 10  # the default window spans the last tenth of the run (benchmarks/anneal_lengths.py)


@dataclass(frozen=True)
class NamedMerge:
    """One merge a session can preview or finish with: a registered method, its EMA ``alpha``
    and its other options, under a name (the ``merged/<name>/`` prefix of its metrics)."""

    name: str
    method: str
    alpha: float = DEFAULT_ALPHA
    options: dict[str, Any] = field(default_factory=dict)

    def weights(self, window: CheckpointWindow) -> list[float]:
        return window.weights(self.method, self.alpha, **self.options)

    def swapped(self, window: CheckpointWindow, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """``window.swapped`` with this merge (by method: a merge that drops a NaN snapshot
        recomputes its coefficients over the snapshots left)."""
        return window.swapped(model, self.method, self.alpha, **self.options)

    def load_into(self, window: CheckpointWindow, model: nn.Module) -> None:
        window.load_into(model, self.method, self.alpha, **self.options)

    @staticmethod
    def checked(name: str, method: Any, alpha: float, options: Mapping[str, Any], what: str) -> NamedMerge:
        """Validate a method and its options before anything runs (on two snapshots, silently)."""
        if isinstance(method, MergeSpec):
            options = {**method.options, **options}
            alpha = options.pop("alpha", alpha)
            method = method.method
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
        return NamedMerge(name, method.lower(), check_alpha(alpha), dict(options))


def parse_candidates(candidates: Any, alpha: float, main: NamedMerge) -> dict[str, NamedMerge]:
    """``["wma", "ema"]`` or ``{"name": "method" | MergeSpec | {"method": ..., **options}}`` -> named merges."""
    if candidates is None:
        return {}
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    elif isinstance(candidates, Sequence) and not isinstance(candidates, str):
        items = [(c.method if isinstance(c, MergeSpec) else c, c) for c in candidates]
    else:
        raise ValueError(
            f"candidates must be a list of method names or a mapping of names to methods, got {candidates!r}"
        )
    named: dict[str, NamedMerge] = {}
    for name, value in items:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"candidates: a candidate's name must be a non-empty string without '/', got {name!r}")
        if name in named:
            raise ValueError(f"candidates: the name {name!r} is given twice")
        options = dict(value) if isinstance(value, Mapping) else {}
        method = options.pop("method", None) if isinstance(value, Mapping) else value
        if isinstance(value, Mapping) and method is None:
            raise ValueError(f"candidates[{name!r}] needs a 'method', e.g. {{'method': 'decay', 'shape': 'cosine'}}")
        candidate_alpha = options.pop("alpha", alpha)
        if "decay" in options and method == "ema":
            candidate_alpha = 1.0 - float(options.pop("decay"))
        merge = NamedMerge.checked(name, method, candidate_alpha, options, f"candidates[{name!r}]")
        if name == main.name and merge != main:
            raise ValueError(
                f"candidates: {name!r} is the name of the main merge (merge={main.method!r}); choose another name"
            )
        named[name] = merge
    return named


@dataclass
class AveragerConfig:
    """What a checkpoint averager does, checked on construction (before anything runs). Every
    adapter takes these fields as its arguments, with the same defaults and the same errors."""

    window: int = 8
    """Snapshots kept (the oldest is evicted)."""
    every_n_steps: int | None = None
    """Snapshot at every optimizer step that is a multiple of this."""
    every_n_epochs: int | None = None
    """Snapshot at the end of every this many epochs. With neither cadence, one is chosen from the
    run's length: a snapshot every ``steps // (10 x window)`` steps (the window spans the last tenth)."""
    start_step: int = 0
    """No snapshot at or before this optimizer step (skip the warm-up)."""
    merge: str | MergeSpec = "sma"
    """The merge used for previews, restores and at the end: a registered name or a ``MergeSpec``."""
    alpha: float = DEFAULT_ALPHA
    """The EMA coefficient, in (0, 1]."""
    storage: Literal["auto", "cpu", "disk"] = "auto"
    """``"cpu"`` (host memory, saved in checkpoints), ``"disk"`` (files in ``dirpath``) or ``"auto"``
    (disk when the run writes checkpoints, else cpu)."""
    dirpath: str | os.PathLike[str] | None = None
    """Where the disk window and the merged model go (default: ``ckptavg`` in the run's log folder)."""
    preview: bool = True
    """Evaluate the merge at every validation and log its metrics beside the raw ones."""
    preview_every: int = 1
    """Preview at every this many validations (the first included); the ones between log no merged
    metrics. A checkpoint or early stopping that monitors a merged metric needs 1."""
    preview_batches: int | float | None = None
    """The validation batches each preview (the main merge's and each candidate's) evaluates: a
    count, a fraction in (0, 1], or ``None`` for all. The raw metrics always use every batch; the
    merged ones are then measured on the first batches only (the fit-start message says so)."""
    merge_at_end: bool = True
    """When training ends, the model holds the merge and the merged model is written."""
    recover: bool | RecoveryPolicy | dict[str, Any] = True
    """Restore a merged stable point after a loss spike: ``True``, ``False``, a ``RecoveryPolicy``
    or a mapping of its fields."""
    spread: bool = True
    """Under DDP, keep ``1/world`` of every snapshot on each rank."""
    decay: float | None = None
    """The EMA decay in timm's spelling, ``alpha = 1 - decay`` (give ``alpha`` or ``decay``)."""
    keep: Literal["merged", "best"] = "merged"
    """After training: ``"merged"`` always, or ``"best"``: the raw weights when the merge scores worse."""
    monitor: str | None = None
    """The validation metric that judges raw against merged at the end."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher ``monitor`` (and ``select``) is better."""
    export_module: str | None = None
    """The submodule whose merged weights the merged file holds (by attribute path)."""
    merge_options: dict[str, Any] | None = None
    """The merge method's options by name (``{"shape": "1-sqrt"}`` for ``"decay"``)."""
    candidates: list[Any] | dict[str, Any] | None = None
    """More merges to preview, each logged under its own name: names, ``MergeSpec``s or a mapping."""
    select: str | None = None
    """A validation metric: the run ends with the merge (main or candidate) that scores best on it."""
    log_correlation: bool = False
    """Log the window's correlation summary after each snapshot (from the third)."""
    preview_ensemble: bool = False
    """Also preview the prediction ensemble of the snapshots (where the adapter supports it)."""

    def __post_init__(self) -> None:
        check_int(self.window, "window", minimum=1)
        for name in ("every_n_steps", "every_n_epochs"):
            check_int(getattr(self, name), name, minimum=1, optional=True)
        if self.every_n_steps is not None and self.every_n_epochs is not None:
            raise ValueError("give every_n_steps or every_n_epochs, not both")
        check_int(self.start_step, "start_step")
        check_int(self.preview_every, "preview_every", minimum=1)
        check_preview_batches(self.preview_batches)
        if self.merge_options is not None and not isinstance(self.merge_options, Mapping):
            raise ValueError(f"merge_options must be a mapping of option names to values, got {self.merge_options!r}")
        if "alpha" in (self.merge_options or {}):
            raise ValueError("merge_options: give alpha (or decay) as its own argument")
        if self.decay is not None:
            if self.alpha != DEFAULT_ALPHA:
                raise ValueError(
                    f"give alpha or decay, not both (alpha={self.alpha!r}, decay={self.decay!r}); alpha = 1 - decay"
                )
            if not 0.0 <= float(self.decay) < 1.0:  # also rejects NaN
                raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")
        name = self.merge.method if isinstance(self.merge, MergeSpec) else str(self.merge).lower()
        self.main = NamedMerge.checked(name, self.merge, self.ema_alpha, dict(self.merge_options or {}), "merge")
        self.named_candidates = parse_candidates(self.candidates, self.ema_alpha, self.main)
        if self.select is not None and (
            not isinstance(self.select, str)
            or not self.select.removeprefix(MERGED_PREFIX)
            or self.select.startswith(ENSEMBLE_PREFIX)
        ):
            raise ValueError(f"select must be the name of a validation metric (e.g. 'val_loss'), got {self.select!r}")
        if self.select is not None:
            self.select = self.select.removeprefix(MERGED_PREFIX)  # every candidate is a merge
        if self.select is not None and not self.named_candidates:
            raise ValueError(f"select={self.select!r} chooses among candidates: give candidates=[...] as well")
        if self.storage not in ("auto", "cpu", "disk"):
            raise ValueError(f"storage must be 'auto', 'cpu' or 'disk', got {self.storage!r}")
        if self.keep not in ("merged", "best"):
            raise ValueError(f"keep must be 'merged' or 'best', got {self.keep!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        self.recovery = RecoveryPolicy.from_value(self.recover)

    @property
    def ema_alpha(self) -> float:
        return self.alpha if self.decay is None else 1.0 - float(self.decay)


def check_preview_batches(value: Any) -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return
    raise ValueError(
        f"preview_batches must be a number of batches (an int >= 1), a fraction in (0, 1] or None, got {value!r}"
    )


def limited_batches(total: float, limit: int | float | None) -> float:
    """How many of ``total`` validation batches a preview evaluates (``inf``: unknown length)."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return total if math.isinf(total) else max(1, int(total * limit))
    return min(total, limit)


def _log_info(message: str) -> None:
    logging.getLogger("ckptavg").info(message)


def _warn(message: str) -> None:
    warnings.warn(message, CkptavgWarning, stacklevel=3)


class TrainingSession:
    """One training run's window, guard and decisions (see the module docstring for what an
    adapter supplies).

    Args:
        config: the averager's settings.
        name: how messages name the adapter (``"CheckpointAverager: ..."``).
        info: says what the session does (rank 0); default: the ``ckptavg`` logger.
        warn: warns the user (rank 0); default: a :class:`ckptavg.CkptavgWarning`.
        log_metrics: ``(metrics, step)`` to the run's loggers (correlation, recovery evidence).
    """

    def __init__(
        self,
        config: AveragerConfig,
        *,
        name: str = "TrainingSession",
        info: Callable[[str], None] = _log_info,
        warn: Callable[[str], None] = _warn,
        log_metrics: Callable[[dict[str, float], int], None] | None = None,
    ):
        self.config = config
        self.name = name
        self.info, self.warn = info, warn
        self.log_metrics = log_metrics or (lambda metrics, step: None)
        self.main = config.main
        self.candidates = config.named_candidates
        self.recovery = config.recovery
        self.storage: Literal["cpu", "disk"] = "cpu" if config.storage == "auto" else config.storage
        self.cadence: tuple[int | None, int | None] = (config.every_n_steps, config.every_n_epochs)
        self.dirpath = Path(config.dirpath) if config.dirpath is not None else None
        self.rank, self.world_size, self.spread = 0, 1, False
        self.root: Path | None = None  # the run's root folder (absolute), recorded in checkpoints
        self.default_dirpath: Path | None = None
        self.dirpath_in_use: Path | None = None  # the folder of the window built in this run
        self.final = self.main  # the merge the end of the run holds (select= may choose another)
        self.selection: dict[str, Any] | None = None  # with select=: what was picked, and every score
        self.final_metrics: dict[str, dict[str, float]] = {}
        self._validations, self._last_validation_step = 0, -1  # validations seen in this run (see preview_due)
        self.last_correlation: dict[str, Any] | None = None
        self.last_validation: tuple[int, tuple[int, ...], dict[str, float], dict[str, dict[str, float]]] | None = None
        self._window: CheckpointWindow | None = None
        self._guard: SpikeGuard | None = None
        self._pending_state: dict[str, Any] | None = None
        self._loss_sum: Tensor | None = None  # losses of the micro-batches of the current step
        self._loss_count = 0
        self._unwatched_loss: Tensor | None = None  # recover=False: the last step's loss, never synced per step
        self._grad_norm: float | None = None
        self._scaled_lrs: list[tuple[dict[str, Any], float]] = []
        self._last_watched_step = 0
        self.restored_at = -1

    # -- where things live --------------------------------------------------------------------------

    def bind(
        self,
        *,
        rank: int,
        world_size: int,
        storage: Literal["cpu", "disk"],
        spread: bool,
        default_dirpath: Path,
        root: Path,
    ) -> None:
        """The run this session serves: this process's rank, the resolved storage tier, whether
        DDP replicas spread the window, the default folder and the run's root folder."""
        self.rank, self.world_size = rank, world_size
        self.storage, self.spread = storage, spread
        self.default_dirpath, self.root = default_dirpath, root

    @property
    def folder(self) -> Path:
        """Where the disk window and the merged model go."""
        if self.dirpath is not None:
            return self.dirpath
        if self.dirpath_in_use is not None:
            return self.dirpath_in_use  # the window's folder for the rest of this run
        # A resumed run gets its own folder too (its log dir's): the window starts there from links
        # to the snapshots it inherits, and the checkpoint's folder, maybe another run's, is only read.
        if self.default_dirpath is not None:
            return self.default_dirpath
        return Path("ckptavg")

    @property
    def window_folder(self) -> Path:
        return self.folder / "window"  # each rank of a multi-process run uses window/rank<r>

    @property
    def window(self) -> CheckpointWindow:
        """The window (created on first use, after a checkpoint has been restored)."""
        if self._window is None:
            self._window = self._build_window()
        return self._window

    @property
    def has_snapshots(self) -> bool:
        return self._window is not None and len(self._window) > 0

    @property
    def guard(self) -> SpikeGuard | None:
        """The spike guard (``None`` with ``recover=False``)."""
        if self.recovery is not None and self._guard is None:
            self.window  # noqa: B018 - builds the window and the guard, restoring their state
        return self._guard

    @property
    def recovery_events(self) -> list[RecoveryEvent]:
        return [] if self.guard is None else list(self.guard.events)

    def _build_window(self) -> CheckpointWindow:
        self.dirpath_in_use = self.folder
        dirpath = self.window_folder if self.storage == "disk" else None
        win = CheckpointWindow(self.config.window, storage=self.storage, dirpath=dirpath, spread=self.spread)
        state = self._pending_state or {}
        if state.get("window") is not None:
            win.load_state_dict(self._relocated(self._own_part(state["window"]), state.get("root")))
        if self.recovery is not None:
            self._guard = SpikeGuard(win, self.recovery, self.main.method, self.main.alpha, self.main.options)
            if state.get("guard") is not None:
                self._guard.load_state_dict(state["guard"])
        self._pending_state = None
        return win

    def close(self) -> None:
        """Finish the writes and free the folder (the window stays readable)."""
        if self._window is not None:
            self._window.close()

    # -- the start of a run -------------------------------------------------------------------------

    def plan(self, total_steps: float, max_epochs: int | None, step: int) -> None:
        """Choose the cadence from the run's planned optimizer steps (``inf``: unknown); with an
        explicit cadence, warn now when no step or epoch of this run reaches it."""
        config = self.config
        if config.every_n_steps is not None or config.every_n_epochs is not None:
            self._warn_if_never(total_steps, max_epochs, step)
            return
        if not math.isfinite(total_steps):
            self.cadence = (None, 1)
            self.warn(
                f"{self.name}: the run's length is unknown, so a snapshot is taken at the end of every epoch; "
                "set every_n_steps (or every_n_epochs) to choose"
            )
            return
        every = max(1, int(total_steps) // (RUN_FRACTION_DIVISOR * config.window))
        self.cadence = (every, None)
        self.info(
            f"{self.name}: a snapshot every {every} optimizer steps: the window of {config.window} spans the last "
            f"{every * config.window} of {int(total_steps)} steps (set every_n_steps or every_n_epochs to choose)"
        )

    def _warn_if_never(self, total: float, max_epochs: int | None, step: int) -> None:
        every_n_steps, every_n_epochs, start_step = (
            self.config.every_n_steps,
            self.config.every_n_epochs,
            self.config.start_step,
        )
        if every_n_steps is not None and math.isfinite(total):
            first = (max(start_step, step) // every_n_steps + 1) * every_n_steps
            if first > total:
                self.warn(
                    f"{self.name}: every_n_steps={every_n_steps} (after start_step={start_step}) is never reached "
                    f"in this run of {int(total)} optimizer steps, so no snapshot will be taken; choose a smaller every_n_steps "
                    "or leave it unset for the automatic cadence"
                )
        if every_n_epochs is not None and max_epochs is not None and 0 < max_epochs < every_n_epochs:
            self.warn(
                f"{self.name}: every_n_epochs={every_n_epochs} is never reached in a run of max_epochs={max_epochs}, "
                "so no snapshot will be taken; choose a smaller every_n_epochs"
            )

    def begin(self, model: nn.Module, step: int, *, checkpoints_carry_window: bool = False) -> None:
        """The start of training at ``step``: forget an earlier run's per-step state, check the cost
        and the folder of a new window, or that a resumed window fits ``model``."""
        self.final, self.selection, self._validations, self._last_validation_step = self.main, None, 0, -1
        if self.config.preview:
            self.info(f"{self.name}: {self.preview_cost()}")
        if not self.has_snapshots:
            self.check_cost(model, checkpoints_carry_window)
        self._last_watched_step = step
        self._loss_sum, self._loss_count, self._unwatched_loss = None, 0, None
        self.restored_at, self.last_validation = -1, None  # an earlier run's, if this session ran before
        if self._window is not None and self._window.steps and self._window.steps[-1] > step:
            # A new run with the same session: its snapshots belong to another run.
            self.warn(
                f"{self.name}: the window holds snapshots up to step {self._window.steps[-1]} but training "
                f"starts at step {step}; starting a new window"
            )
            self._window.close()
            self._window, self._guard, self.dirpath_in_use = None, None, None
        if self._pending_state is not None:
            self._check_resumed_model(model)
        elif self.storage == "disk" and self._window is None:
            self._check_folder_is_free()

    def check_cost(self, model: nn.Module, checkpoints_carry_window: bool = False) -> None:
        """Say what the window will cost, and refuse, before the first step, a window that cannot fit."""
        size = self.config.window
        model_bytes = sum(local_tensor(t).numel() * t.element_size() for t in state_tensors(model).values())
        snapshot = model_bytes // self.world_size if self.spread else model_bytes
        # The ring's spare row (cpu), or the file written before the oldest is deleted (disk).
        held = (size + 1) * snapshot
        room: int | None
        if self.storage == "cpu":
            held += model_bytes  # swapped()'s copy of the raw weights, kept for previews and restore checks
            where, room = "host memory", available_memory()
            extra = " (the ring, its spare row, and one copy of the model for previews)"
            if checkpoints_carry_window:
                extra += "; each Lightning checkpoint carries the window (storage='disk' keeps checkpoints small)"
        else:
            folder = self.window_folder
            where, room = f"disk in {folder}", shutil.disk_usage(_existing_parent(folder)).free
            extra = f", and {human_size(snapshot + model_bytes)} of host memory (the staging buffer and one copy of the model for previews)"
        if room is not None and held > room:
            raise ValueError(
                f"{self.name}: a window of {size} snapshots of {human_size(snapshot)} needs {human_size(held)} of "
                f"{where}, and {human_size(room)} is available. Choose a smaller window"
                + (", or storage='disk'" if self.storage == "cpu" else ", or another dirpath")
            )
        message = (
            f"{self.name}: a window of {size} snapshots of {human_size(snapshot)}: {human_size(held)} of {where}{extra}"
        )
        if room is not None and held > room / 2:
            self.warn(message + f"; that is more than half of the {human_size(room)} available")
        else:
            self.info(message)

    def _check_folder_is_free(self) -> None:
        """A new disk window needs a folder of its own: the default folder, when an earlier run's
        window holds it, moves on to ``ckptavg_1``, ``ckptavg_2``, ... (as Lightning's versions do);
        a ``dirpath`` given explicitly is refused at the start, not at the first snapshot."""
        folder = self.window_folder
        if self.dirpath is None and self.default_dirpath is not None and (folder / MANIFEST).exists():
            base, version = self.default_dirpath, 1
            while (base.with_name(f"{base.name}_{version}") / "window" / MANIFEST).exists():
                version += 1
            self.default_dirpath = base.with_name(f"{base.name}_{version}")
            self.info(f"{self.name}: {folder} holds an earlier run's window; this run's goes in {self.window_folder}")
            return
        if (folder / MANIFEST).exists():
            raise FileExistsError(
                f"{self.name}: {folder} already holds a checkpoint window from an earlier run. Resume that run "
                "from its checkpoint, give this run its own dirpath, or remove the folder"
            )

    def _check_resumed_model(self, model: nn.Module) -> None:
        """On resume, before any step: the checkpoint's window must fit this model."""
        layout = self.window.full_layout  # builds the window from the checkpoint's state
        if layout is None:
            return
        try:
            layout.check(state_tensors(model), what="the model being resumed")
        except ValueError as err:
            raise ValueError(
                f"{self.name}: {err}. The checkpoint's window holds snapshots of the model as it was saved. "
                "Resume with that model, or start a new window for the changed one (a new dirpath, and "
                "drop the averager's state from the checkpoint)"
            ) from None

    # -- the steps ----------------------------------------------------------------------------------

    def snapshot_due(self, step: int) -> bool:
        """Whether the step cadence takes a snapshot at this optimizer step."""
        every_steps = self.cadence[0]
        return every_steps is not None and step > self.config.start_step and step % every_steps == 0

    def epoch_snapshot_due(self, epoch: int, step: int) -> bool:
        """Whether the epoch cadence takes a snapshot at the end of ``epoch`` (counted from 0)."""
        every_epochs = self.cadence[1]
        return every_epochs is not None and (epoch + 1) % every_epochs == 0 and step > self.config.start_step

    def snapshot(self, model: nn.Module | Mapping[str, Tensor], step: int, *, overlap: bool = True) -> bool:
        """Snapshot ``model`` at ``step``, unless the loss is abnormal (such a state is never merged),
        the session just restored, or the step was seen already. Returns whether one was taken."""
        if self.guard is not None and (not self.guard.healthy or step == self.restored_at):
            return False
        if self.guard is None and self._unwatched_loss is not None and not bool(self._unwatched_loss.isfinite()):
            return False  # weights that gave a NaN loss would only evict good snapshots
        steps = self.window.steps
        if steps and step <= steps[-1]:
            return False  # the same optimizer step seen again (gradient accumulation, or a resumed run)
        taken = self.window.snapshot(model, step=step, overlap=overlap)  # CUDA: the copy overlaps the next step
        if self.config.log_correlation and len(self.window) >= 3 and self.window.sharding is None:
            summary = self.window.correlation().summary()
            metrics = {f"ckptavg/{k}": float(v) for k, v in summary.items() if k != "verdict"}
            metrics["ckptavg/average_ok"] = float(summary["verdict"] == "average")
            self.log_metrics(metrics, step)
            self.last_correlation = summary
        return taken

    def before_optimizer_step(self, optimizers: Sequence[torch.optim.Optimizer], next_step: int) -> None:
        """Before the optimizer step that becomes ``next_step``: let pending snapshot copies finish,
        measure the gradient norm (when the policy watches it), and scale the learning rates while
        recovery is cooling down."""
        if self._window is not None:
            self._window.before_update()  # the step must not change weights a snapshot copy still reads
        guard = self.guard
        if guard is None:
            return
        if self.recovery is not None and self.recovery.grad_norm_threshold is not None:
            grads = [p.grad for o in optimizers for g in o.param_groups for p in g["params"] if p.grad is not None]
            self._grad_norm = (
                float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else None
            )
        factor = guard.lr_factor(next_step)
        if factor != 1.0:
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    self._scaled_lrs.append((group, group["lr"]))
                    group["lr"] = group["lr"] * factor

    def restore_learning_rates(self) -> None:
        """Give the scheduler back its own learning rates (it may overwrite ours anyway)."""
        for group, lr in self._scaled_lrs:
            group["lr"] = lr
        self._scaled_lrs.clear()

    def add_loss(self, loss: Tensor) -> None:
        """One micro-batch's training loss (not divided for gradient accumulation)."""
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def end_step(
        self,
        step: int,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        evaluate: Callable[[], float] | None = None,
    ) -> list[RecoveryEvent]:
        """After the optimizer step that made ``step``: judge its mean micro-batch loss, and restore a
        merged stable point when the guard says so (``evaluate`` recomputes the current batch's loss,
        run only to check that a restore helps). Returns the recovery events of this step, which
        the session has warned about and logged. Every rank must call it at the same steps."""
        guard = self.guard
        if step == self._last_watched_step or self._loss_count == 0:
            return []  # still accumulating gradients: no optimizer step yet
        if guard is None:  # no host sync per step: snapshot() reads this loss only when it snapshots
            assert self._loss_sum is not None
            self._unwatched_loss = self._loss_sum / self._loss_count
            self._loss_sum, self._loss_count, self._last_watched_step = None, 0, step
            return []
        assert self._loss_sum is not None
        mean_loss = float(self._loss_sum) / self._loss_count  # one host sync per optimizer step
        self._loss_sum, self._loss_count, self._last_watched_step = None, 0, step
        known = len(guard.events)
        if guard.observe(step, mean_loss, self._grad_norm, model=model, evaluate=evaluate):
            if guard.restore(model, list(optimizers), step).action == "restored":
                self.restored_at = step  # the restored weights are a merge: not a snapshot of training
        events = guard.events[known:]
        for event in events:  # the guard has warned; the loggers get the evidence too
            metrics = {
                "ckptavg/restores": float(len(guard.restores)),
                "ckptavg/trigger_level": event.level,
                "ckptavg/trigger_limit": event.limit,
            }
            if event.action != "restored":
                metrics["ckptavg/recovery_gave_up" if event.action == "gave up" else "ckptavg/level_accepted"] = 1.0
            self.log_metrics(metrics, step)
        return events

    # -- previews -----------------------------------------------------------------------------------

    def previews(self) -> list[tuple[NamedMerge, str]]:
        """Each merge a validation previews, with the prefix of its metrics (the main merge first)."""
        return [(self.main, MERGED_PREFIX)] + [(c, f"{MERGED_PREFIX}{n}/") for n, c in self.candidates.items()]

    def preview_cost(self) -> str:
        """What the previews cost, in validation runs, as the fit-start message says it."""
        config, runs = self.config, len(self.candidates) + 1
        every = "each validation" if config.preview_every == 1 else f"every {config.preview_every} validations"
        named = (
            f" (the merge and {len(self.candidates)} candidate(s): {', '.join(self.candidates)})"
            if self.candidates
            else ""
        )
        batches = config.preview_batches
        if batches is None:
            return f"{every} also runs {runs} validation(s){named} on all its batches"
        on = (
            f"the first {batches:.0%} of its batches"
            if isinstance(batches, float)
            else f"its first {batches} batch(es)"
        )
        partial = "the merged metrics are measured on those batches only, the raw ones on all"
        return f"{every} also runs {runs} validation(s){named} on {on}; {partial}"

    def check_judges_see_previews(self, judges: Sequence[str]) -> None:
        """Refuse, before the first step, ``judges`` (checkpoints, early stopping) that read a merged
        metric at every validation when previews come only at every ``preview_every``-th."""
        every = self.config.preview_every
        if judges and every > 1:
            raise ValueError(
                f"{self.name}(preview_every={every}): {', '.join(judges)} reads the merged metrics at every "
                "validation, and they are logged at every preview only; use preview_every=1 (preview_batches makes "
                "each preview cheaper) or judge by a raw metric"
            )

    def preview_due(self, step: int) -> bool:
        """Whether the validation at ``step`` previews: every ``preview_every``-th one, counted from
        the first of the run (several calls at one step, one per eval dataset, count once)."""
        if self._last_validation_step != step:
            self._last_validation_step = step
            self._validations += 1
        return self.config.preview and (self._validations - 1) % self.config.preview_every == 0

    def merge_is_current(self, step: int) -> bool:
        """Before the first snapshot, or with one taken at this very step, every merge is the current
        model: the raw validation measured it already."""
        steps = self.window.steps
        return not steps or steps == [step]

    def record_validation(self, step: int, raw: dict[str, float], measured: dict[str, dict[str, float]]) -> None:
        """What a validation measured, reused at the end of the run when nothing changed since."""
        self.last_validation = (step, tuple(self.window.steps), raw, measured)

    # -- the end of the run -------------------------------------------------------------------------

    def finish(
        self,
        step: int,
        model: nn.Module,
        *,
        evaluate: Callable[[NamedMerge | None], dict[str, float]] | None,
        monitored: tuple[str, str],
        export: Callable[[NamedMerge], Path | None],
        agree: Callable[[Any], Any] = lambda value: value,
        publish: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        """The end of training at ``step``: with ``merge_at_end``, pick the merge (``select``), judge it
        against the raw weights on ``monitored`` (metric, mode), leave ``model`` holding the merge
        (or the raw weights with ``keep="best"`` when it scores worse), export it and report."""
        if self._window is not None:
            self._window.finish(step)  # a later fork pointed at this folder is refused, not trimming it
        if not self.config.merge_at_end:
            return
        if len(self.window) == 0:
            self.warn(f"{self.name}: no snapshot was taken, so the model keeps its raw weights")
            return
        last = self.last_validation
        # The last validation already measured this exact window at this step: reuse its numbers.
        reuse = last if last is not None and last[:2] == (step, tuple(self.window.steps)) and last[3] else None
        raw, measured = (reuse[2], dict(reuse[3])) if reuse else ({}, {})
        pool = [self.main, *self.candidates.values()] if self.config.select else [self.main]
        if evaluate is not None:
            todo = [merge for merge in pool if merge.name not in measured]
            if todo or not raw:
                steps = self.window.steps
                self.info(
                    f"{self.name}: validating the raw weights and {', '.join(m.name for m in todo)} over steps "
                    f"{steps[0]}..{steps[-1]} ({len(todo) + 1} validation runs)"
                )
                raw = evaluate(None)
                for merge in todo:
                    measured[merge.name] = evaluate(merge)
        if self.config.select:
            self.final = self._pick(pool, measured, agree)
        merged_metrics = measured.get(self.final.name, {})
        keep_raw = bool(agree(self._judge(raw, merged_metrics, monitored)))  # ranks must agree: collectives follow
        if keep_raw:
            with self.final.swapped(self.window, model):
                export(self.final)
        else:
            self.hold_merged(model, export)
        if evaluate is not None:
            self._report_final(raw, merged_metrics, publish)
        if self.storage == "disk":
            folder = self.window_folder
            size = sum(p.stat().st_size for p in folder.rglob("*.safetensors") if p.is_file())
            self.info(
                f"{self.name}: the disk window ({len(self.window)} snapshots, {human_size(size)}) stays in {folder} for "
                "offline merges (ckptavg.consolidate); delete the folder when you no longer need it"
            )

    def hold_merged(self, model: nn.Module, export: Callable[[NamedMerge], Path | None]) -> None:
        """Load the final merge into ``model`` (on every rank) and export it."""
        self.final.load_into(self.window, model)  # spread windows gather; shards stay local
        if (self.window.sharding or {}).get("kind") == "replicated":
            broadcast_module(model)  # every rank ends with rank 0's merged weights, bit for bit
        export(self.final)

    def _pick(
        self, pool: list[NamedMerge], measured: dict[str, dict[str, float]], agree: Callable[[Any], Any]
    ) -> NamedMerge:
        """``select=``: the merge with the best ``select`` metric at the end (ties: the main merge)."""
        select, mode = str(self.config.select), self.config.mode
        scores = {m.name: measured.get(m.name, {}).get(select, math.nan) for m in pool}
        valid = {name: score for name, score in scores.items() if math.isfinite(score)}
        if not valid:
            available = sorted(next((m for m in measured.values() if m), {}))
            self.warn(
                f"{self.name}: select={select!r} was not measured (validation logged {available}); "
                f"finishing with the main merge, {self.main.name}"
            )
            return self.main
        sign = 1.0 if mode == "min" else -1.0
        picked = str(agree(min(valid, key=lambda name: sign * valid[name])))  # every rank loads the same merge
        self.selection = {
            "by": select,
            "mode": mode,
            "picked": picked,
            "scores": {n: v if math.isfinite(v) else None for n, v in scores.items()},
        }
        lines = [
            f"  {name:<24} {score:>12.6g}{'  <- picked' if name == picked else ''}" for name, score in scores.items()
        ]
        self.info(f"{self.name}: {select} of each candidate merge (mode {mode}):\n" + "\n".join(lines))
        return next(m for m in pool if m.name == picked)

    def _judge(self, raw: dict[str, float], merged: dict[str, float], monitored: tuple[str, str]) -> bool:
        """Compare raw and merged on the monitored metric (every dataloader's); warn when the merged
        weights score worse. Returns whether to keep the raw weights."""
        monitor, mode = monitored
        keys = [k for k in merged if k in raw and is_metric(k, monitor)]
        sign = 1.0 if mode == "min" else -1.0
        worse = [k for k in keys if sign * (merged[k] - raw[k]) > 0]
        if not worse:
            return False
        keep = self.config.keep
        keep_raw = keep == "best" and sum(sign * (merged[k] - raw[k]) for k in keys) > 0
        details = ", ".join(
            f"{k} {merged[k]:.6g} vs {raw[k]:.6g} ({(merged[k] - raw[k]) / abs(raw[k]) * 100 if raw[k] else math.nan:+.1f}%)"
            for k in worse
        )
        action = (
            "the module keeps its raw weights (keep='best'); merged.safetensors still holds the merged ones"
            if keep_raw
            else "the module holds the merged weights"
            + ("" if keep == "best" else " (keep='best' would keep the raw ones)")
        )
        self.warn(f"{self.name}: the merged weights score worse than the raw ones on {details}: {action}")
        return keep_raw

    def monitored(self, fallback: tuple[str, str] | None) -> tuple[str, str]:
        """The metric that judges raw against merged, with its direction: ``monitor`` (with ``mode``),
        else ``select`` (with ``mode``), else the adapter's ``fallback`` (the framework's own
        monitored metric), else ``val_loss`` (lower is better)."""
        if self.config.monitor is not None:
            return self.config.monitor.removeprefix(MERGED_PREFIX), self.config.mode
        if self.config.select is not None:
            return self.config.select, self.config.mode
        return fallback or ("val_loss", "min")

    def _report_final(
        self, raw: dict[str, float], merged: dict[str, float], publish: Callable[[dict[str, float]], None] | None
    ) -> None:
        names = [k for k in merged if k in raw]
        self.final_metrics = {"raw": {k: raw[k] for k in names}, "merged": {k: merged[k] for k in names}}
        if not names:
            return
        if publish is not None:
            publish({f"final/raw/{k}": raw[k] for k in names} | {f"final/merged/{k}": merged[k] for k in names})
        width = max(len(k) for k in names)
        lines = [f"{'metric':<{width}}  {'raw':>12}  {'merged':>12}  {'change':>8}"]
        for k in names:
            change = (merged[k] - raw[k]) / abs(raw[k]) * 100 if raw[k] else math.nan
            lines.append(f"{k:<{width}}  {raw[k]:>12.6g}  {merged[k]:>12.6g}  {change:>7.2f}%")
        self.info(f"{self.name}: final raw vs merged weights\n" + "\n".join(lines))

    def merged_metadata(self) -> dict[str, str]:
        """What the merged file records: the method, its options, the steps, the coefficients and,
        with ``select``, the pick and every candidate's score."""
        final = self.final
        metadata = safetensors_metadata(
            "merged",
            method=final.method,
            alpha=repr(final.alpha),
            steps=json.dumps(self.window.steps),
            coefficients=json.dumps(final.weights(self.window)),
            options=json.dumps(
                {k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in final.options.items()}
            ),
        )
        if self.selection is not None:
            metadata["selected"] = self.selection["picked"]
            metadata["selected_by"] = f"{self.selection['by']} ({self.selection['mode']})"
            metadata["candidate_scores"] = json.dumps(self.selection["scores"])
        if self.config.export_module:
            metadata["module"] = self.config.export_module
        return metadata

    def check_metric_names(self, logged: Sequence[str], hint: str = "merged/<name> for the merge's") -> None:
        """At the first validation that logged something: ``select`` and ``monitor`` must name
        metrics the model logs, before any more training is spent."""
        for argument, name in (
            ("select", self.config.select),
            ("monitor", None if self.config.monitor is None else self.config.monitor.removeprefix(MERGED_PREFIX)),
        ):
            if name is not None and not any(is_metric(k, name) for k in logged):
                raise ValueError(
                    f"{self.name}: {argument}={getattr(self.config, argument)!r} is not a metric the module logs in "
                    f"validation (it logs {sorted(logged)}); name one of those ({hint})"
                )

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        window = self._window.state_dict() if self._window is not None else None
        if window is not None and window.get("sharding") is not None:
            # Each rank holds a different part, and only rank 0 writes the checkpoint: gather them there.
            window = {"ranks": gather_to_rank0(window), "world_size": self.world_size}
        main = self.main
        return {
            "window": window,
            "root": None if self.root is None else str(self.root),  # finds a disk window after the run folder moved
            "guard": self._guard.state_dict() if self._guard is not None else None,
            "merge": main.method,  # what the merged weights of this checkpoint are (see ckptavg.load_merged_weights)
            "alpha": main.alpha,
            "merge_options": {k: v for k, v in main.options.items() if isinstance(v, (int, float, str, bool))},
            # The main merge's coefficients over the window as saved: what load_merged_weights and
            # `ckptavg export` apply (an option such as a callable decay shape cannot be stored).
            "coefficients": main.weights(self._window) if self._window is not None and len(self._window) else None,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], *, adopt_storage: bool = False) -> None:
        """Continue from a checkpoint's state (applied when the window is first used); with
        ``adopt_storage`` (``storage="auto"``) the window continues in the tier it was kept in."""
        if self._window is not None:
            self._window.close()
            self._window, self._guard = None, None
        self.dirpath_in_use = None
        self._pending_state = dict(state_dict)
        recorded = recorded_storage(state_dict.get("window"))
        if adopt_storage and recorded is not None:
            self.storage = recorded

    def _relocated(self, window: dict[str, Any], root: Any) -> dict[str, Any]:
        """A disk window whose run folder moved (copied to another machine, renamed) is found at the
        same place inside this run's root folder, when the recorded folder is gone."""
        recorded = window.get("dirpath")
        if not recorded or Path(recorded).exists() or not root or self.root is None:
            return window
        try:
            moved = self.root / Path(recorded).relative_to(root)
        except ValueError:
            return window  # the window was not inside the old run folder
        if not moved.is_dir():
            return window
        self.info(f"{self.name}: the checkpoint's window folder {recorded} is gone; reading it from {moved}")
        return {**window, "dirpath": str(moved)}

    def _own_part(self, window: dict[str, Any]) -> dict[str, Any]:
        """This rank's window state out of a checkpoint (see :meth:`state_dict`)."""
        if "ranks" not in window:
            return window
        parts = window["ranks"]
        spread_cpu = all((p.get("sharding") or {}).get("kind") == "spread" and p.get("storage") == "cpu" for p in parts)
        if window["world_size"] != self.world_size and spread_cpu:
            return CheckpointWindow.combine_states(parts)  # re-spread over this run's ranks on load
        if window["world_size"] != self.world_size:
            raise ValueError(
                f"the checkpoint's {self.name} window was kept by {window['world_size']} processes; this run has "
                f"{self.world_size}. Resume with {window['world_size']} processes, or merge the old disk window "
                "offline with ckptavg.consolidate"
            )
        return window["ranks"][self.rank]


@contextmanager
def warnings_pointing_at(source: Callable[[], tuple[str, int, str]]) -> Iterator[None]:
    """ckptavg's warnings raised inside the block point at ``source()``'s (file, line, module): the
    user's code that produced the step, not a line of an adapter. ``source`` runs only when a
    warning was caught (the usual step looks nothing up)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CkptavgWarning)
        yield
    if not caught:
        return
    filename, lineno, module = source()
    for warning in caught:
        if issubclass(warning.category, CkptavgWarning):
            warnings.warn_explicit(warning.message, warning.category, filename, lineno, module=module)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


_checked_versions: set[str] = set()


def warn_if_untested(package: str, version: str, tested: tuple[tuple[int, int], tuple[int, int]], adapter: str) -> None:
    """Warn, once per process and package, when ``version`` is outside the ``tested`` (oldest,
    newest) minor versions: the private names an adapter reads may have moved."""
    if package in _checked_versions:
        return
    _checked_versions.add(package)
    minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    oldest, newest = tested
    if not oldest <= minor <= newest:
        warnings.warn(
            f"{adapter} is tested with {package} {oldest[0]}.{oldest[1]} to {newest[0]}.{newest[1]}; this is {version}. "
            "If a preview fails, please report it with this version",
            stacklevel=3,
        )


def is_metric(key: str, name: str) -> bool:
    """Whether the logged ``key`` is the metric ``name``, or its value on one of several dataloaders."""
    return key == name or key.startswith(name + "/dataloader_idx_")


def scalar(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().float().cpu())
    return float(value)


def recorded_storage(window: Any) -> Literal["cpu", "disk"] | None:
    """The tier a checkpoint's window state was kept in (``None``: no window)."""
    if not isinstance(window, Mapping):
        return None
    part = (window.get("ranks") or [None])[0] if "ranks" in window else window
    storage = part.get("storage") if isinstance(part, Mapping) else None
    return storage if storage in ("cpu", "disk") else None


def available_memory() -> int | None:
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


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, by rank, on rank 0 (``None`` elsewhere)."""
    if distributed_rank()[1] == 1:
        return [obj]
    gathered: list[Any] | None = (
        [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    )
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_module(module: nn.Module) -> None:
    """Make every rank hold rank 0's values (a no-op outside ``torch.distributed``)."""
    if distributed_rank()[1] == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
