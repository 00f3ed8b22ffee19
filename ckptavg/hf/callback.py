"""``CheckpointAveragerCallback``: the Hugging Face Trainer adapter over
:class:`ckptavg.training.TrainingSession`.

Each hook translates one Trainer event into a session call; the decisions (cadence, recovery, the
end-of-run pick, judge and export) live in the session, as under Lightning. What the Trainer does
not hand a callback (itself, each micro-batch's loss, the resumed folder) is observed in
:mod:`ckptavg.hf._internals`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import CkptavgWarning
from ..files import add_safetensors_metadata, atomic_folder, atomic_write
from ..layout import state_tensors
from ..methods import DEFAULT_ALPHA, MergeSpec
from ..recovery import RecoveryEvent, RecoveryPolicy
from ..training import AveragerConfig, NamedMerge, TrainingSession
from ..window import load_state
from . import _internals

STATE_FILE = "ckptavg_state.pt"  # the session's state inside each checkpoint-N folder
RAW_FILE = "ckptavg_raw.safetensors"  # a checkpoint's raw weights, when its model files hold a merge
MERGED_FOLDER = "merged"
_log = logging.getLogger("ckptavg.hf")


class CheckpointAveragerCallback(TrainerCallback):
    """Keep a rolling window of snapshots of a ``transformers.Trainer`` run, preview their merge at
    every evaluation, restore a merged stable point after a loss spike, and finish the run with
    the merged model, as :class:`ckptavg.CheckpointAverager` does under Lightning (same arguments,
    defaults and errors).

    Args:
        window: snapshots kept (the oldest is evicted).
        every_n_steps: snapshot at every optimizer step (``state.global_step``) that is a multiple
            of this. With neither cadence, one is chosen from ``max_steps`` (or the epochs): a
            snapshot every ``steps // (10 x window)`` steps, so the window spans the last tenth.
        every_n_epochs: snapshot at the end of every this many epochs.
        start_step: no snapshot at or before this optimizer step.
        merge: the merge for previews, restores and the end: a method name or a
            :class:`ckptavg.MergeSpec`.
        alpha: the EMA coefficient (``decay = 1 - alpha`` is the peers' spelling).
        storage: ``"cpu"`` (host memory, saved in each ``checkpoint-N/``), ``"disk"`` (files in
            ``dirpath/window``; checkpoints record the folder and steps) or ``"auto"`` (disk when
            the Trainer saves checkpoints).
        dirpath: the window's folder and the ``merged/`` model's parent; default
            ``<output_dir>/ckptavg`` for the window and ``<output_dir>/merged`` for the model.
        preview: at every evaluation during training, evaluate the merge with the Trainer's own
            evaluation loop (collator, ``compute_metrics``, every eval dataset) and add its
            metrics as ``eval_merged_<name>`` (``eval_merged_<dataset>_<name>`` for a dict of
            eval datasets): logged to every ``report_to`` integration, and usable as
            ``metric_for_best_model="merged_loss"`` and by ``EarlyStoppingCallback``.
        preview_every: preview at every this many evaluations (the first included); the ones
            between log no merged metrics, so nothing may judge by them (refused at the start).
        preview_batches: the evaluation batches each preview (and each candidate) evaluates: a
            count, a fraction in (0, 1], or ``None`` for all. The raw metrics keep every batch;
            the merged ones are then on the first batches only (said at the start).
        merge_at_end: when training ends, ``trainer.model`` holds the merge (unless
            ``load_best_model_at_end`` loaded a best checkpoint, which it keeps), and
            ``merged/`` holds it as a ``from_pretrained`` folder.
        recover: restore a merged stable point after a loss spike or NaN (see
            :class:`ckptavg.RecoveryPolicy`). Every optimizer step's loss is the sum of what the
            Trainer's ``training_step`` returned for its micro-batches (the loss the Trainer logs),
            observed by wrapping that method on the Trainer instance; the model is not changed.
        spread: under DDP, each rank keeps ``1/world`` of every snapshot.
        decay, keep, monitor, mode, merge_options, candidates, select, log_correlation: as in
            :class:`ckptavg.CheckpointAverager`. Metric names are the Trainer's (``"eval_loss"`` or
            ``"loss"``; ``select`` and ``monitor`` may name merged ones, ``"eval_merged_loss"``).
            By default the end of the run is judged on ``metric_for_best_model`` (with
            ``greater_is_better``), else ``eval_loss``.

    What is averaged: every tensor of the model's ``state_dict`` (for a PEFT model, the frozen
    base weights too: they average to themselves, and the window holds them). Integer buffers come
    from the newest snapshot.

    Example::

        from transformers import Trainer, TrainingArguments
        from ckptavg.hf import CheckpointAveragerCallback

        trainer = Trainer(model=model, args=TrainingArguments("out", lr_scheduler_type="constant"),
                          train_dataset=train, eval_dataset=val, callbacks=[CheckpointAveragerCallback(window=8)])
        trainer.train()   # logs eval_loss and eval_merged_loss; out/merged/ loads with from_pretrained
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
        merge_options: dict[str, Any] | None = None,
        candidates: list[Any] | dict[str, Any] | None = None,
        select: str | None = None,
        log_correlation: bool = False,
    ):
        self.config = AveragerConfig(
            window=window, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, start_step=start_step,
            merge=merge, alpha=alpha, storage=storage, dirpath=dirpath, preview=preview, preview_every=preview_every,
            preview_batches=preview_batches, merge_at_end=merge_at_end,
            recover=recover, spread=spread, decay=decay, keep=keep, monitor=_raw_name(monitor), mode=mode,
            merge_options=merge_options, candidates=candidates, select=_raw_name(select),
            log_correlation=log_correlation,
        )  # fmt: skip
        self.session = TrainingSession(
            self.config, name="CheckpointAveragerCallback", info=self._info, warn=self._warn, log_metrics=self._log
        )
        self._tap: _internals.TrainerTap | None = None
        self._training = False
        self._names_checked = False
        self._evaluated: tuple[int, dict[str, float], dict[str, dict[str, float]]] | None = None
        self.merged_path: Path | None = None  # the merged model's folder, once written (rank 0)

    # What the run did (as on CheckpointAverager).
    window = property(lambda self: self.session.window, doc="The window (built on first use).")
    guard = property(lambda self: self.session.guard)
    final_metrics = property(lambda self: self.session.final_metrics)
    selection = property(lambda self: self.session.selection)

    @property
    def recovery_events(self) -> list[RecoveryEvent]:
        return self.session.recovery_events

    @property
    def trainer(self) -> transformers.Trainer:
        if self._tap is None:
            raise RuntimeError("CheckpointAveragerCallback: not attached to a Trainer yet (pass it in callbacks=[...])")
        return self._tap.trainer

    def _is_main(self) -> bool:
        return self.session.rank == 0

    def _info(self, message: str) -> None:
        if self._is_main():
            _log.info(message)

    def _warn(self, message: str) -> None:
        if self._is_main():
            warnings.warn(message, CkptavgWarning, stacklevel=3)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self._tap is not None:
            self.trainer.log(dict(metrics))

    def _attach(self) -> None:
        if self._tap is None:
            trainer = _internals.find_trainer()
            if trainer is None:
                raise RuntimeError(
                    "CheckpointAveragerCallback must be given to a transformers.Trainer (callbacks=[...] or add_callback)"
                )
            _internals.check_version()
            self._tap = _internals.TrainerTap(trainer)

    # -- the start ----------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._attach()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._attach()
        trainer, model = self.trainer, kwargs["model"]
        _internals.move_first(trainer, self)
        if (args.metric_for_best_model or "").removeprefix("eval_").startswith("merged"):
            self.session.check_judges_see_previews(
                [f"metric_for_best_model={args.metric_for_best_model!r}"]
                + [
                    type(cb).__name__
                    for cb in trainer.callback_handler.callbacks
                    if isinstance(cb, EarlyStoppingCallback)
                ]
            )
        saves = args.save_strategy != "no"
        output = Path(str(args.output_dir)).absolute()
        world = args.world_size
        self.session.bind(
            rank=args.process_index,
            world_size=world,
            storage=("disk" if saves else "cpu") if self.config.storage == "auto" else self.config.storage,
            spread=self.config.spread and world > 1 and torch.distributed.is_initialized(),
            default_dirpath=output / "ckptavg",
            root=output,
        )
        resumed = self._tap.resumed_from if self._tap is not None else None
        if resumed is None and state.global_step > 0:
            # Attached after the Trainer loaded the checkpoint (add_callback): its usual folder.
            guess = _internals.checkpoint_folder(args, state.global_step)
            resumed = str(guess) if guess.is_dir() else None
        if resumed and (Path(resumed) / RAW_FILE).is_file():
            # The checkpoint's model files hold the merge its monitored metric measured: training
            # goes on from the raw weights kept beside them.
            from safetensors.torch import load_model

            load_model(_unwrapped(trainer, model), Path(resumed) / RAW_FILE, device=str(args.device))
        if resumed and (Path(resumed) / STATE_FILE).is_file():
            saved = torch.load(Path(resumed) / STATE_FILE, map_location="cpu", weights_only=True)
            self.session.load_state_dict(saved, adopt_storage=self.config.storage == "auto")
        epochs = None if args.max_steps > 0 else int(args.num_train_epochs)
        self.session.plan(float(state.max_steps) if state.max_steps > 0 else float("inf"), epochs, state.global_step)
        self.session.begin(model, state.global_step, checkpoints_carry_window=saves)
        self._training, self._names_checked, self._evaluated = True, trainer.eval_dataset is None, None

    # -- the steps ----------------------------------------------------------------------------------

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.session.before_optimizer_step([kwargs["optimizer"]], state.global_step + 1)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.session.restore_learning_rates()  # before the scheduler steps

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model, step = kwargs["model"], state.global_step
        tap = self._tap
        loss = tap.take_step_loss() if tap is not None else None
        if self.session.guard is not None and loss is not None and tap is not None:
            self.session.add_loss(loss)
            self.session.end_step(step, model, [kwargs["optimizer"]], tap.batch_loss(model))
        if self.session.snapshot_due(step):
            self.session.snapshot(self._snapshot_source(model), step)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epoch = max(round(state.epoch or 0.0) - 1, 0)
        if self.session.epoch_snapshot_due(epoch, state.global_step):
            self.session.snapshot(self._snapshot_source(kwargs["model"]), state.global_step)

    def _snapshot_source(self, model: nn.Module) -> Any:
        """The model, or under a DiLoCoCallback the global (merged) weights it is training."""
        for callback in self.trainer.callback_handler.callbacks if self._tap is not None else []:
            global_state = getattr(callback, "global_state", None)
            if callback is not self and callable(global_state) and (state := global_state()) is not None:
                return state
        return model

    # -- previews -----------------------------------------------------------------------------------

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        metrics: dict[str, float] = kwargs.get("metrics") or {}
        if not self._training or self._tap is None:
            return
        dataset, ignore_keys, prefix = self._tap.current()
        raw = {k: float(v) for k, v in metrics.items() if k.startswith(prefix + "_") and _is_number(v)}
        raw = {k: v for k, v in raw.items() if not k.endswith(_internals._SPEED_SUFFIXES)}
        if not self._names_checked and raw:
            self._names_checked = True
            self.session.check_metric_names(list(raw), hint="eval_merged_<name> for the merge's")
        step = state.global_step
        if self._evaluated is None or self._evaluated[0] != step:
            self._evaluated = (step, {}, {})
        _, all_raw, measured = self._evaluated
        all_raw.update(raw)
        if self.session.preview_due(step):
            model = kwargs["model"]
            current = self.session.merge_is_current(step)
            for merge, _ in self.session.previews():
                merged_prefix = _merged_prefix(prefix, None if merge is self.session.main else merge.name)
                if current:
                    values = {merged_prefix + k[len(prefix) :]: v for k, v in raw.items()}
                else:
                    with merge.swapped(self.session.window, model):
                        values = self._tap.evaluate_quietly(
                            dataset, ignore_keys, merged_prefix, self.config.preview_batches
                        )
                metrics.update(values)  # early stopping and the best-model bookkeeping read this dict
                self.trainer.log(dict(values))  # every report_to integration
                measured.setdefault(merge.name, {}).update(
                    {prefix + k[len(merged_prefix) :]: v for k, v in values.items()}
                )
        self.session.record_validation(step, dict(all_raw), {k: dict(v) for k, v in measured.items()})

    # -- checkpoints --------------------------------------------------------------------------------

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        saved = self.session.state_dict()  # every rank: a spread window is gathered on rank 0
        folder = _internals.checkpoint_folder(args, state.global_step)
        if not folder.is_dir():
            return
        if self._is_main():
            atomic_write(folder / STATE_FILE, lambda tmp: torch.save(saved, tmp))
        merge = self._checkpoint_holds(args)
        if merge is not None and self.session.has_snapshots:
            # As under Lightning: a checkpoint judged on a merged metric holds the weights that
            # earned its score (load_best_model_at_end loads them); the raw ones ride beside it.
            from safetensors.torch import save_model

            model = kwargs["model"]
            if self._is_main():
                atomic_write(folder / RAW_FILE, lambda tmp: save_model(_unwrapped(self.trainer, model), str(tmp)))
            with merge.swapped(self.session.window, model):
                _internals.save_model_into(self.trainer, str(folder))

    def _checkpoint_holds(self, args: TrainingArguments) -> NamedMerge | None:
        """The merge a checkpoint's model files hold: the one ``metric_for_best_model`` names
        (``merged_loss``: the main merge; ``merged_<candidate>_loss``: that candidate), else
        ``None`` (the raw weights)."""
        name = (args.metric_for_best_model or "").removeprefix("eval_")
        if not name.startswith("merged_"):
            return None
        rest = name.removeprefix("merged_")
        return next(
            (merge for key, merge in self.session.candidates.items() if rest.startswith(key + "_")),
            self.session.main,
        )

    # -- the end ------------------------------------------------------------------------------------

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._training:
            return
        self._training = False
        trainer, model = self.trainer, kwargs["model"]
        best_loaded = bool(args.load_best_model_at_end and state.best_model_checkpoint)
        kept = {k: v.detach().clone() for k, v in state_tensors(model).items()} if best_loaded else None
        self.session.finish(
            state.global_step,
            model,
            evaluate=self._evaluate_all if trainer.eval_dataset is not None else None,
            monitored=self.session.monitored(self._best_model_metric(args)),
            export=lambda merge: self._export(model, merge),
            agree=_agree,
            publish=lambda metrics: trainer.log(dict(metrics)),
        )
        self.session.close()
        if kept is not None and self.config.merge_at_end:
            load_state(model, kept)
            self._info(
                "CheckpointAveragerCallback: load_best_model_at_end loaded "
                f"{state.best_model_checkpoint}: the model keeps it; the merge is in {self.merged_path or 'merged/'}"
            )

    def _evaluate_all(self, merge: NamedMerge | None) -> dict[str, float]:
        """The raw weights' (``None``) or a merge's metrics on every eval dataset, with raw names."""
        tap, trainer = self._tap, self.trainer
        assert tap is not None
        datasets = trainer.eval_dataset
        runs = [(name, f"eval_{name}") for name in datasets] if isinstance(datasets, Mapping) else [(None, "eval")]
        metrics: dict[str, float] = {}
        for dataset, prefix in runs:
            if merge is None:
                metrics.update(tap.evaluate_quietly(dataset, None, prefix))
            else:
                assert trainer.model is not None
                with merge.swapped(self.session.window, trainer.model):
                    metrics.update(tap.evaluate_quietly(dataset, None, prefix))
        return metrics

    @staticmethod
    def _best_model_metric(args: TrainingArguments) -> tuple[str, str] | None:
        name = _raw_name(args.metric_for_best_model)
        if name is None:
            return None
        return name, "max" if args.greater_is_better else "min"

    def _export(self, model: nn.Module, merge: NamedMerge) -> Path | None:
        """Rank 0 writes the model as a ``from_pretrained`` folder (config, weights sharded as
        ``save_pretrained`` shards them, the tokenizer or processor), with the merge's steps,
        method and coefficients in every safetensors file's metadata."""
        if not self._is_main():
            return None
        trainer = self.trainer
        unwrapped = _unwrapped(trainer, model)
        metadata = self.session.merged_metadata()
        target = (
            Path(self.config.dirpath) / MERGED_FOLDER
            if self.config.dirpath is not None
            else Path(str(trainer.args.output_dir)) / MERGED_FOLDER
        )

        def write(folder: Path) -> None:
            unwrapped.save_pretrained(folder, safe_serialization=True)
            processor = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
            if processor is not None and hasattr(processor, "save_pretrained"):
                processor.save_pretrained(folder)
            for weights in sorted(folder.glob("*.safetensors")):
                add_safetensors_metadata(weights, metadata)

        atomic_folder(target, write)
        self.merged_path = target
        steps = self.session.window.steps
        self._info(
            f"CheckpointAveragerCallback: wrote the {merge.name} merge of steps {steps[0]}..{steps[-1]} to {target}"
        )
        return target


def _unwrapped(trainer: transformers.Trainer, model: nn.Module) -> Any:
    """The model itself: without DDP's or torch.compile's wrapper (their names carry prefixes)."""
    unwrapped: Any = trainer.accelerator.unwrap_model(model) if hasattr(trainer, "accelerator") else model
    return getattr(unwrapped, "_orig_mod", unwrapped)


def _raw_name(name: str | None) -> str | None:
    """A Trainer metric name as the raw evaluation logs it: ``"loss"``, ``"eval_loss"`` and
    ``"eval_merged_loss"`` all name ``"eval_loss"`` (``merged/loss`` too, the Lightning spelling)."""
    if name is None:
        return None
    name = name.removeprefix("merged/")
    name = name.removeprefix("eval_")
    name = name.removeprefix("merged_")
    return f"eval_{name}"


def _merged_prefix(prefix: str, candidate: str | None) -> str:
    """``eval`` -> ``eval_merged`` (``eval_merged_<candidate>``); ``eval_val`` -> ``eval_merged_val``."""
    head, _, dataset = prefix.partition("_")
    parts = [head, "merged", *([candidate] if candidate else []), *([dataset] if dataset else [])]
    return "_".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a no-op in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
