"""Everything the Trainer adapter needs that a ``TrainerCallback`` is not handed: the one module of
ckptavg that touches the Trainer's private names or replaces its methods.

A ``TrainerCallback`` receives the arguments, the state and the model, not the Trainer. The
adapter needs the Trainer itself to run its evaluation loop on the merged weights, to see every
micro-batch's loss and to find the folder a run resumes from. :func:`find_trainer` finds it on
the call stack of the event that delivers the callback its first hook; :class:`TrainerTap` then
wraps three of its methods on that instance (not on the class): ``training_step`` (its return
value, the micro-batch's loss as the Trainer logs it, and its inputs, for the restore check),
``evaluate`` (which dataset and metric prefix an ``on_evaluate`` belongs to) and
``_load_from_checkpoint`` (the folder a resume reads). Each wrapper calls the original unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ..isolation import rng_state, set_rng_state, untouched
from ..training import limited_batches, warn_if_untested

TESTED_VERSIONS = ((4, 46), (5, 24))  # the oldest and newest transformers versions the adapter was run with
_SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def check_version() -> None:
    """Warn, once per process, when the installed transformers is outside the tested versions."""
    warn_if_untested("transformers", transformers.__version__, TESTED_VERSIONS, "CheckpointAveragerCallback")


def find_trainer() -> transformers.Trainer | None:
    """The ``Trainer`` whose method is on the call stack (the one calling the callback's hook)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, transformers.Trainer):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


class TrainerTap:
    """What the adapter observes of one Trainer (see the module docstring)."""

    def __init__(self, trainer: transformers.Trainer):
        self.trainer = trainer
        self.step_loss: torch.Tensor | None = None  # the sum of this optimizer step's micro-batch losses
        self.last_inputs: Any = None  # the last micro-batch's inputs, for the restore check
        self.evaluating: list[tuple[Any, list[str] | None, str]] = []  # (eval_dataset, ignore_keys, prefix)
        self.resumed_from: str | None = None
        original_step = trainer.training_step
        original_evaluate = trainer.evaluate
        original_load = getattr(trainer, "_load_from_checkpoint", None)

        def training_step(model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = original_step(model, inputs, *args, **kwargs)
            if isinstance(loss, torch.Tensor):
                # training_step returns the micro-batch's share of the step's loss (the Trainer logs
                # their sum per optimizer step), already divided for gradient accumulation.
                loss = loss.detach().float()
                self.step_loss = loss if self.step_loss is None else self.step_loss + loss
            self.last_inputs = inputs
            return loss

        def evaluate(
            eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
        ) -> Any:
            self.evaluating.append((eval_dataset, ignore_keys, metric_key_prefix))
            try:
                return original_evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            finally:
                self.evaluating.pop()

        trainer.training_step = training_step  # type: ignore[method-assign]
        trainer.evaluate = evaluate  # type: ignore[method-assign]
        if original_load is not None:

            def load_from_checkpoint(resume_from_checkpoint: str, *args: Any, **kwargs: Any) -> Any:
                self.resumed_from = str(resume_from_checkpoint)
                return original_load(resume_from_checkpoint, *args, **kwargs)

            trainer._load_from_checkpoint = load_from_checkpoint  # type: ignore[method-assign]

    def take_step_loss(self) -> torch.Tensor | None:
        loss, self.step_loss = self.step_loss, None
        return loss

    def current(self) -> tuple[Any, list[str] | None, str]:
        """The dataset, ignored keys and metric prefix of the evaluation in progress."""
        return self.evaluating[-1] if self.evaluating else (None, None, "eval")

    def batch_loss(self, model: nn.Module) -> Callable[[], float] | None:
        """A callable returning the training loss of the last micro-batch with the model's current
        weights, leaving no trace (RNG, every module tensor and torchmetrics state restored)."""
        inputs = self.last_inputs
        if inputs is None:
            return None
        trainer = self.trainer

        def evaluate() -> float:
            with untouched(model), torch.enable_grad(), trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(trainer.model_wrapped, trainer._prepare_inputs(inputs))
            return float(loss.detach().float()) if isinstance(loss, torch.Tensor) else math.nan

        return evaluate

    def evaluate_quietly(
        self, eval_dataset: Any, ignore_keys: list[str] | None, prefix: str, batches: int | float | None = None
    ) -> dict[str, float]:
        """The Trainer's own evaluation loop (its collator, ``compute_metrics``, batch size and
        distributed gathering) on ``eval_dataset`` (its first ``batches``: a count or a fraction;
        ``None``: all), with metric keys ``<prefix>_<name>``; no callback sees it, nothing is
        logged, and the RNG and the modules' train/eval modes are restored. Speed metrics are
        dropped."""
        trainer = self.trainer
        handler = trainer.callback_handler
        model = trainer.model
        assert model is not None
        saved_callbacks, saved_rng = handler.callbacks, rng_state()
        saved_modes = {name: m.training for name, m in model.named_modules()}
        handler.callbacks = []
        try:
            dataset = eval_dataset
            if batches is not None:
                named = eval_dataset if eval_dataset is not None else trainer.eval_dataset
                named = trainer.eval_dataset[named] if isinstance(named, str) else named  # type: ignore[index]
                if hasattr(named, "__len__") and not isinstance(named, dict):
                    dataset = first_batches(named, batches, trainer.args.eval_batch_size * trainer.args.world_size)
            dataloader = trainer.get_eval_dataloader(dataset)
            output = trainer.evaluation_loop(
                dataloader,
                description="ckptavg preview",
                prediction_loss_only=True if trainer.compute_metrics is None else None,
                ignore_keys=ignore_keys,
                metric_key_prefix=prefix,
            )
        finally:
            handler.callbacks = saved_callbacks
            set_rng_state(saved_rng)
            for name, m in model.named_modules():
                m.train(saved_modes.get(name, m.training))
        return {
            k: float(v)
            for k, v in (output.metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(_SPEED_SUFFIXES)
        }


def first_batches(dataset: Any, batches: int | float, batch_size: int) -> Any:
    """The examples of the first ``batches`` evaluation batches (a count or a fraction) of a
    dataset with a length: ``datasets.Dataset.select`` keeps its column handling, others a ``Subset``."""
    total = math.ceil(len(dataset) / batch_size)
    examples = min(len(dataset), int(limited_batches(total, batches)) * batch_size)
    if hasattr(dataset, "select"):
        return dataset.select(range(examples))
    return torch.utils.data.Subset(dataset, range(examples))


def move_first(trainer: transformers.Trainer, callback: Any) -> None:
    """Run ``callback``'s hooks before every other callback's: its ``on_evaluate`` adds the merged
    metrics to the dict that early stopping (and the Trainer's best-model bookkeeping) then read."""
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


def save_model_into(trainer: transformers.Trainer, folder: str) -> None:
    """Write the model's weights into a checkpoint folder the way the Trainer's own checkpoint
    does (and never push them to the Hub, as a user's ``save_model`` call would)."""
    trainer.save_model(folder, _internal_call=True)


def checkpoint_folder(args: Any, step: int) -> Path:
    """Where the Trainer saves its checkpoint of ``step``: ``<output_dir>/checkpoint-<step>``."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
