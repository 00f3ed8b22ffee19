"""``DiLoCoCallback``: DiLoCo (and SPARTA) for the Hugging Face Trainer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..distributed import DiLoCo, DiLoCoConfig, OuterFactory, ReplicaMerging
from ..files import atomic_write
from . import _internals

STATE_FILE = "ckptavg_diloco.pt"


def _local_gradients(state, bucket):  # DDP checks the annotations: none here
    """A DDP communication hook that communicates nothing: each replica keeps its own gradients."""
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class DiLoCoCallback(TrainerCallback):
    """Train with DiLoCo (and SPARTA) under the Trainer: launch as for DDP (``torchrun``,
    ``accelerate launch``); the Trainer's ``DistributedDataParallel`` wrapper is given a
    communication hook that all-reduces nothing, so the replicas train on their own, and every
    ``sync_every`` optimizer steps the outer step merges them (see
    :class:`ckptavg.distributed.DiLoCo` for every argument). A
    :class:`ckptavg.hf.CheckpointAveragerCallback` in the same Trainer snapshots the global
    (merged) weights. Each ``checkpoint-N/`` gets ``ckptavg_diloco.pt`` (global weights, outer
    optimizer, position in the round; rank 0's), read back on resume.

    Example::

        trainer = Trainer(..., callbacks=[DiLoCoCallback(sync_every=50), CheckpointAveragerCallback()])
    """

    def __init__(
        self,
        sync_every: int = 50,
        *,
        outer_optimizer: OuterFactory | None = None,
        fragments: int = 1,
        fragment_delay: int = 0,
        communication_dtype: torch.dtype | None = None,
        sparta_fraction: float | None = None,
    ):
        self.config = DiLoCoConfig(
            sync_every, outer_optimizer, fragments, fragment_delay, communication_dtype, sparta_fraction
        )  # every error here, before the Trainer starts
        self.merging: ReplicaMerging | None = None

    @property
    def diloco(self) -> DiLoCo | None:
        return self.merging.diloco if self.merging is not None else None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = _internals.find_trainer()
        wrapped = getattr(trainer, "model_wrapped", None)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.register_comm_hook(None, _local_gradients)
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps the real one
        self.merging = self.config.start(model, inner)
        folder = _internals.checkpoint_folder(args, state.global_step)
        if state.global_step > 0 and (folder / STATE_FILE).is_file():
            self.merging.load_state_dict(torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True))

    def global_state(self) -> dict[str, Tensor] | None:
        return self.merging.global_state() if self.merging is not None else None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.merging is None:
            return
        saved = self.merging.state_dict()
        folder = _internals.checkpoint_folder(args, state.global_step)
        if args.process_index == 0 and folder.is_dir():
            atomic_write(folder / STATE_FILE, lambda tmp: torch.save(saved, tmp))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.merging is not None:
            self.merging.close()
