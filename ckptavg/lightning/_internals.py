"""Run Lightning's own validation loop once more, leaving no trace.

The performance preview must log exactly what the LightningModule logs in validation (same
reductions, batch-size weighting, ``sync_dist``, torchmetrics objects, dataloader suffixes), so it
reuses the fit loop's validation loop instead of reimplementing it. Everything that run would
touch is isolated and restored afterwards: the other callbacks (checkpointing, early stopping and
progress bars never see it), the loggers, the logged and callback metrics, the loop's progress
counters, the train/eval mode capture, the RNG state and the state of every torchmetrics object.
Progress bars stay in ``trainer.callbacks`` with their hooks muted: Lightning and Rich's refresh
thread look the bar up there at any moment.

This is the one module that touches Lightning's private names; each is looked up defensively,
and :func:`check_version` says at setup when the installed Lightning is outside the tested range.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.trainer.states import RunningStage

from ..isolation import (
    metric_states,
    restore_metric_states,
    rng_state,
    set_rng_state,
    untouched,
)
from ..training import limited_batches, warn_if_untested

TESTED_VERSIONS = ((2, 4), (2, 6))  # the oldest and newest Lightning minor versions the suite has run on
_METRIC_DICTS = ("_callback_metrics", "_logged_metrics", "_progress_bar_metrics")


@contextmanager
def isolated_validation(trainer: pl.Trainer, batches: int | float | None = None) -> Iterator[Any]:
    """Inside: the fit loop's validation loop may be run again (``loop.run()``, yielded) without
    other callbacks or loggers seeing it, on the first ``batches`` of each dataloader (a count or
    a fraction; ``None``: as many as the run's own validation). Afterwards every piece of state it
    touched is restored. Read the run's metrics with :func:`collected_metrics` before leaving the
    block."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    connector = trainer._logger_connector
    module = trainer.lightning_module
    saved_loop = dict(vars(loop))
    saved_progress = copy.deepcopy(loop.batch_progress.state_dict())
    saved_seen = copy.copy(getattr(loop, "_seen_batches_per_dataloader", None))
    saved_metrics = {name: dict(getattr(connector, name)) for name in _METRIC_DICTS if hasattr(connector, name)}
    saved_callbacks, saved_loggers = trainer.callbacks, trainer.loggers  # type: ignore[attr-defined]
    saved_stage = trainer.state.stage
    saved_last_val_time = getattr(trainer, "_last_val_time", None)
    saved_rng = rng_state()
    saved_metric_states = metric_states(module)
    saved_training = {name: m.training for name, m in module.named_modules()}

    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

    results = _ResultCollection(training=False)
    results.device = getattr(loop._results, "device", None)  # type: ignore[attr-defined]
    loop._results = results
    if hasattr(loop, "_module_mode"):
        loop._module_mode = type(loop._module_mode)()  # the outer run's capture must survive
    for name in saved_metrics:
        getattr(connector, name).clear()
    trainer.callbacks = [cb for cb in saved_callbacks if isinstance(cb, ProgressBar)]  # type: ignore[attr-defined]
    muted = [_mute(bar) for bar in trainer.callbacks]  # type: ignore[attr-defined]
    trainer.loggers = []
    trainer.state.stage = RunningStage.VALIDATING
    if batches is not None:  # the loop keeps its data set up while fitting: only the limits change
        loop._max_batches = [limited_batches(n, batches) for n in loop._max_batches]
    try:
        for metric, _ in saved_metric_states:
            metric.reset()  # the nested run measures its own weights only (the raw run's updates are still held)
        yield loop
    finally:
        # The nested run's data fetcher is dropped, not torn down: tearing it down would reset the
        # CombinedLoader it shares with the outer run's fetcher.
        vars(loop).clear()
        vars(loop).update(saved_loop)
        loop.batch_progress.load_state_dict(saved_progress)
        if saved_seen is not None:
            loop._seen_batches_per_dataloader = saved_seen
        for name, values in saved_metrics.items():
            target = getattr(connector, name)
            target.clear()
            target.update(values)
        for restore in muted:
            restore()
        trainer.callbacks = saved_callbacks  # type: ignore[attr-defined]
        trainer.loggers = saved_loggers
        trainer.state.stage = saved_stage
        if saved_last_val_time is not None:
            trainer._last_val_time = saved_last_val_time  # type: ignore[attr-defined]
        set_rng_state(saved_rng)
        restore_metric_states(saved_metric_states)
        for name, m in module.named_modules():
            m.train(saved_training.get(name, m.training))


_HOOKS = tuple(name for name in vars(Callback) if name.startswith("on_") or name in ("setup", "teardown"))


def _mute(callback: Callback) -> Callable[[], None]:
    """Silence every hook of ``callback`` (instance attributes shadow the methods) and return the
    function that gives them back. The object itself stays, so lookups of it still find it."""
    own = {name: callback.__dict__[name] for name in _HOOKS if name in callback.__dict__}
    for name in _HOOKS:
        setattr(callback, name, _ignore)

    def restore() -> None:
        for name in _HOOKS:
            delattr(callback, name)
        for name, value in own.items():
            setattr(callback, name, value)

    return restore


def collected_metrics(trainer: pl.Trainer) -> dict[str, dict[str, Any]]:
    """What the last (isolated) validation run logged: ``{"callback": ..., "log": ..., "pbar": ...}``."""
    connector = trainer._logger_connector
    return {
        "callback": dict(connector._callback_metrics),
        "log": {k: v for k, v in connector._logged_metrics.items() if k not in ("epoch", "step")},
        "pbar": dict(connector._progress_bar_metrics),
    }


def last_validation_metrics(trainer: pl.Trainer) -> dict[str, dict[str, Any]]:
    """What the validation run that just ended logged (read in ``on_validation_end``), in the form
    of :func:`collected_metrics`."""
    results = trainer.fit_loop.epoch_loop.val_loop._results
    metrics = results.metrics(False)  # the epoch-level values, as the connector received them
    return {"callback": dict(metrics["callback"]), "log": dict(metrics["log"]), "pbar": dict(metrics["pbar"])}


def publish(trainer: pl.Trainer, metrics: Mapping[str, Mapping[str, Any]]) -> None:
    """Add metrics the way a logged validation metric arrives: ``metrics["callback"]`` to
    ``trainer.callback_metrics``, ``["pbar"]`` to the progress bar, ``["log"]`` to every logger
    (at the current step)."""
    connector = trainer._logger_connector
    connector._callback_metrics.update(metrics.get("callback", {}))
    connector._progress_bar_metrics.update(metrics.get("pbar", {}))
    if metrics.get("log"):
        connector.log_metrics(dict(metrics["log"]))


def unpublish(trainer: pl.Trainer, prefixes: tuple[str, ...]) -> None:
    """Remove the metrics named with these prefixes from ``trainer.callback_metrics`` and the
    progress bar: a validation without a preview must not show the last preview's numbers."""
    connector = trainer._logger_connector
    for metrics in (connector._callback_metrics, connector._progress_bar_metrics):
        for key in [k for k in metrics if k.startswith(prefixes)]:
            del metrics[key]


def has_validation_step(trainer: pl.Trainer) -> bool:
    """Whether the module defines validation and the trainer runs it at all (before its data is set up)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("validation_step", trainer.lightning_module) and trainer.limit_val_batches != 0


def has_validation(trainer: pl.Trainer) -> bool:
    """Whether fitting runs a validation loop with at least one batch."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("validation_step", trainer.lightning_module):
        return False
    loop = trainer.fit_loop.epoch_loop.val_loop
    if loop._combined_loader is None:
        return False
    return not loop.skip


def batch_loss(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Callable[[], float] | None:
    """A callable returning the module's training loss on ``batch`` with its current weights,
    leaving no trace: nothing logged, and every tensor of the module (parameters, buffers such as
    BatchNorm statistics, tensor attributes such as an EMA teacher or a counter), the RNG and
    torchmetrics states as they were. It runs with autograd on, as in training, so a step that
    calls ``torch.autograd.grad`` works; no ``.grad`` is touched (it never calls ``backward``).
    ``None`` under manual optimization (there ``training_step`` steps the optimizers itself)."""
    if not pl_module.automatic_optimization:
        return None

    def evaluate() -> float:
        with untouched(pl_module):
            pl_module.log = pl_module.log_dict = _ignore  # type: ignore[method-assign]  # instance attributes shadow the methods
            try:
                with torch.enable_grad():
                    output = pl_module.training_step(batch, batch_idx)
                    loss = output.get("loss") if isinstance(output, Mapping) else output
                    return float(loss.detach().float()) if isinstance(loss, torch.Tensor) else math.nan
            finally:
                del pl_module.log, pl_module.log_dict

    return evaluate


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def check_version() -> None:
    """Warn, once per process, when the installed Lightning is outside the tested versions."""
    warn_if_untested("Lightning", pl.__version__, TESTED_VERSIONS, "CheckpointAverager")


def move_before(trainer: pl.Trainer, callback: Callback, first: Callable[[Callback], bool]) -> None:
    """Move ``callback`` before the first earlier callback for which ``first`` holds (Lightning runs
    callbacks' hooks in list order)."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    mine = callbacks.index(callback)
    earlier = [i for i, cb in enumerate(callbacks[:mine]) if first(cb)]
    if earlier:
        callbacks.insert(earlier[0], callbacks.pop(mine))


@contextmanager
def forward_replaced(module: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Inside: ``module(...)`` calls ``forward`` (an instance attribute shadowing the method)."""
    own = module.__dict__.get("forward")  # a forward set on the instance (rare) is put back as it was
    module.forward = forward
    try:
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            del module.forward  # the class's forward again
