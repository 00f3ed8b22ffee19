"""``DiLoCoStrategy``: Lightning's DDP process launch without DDP's per-step gradient all-reduce;
the replicas train on their own and :class:`ckptavg.distributed.DiLoCo` (optionally with
:class:`ckptavg.distributed.Sparta`) merges them."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from ..distributed import DiLoCo, DiLoCoConfig, OuterFactory, ReplicaMerging

STATE_KEY = "ckptavg_diloco"


class DiLoCoStrategy(DDPStrategy):
    """Train with DiLoCo (and SPARTA) in Lightning: ``Trainer(strategy=DiLoCoStrategy(sync_every=50),
    devices=8)``.

    Processes are launched as under ``strategy="ddp"``, but the module is not wrapped in
    ``DistributedDataParallel``: gradients stay local, and every ``sync_every`` optimizer steps the
    outer step merges the replicas (see :class:`ckptavg.distributed.DiLoCo` for every argument).
    With ``sparta_fraction``, SPARTA also averages that share of the parameters after every step.
    A :class:`ckptavg.CheckpointAverager` in the same Trainer snapshots the global (merged)
    weights, so its window, previews and end-of-run merge apply to the model being trained.

    Checkpoints carry DiLoCo's state (global weights, outer optimizer, position in the round) beside
    rank 0's replica; a resume restarts every replica from rank 0's, which is exact when the
    checkpoint was taken at a sync step (``every_n_train_steps`` a multiple of ``sync_every``).
    One optimizer per module.

    Args:
        sync_every, outer_optimizer, fragments, fragment_delay, communication_dtype: DiLoCo's.
        sparta_fraction: SPARTA's ``fraction`` (``None``: no SPARTA).
        **kwargs: :class:`lightning.pytorch.strategies.DDPStrategy`'s (``process_group_backend``, ...).
    """

    strategy_name = "diloco"

    def __init__(
        self,
        sync_every: int = 50,
        *,
        outer_optimizer: OuterFactory | None = None,
        fragments: int = 1,
        fragment_delay: int = 0,
        communication_dtype: torch.dtype | None = None,
        sparta_fraction: float | None = None,
        **kwargs: Any,
    ):
        self.config = DiLoCoConfig(
            sync_every, outer_optimizer, fragments, fragment_delay, communication_dtype, sparta_fraction
        )  # every error here, before any process starts
        super().__init__(**kwargs)
        self.merging: ReplicaMerging | None = None
        self.bytes_sent = 0  # what DiLoCo and SPARTA handed to the collectives in the last fit
        self._restored: dict[str, Any] | None = None

    @property
    def diloco(self) -> DiLoCo | None:
        return self.merging.diloco if self.merging is not None else None

    def configure_ddp(self) -> None:
        """No ``DistributedDataParallel`` wrapper: the replicas do not all-reduce gradients."""

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != "fit":
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"DiLoCoStrategy trains with one optimizer; configure_optimizers returned {len(self.optimizers)}"
            )
        module, optimizer = self.lightning_module, self.optimizers[0]
        assert module is not None
        self.bytes_sent = 0
        self.merging = self.config.start(module, optimizer)
        if self._restored is not None:
            self.merging.load_state_dict(self._restored)
            self._restored = None

    def global_state(self) -> dict[str, Tensor]:
        """The module's state dict with every parameter replaced by DiLoCo's global (merged) weights
        (see :meth:`ckptavg.distributed.DiLoCo.global_state`)."""
        if self.merging is None:
            module = self.lightning_module
            assert module is not None
            return dict(module.state_dict())
        return self.merging.global_state()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.merging is not None:
            checkpoint[STATE_KEY] = self.merging.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        self._restored = checkpoint.get(STATE_KEY)  # applied in setup, once DiLoCo exists
        return checkpoint

    def teardown(self) -> None:
        if self.merging is not None:
            self.bytes_sent = self.merging.bytes_sent
            self.merging.close()
            self.merging = None
        super().teardown()
