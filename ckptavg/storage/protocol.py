"""The one interface every storage tier implements for :class:`ckptavg.CheckpointWindow`, and the
warning a refused snapshot gives in every tier."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import CkptavgWarning
from ..kernels import PendingCopy
from ..layout import Block, Layout

OTHER_RANK = "a tensor on another rank"  # a spread snapshot is rejected by every rank together


def warn_rejected(step: int, name: str, stacklevel: int = 3) -> None:
    """``name``: the non-finite tensor (or :data:`OTHER_RANK`)."""
    what = name if name == OTHER_RANK else f"tensor {name!r}"
    warnings.warn(
        f"snapshot at step {step} rejected: {what} holds NaN or Inf; the window is unchanged",
        CkptavgWarning,
        stacklevel=stacklevel,
    )


class SnapshotStore(Protocol):
    """What a storage tier provides to :class:`ckptavg.CheckpointWindow`. Snapshots are indexed
    by position, 0 = the oldest held; the read API (:meth:`read_groups`, :meth:`merge`) is the
    only way anything outside a store reaches its data."""

    layout: Layout
    capacity: int

    @property
    def steps(self) -> list[int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def pinned(self) -> bool: ...
    def __len__(self) -> int: ...
    def stage(self, tensors: Mapping[str, Tensor]) -> PendingCopy: ...
    def commit(self, step: int, copy: PendingCopy | None = None) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def discard_from(self, step: int) -> None: ...
    def read_groups(self, index: int) -> dict[torch.dtype, Tensor]: ...
    def scratch(self) -> dict[str, Tensor]: ...
    def iter_blocks(self) -> Iterator[tuple[torch.dtype, Block, list[Tensor]]]: ...
    def merge(self, coefficients: list[float], out: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]: ...
    def non_finite(self, coefficients: list[float], dtype: torch.dtype, block: Block) -> dict[int, str]:
        """The snapshots with a non-zero coefficient whose rows of ``block`` hold NaN or Inf, by
        index, each with the name of such a tensor (after a merge raised ``NonFiniteBlock``)."""
        ...

    def drop(self, indices: list[int]) -> None:
        """Remove these snapshots from the window (indices as in :attr:`steps`)."""
        ...

    def verify(self) -> list[str]:
        """Read every stored snapshot in full; drop the unusable ones and return their names."""
        ...

    def finish(self, step: int) -> None:
        """The run that wrote this window ended at ``step``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
