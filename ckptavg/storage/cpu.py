"""The host-memory tier: a preallocated ring of snapshot rows (pinned on GPU runs)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..kernels import PendingCopy, copy_snapshot, merge_blocks, non_finite_tensor
from ..layout import Block, Layout, dtype_code, dtype_from_code
from .protocol import warn_rejected


class CpuRing:
    """``capacity`` snapshots in host memory, allocated once.

    Each dtype group is one ``[capacity + 1, numel]`` tensor. The spare row receives the incoming
    snapshot; only when it proved finite does it join the window (evicting the oldest row, which
    becomes the next spare). After the first ``capacity + 1`` snapshots nothing is allocated.
    """

    def __init__(self, layout: Layout, capacity: int, pin_memory: bool = False):
        self.layout = layout
        self.capacity = capacity
        self._ring = {
            d: torch.empty(capacity + 1, n, dtype=d, pin_memory=pin_memory) for d, n in layout.group_numel.items()
        }
        self._slots: list[int] = []  # live rows, oldest -> newest
        self._steps: list[int] = []
        self._spare = 0
        self._pending: tuple[int, int, PendingCopy] | None = None  # (row, step, copy in flight)
        self._evicted: tuple[int, int] | None = None  # (row, step) of the snapshot the newest one evicted
        self._views: dict[int, dict[str, Tensor]] = {}  # per row: each tensor's view of it, built once

    @property
    def steps(self) -> list[int]:
        self.settle(wait=False)
        pending = [self._pending[1]] if self._pending is not None else []
        return (self._steps + pending)[-self.capacity :]  # a copy in flight counts (it is rarely refused)

    def __len__(self) -> int:
        return len(self.steps)

    def stage(self, tensors: Mapping[str, Tensor]) -> PendingCopy:
        """Copy a snapshot into the spare row (see :func:`copy_snapshot`). Nothing joins the window
        until :meth:`commit`. Waits only if the previous copy still fills the spare row."""
        self.settle()
        self._evicted = None  # its row may be the spare now
        self._spare = next(s for s in range(self.capacity + 1) if s not in self._slots)
        row = {d: ring[self._spare] for d, ring in self._ring.items()}
        return copy_snapshot(self.layout, tensors, row, self._row_views(self._spare))

    def _row_views(self, slot: int) -> dict[str, Tensor]:
        """Each tensor's view of a ring row, built once per row (it costs more than copying a small
        tensor); callers get their own dict of the same views."""
        if slot not in self._views:
            self._views[slot] = self.layout.views({d: ring[slot] for d, ring in self._ring.items()})
        return dict(self._views[slot])

    def commit(self, step: int, copy: PendingCopy | None = None) -> None:
        """Add the staged snapshot to the window (evicting the oldest when full); with a copy still
        in flight, once it has completed and proved finite."""
        if copy is not None and copy.in_flight:
            self._pending = (self._spare, step, copy)
        else:
            self._commit(self._spare, step)

    def settle(self, wait: bool = True) -> None:
        """Commit (or reject, with a warning) a snapshot whose copy was in flight."""
        if self._pending is None or not (wait or self._pending[2].ready()):
            return
        slot, step, copy = self._pending
        self._pending = None
        bad = copy.verdict()
        if bad is None:
            self._commit(slot, step)
        else:
            warn_rejected(step, bad)

    def _commit(self, slot: int, step: int) -> None:
        self._slots.append(slot)
        self._steps.append(step)
        self._evicted = None
        if len(self._slots) > self.capacity:
            self._evicted = (self._slots[0], self._steps[0])  # intact until the next snapshot reuses its row
            del self._slots[0], self._steps[0]

    def discard_from(self, step: int) -> None:
        """Drop the snapshots taken at or after ``step`` (always the newest)."""
        self.settle()
        self._evicted = None
        while self._steps and self._steps[-1] >= step:
            del self._slots[-1], self._steps[-1]

    @property
    def pinned(self) -> bool:
        return all(ring.is_pinned() for ring in self._ring.values())

    @property
    def nbytes(self) -> int:
        """Host memory held (the ring, spare row included)."""
        return sum(ring.numel() * ring.element_size() for ring in self._ring.values())

    def read_groups(self, index: int) -> dict[torch.dtype, Tensor]:
        """Snapshot ``index`` (0 = oldest held) as one flat tensor per dtype group: read-only
        views of the ring (valid until the next snapshot overwrites that row)."""
        self.settle()
        slot = self._slots[index]
        return {d: ring[slot] for d, ring in self._ring.items()}

    def iter_blocks(self) -> Iterator[tuple[torch.dtype, Block, list[Tensor]]]:
        """Every block of every group, as one read-only row per held snapshot (oldest first);
        views of the ring, valid until the next snapshot."""
        self.settle()
        for dtype, blocks in self.layout.blocks.items():
            ring = self._ring[dtype]
            for block in blocks:
                yield dtype, block, [ring[slot, block.lo : block.hi] for slot in self._slots]

    def scratch(self) -> dict[str, Tensor]:
        """A merge output to copy elsewhere at once, with no allocation: views of an unused row
        (the spare), valid until the next snapshot; fresh buffers while the spare row still holds
        the snapshot the newest one evicted."""
        self.settle()
        spare = next(slot for slot in range(self.capacity + 1) if slot not in self._slots)
        if self._evicted is not None and spare == self._evicted[0]:
            return self.layout.views(self.layout.new_buffers())  # keep the evicted row intact (see drop)
        return self._row_views(spare)

    def merge(self, coefficients: list[float], out: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.settle()
        live = [(slot, c) for slot, c in zip(self._slots, coefficients, strict=True) if c != 0.0]

        def rows(dtype: torch.dtype, lo: int, hi: int) -> Iterator[tuple[Tensor, float]]:
            ring = self._ring[dtype]
            return ((ring[slot, lo:hi], c) for slot, c in live)

        def newest(dtype: torch.dtype, lo: int, hi: int) -> Tensor:
            return self._ring[dtype][live[-1][0], lo:hi]  # the newest snapshot merged, not one excluded by before=

        return merge_blocks(self.layout, rows, newest, out)

    def non_finite(self, coefficients: list[float], dtype: torch.dtype, block: Block) -> dict[int, str]:
        self.settle()
        ring = self._ring[dtype]
        found = {}
        for index, (slot, c) in enumerate(zip(self._slots, coefficients, strict=True)):
            name = non_finite_tensor(block, ring[slot, block.lo : block.hi]) if c != 0.0 else None
            if name is not None:
                found[index] = name
        return found

    def drop(self, indices: list[int]) -> None:
        """Remove these snapshots; when the newest snapshot evicted one whose row is still intact,
        that one comes back (a snapshot dropped as non-finite costs the window nothing)."""
        self.settle()
        for index in sorted(indices, reverse=True):
            del self._slots[index], self._steps[index]
        if self._evicted is not None and len(self._slots) < self.capacity:
            slot, step = self._evicted
            self._slots.insert(0, slot)
            self._steps.insert(0, step)
        self._evicted = None

    def flush(self) -> None:
        self.settle()

    def close(self) -> None:
        self.settle()

    def verify(self) -> list[str]:
        return []  # rows in memory: nothing to read back

    def finish(self, step: int) -> None:
        pass  # nothing outlives the process to mark

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        index = torch.tensor(self._slots, dtype=torch.long)
        return {
            "steps": list(self._steps),
            "snapshots": {dtype_code(d): ring.index_select(0, index) for d, ring in self._ring.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        steps = [int(s) for s in state["steps"]]
        snapshots = {dtype_from_code(code): t for code, t in state["snapshots"].items()}
        if set(snapshots) != set(self._ring):
            raise ValueError(f"snapshot groups {sorted(map(str, snapshots))} do not match the layout's")
        for dtype, rows in snapshots.items():
            if tuple(rows.shape) != (len(steps), self.layout.group_numel[dtype]) or rows.dtype != dtype:
                raise ValueError(
                    f"{dtype_code(dtype)} snapshots have shape {tuple(rows.shape)} and dtype {rows.dtype}; "
                    f"expected ({len(steps)}, {self.layout.group_numel[dtype]}) and {dtype}"
                )
        keep = range(max(0, len(steps) - self.capacity), len(steps))
        self._slots, self._steps = [], []
        for slot, row in enumerate(keep):
            for dtype, rows in snapshots.items():
                self._ring[dtype][slot].copy_(rows[row])
            self._commit(slot, steps[row])
