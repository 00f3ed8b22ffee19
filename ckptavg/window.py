"""``CheckpointWindow``: a rolling window of snapshots, merged on demand. No framework needed."""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from .diagnostics import Correlation, correlation_of
from .errors import check_int
from .files import CkptavgWarning
from .kernels import NonFiniteBlock, PendingCopy, all_finite
from .layout import Layout, dtype_code, local_tensor, state_tensors
from .methods import DEFAULT_ALPHA, Evaluate, MergeSpec, Method, coefficients
from .sharding import (
    Spread,
    all_ranks_max,
    all_ranks_max_each,
    distributed_rank,
    is_dtensor,
    replicated_placements,
    shard_placements,
    with_rank0_buffers,
)
from .storage import (
    MANIFEST,
    OTHER_RANK,
    CpuRing,
    DiskStore,
    SnapshotStore,
    rank_dirpath,
    warn_rejected,
    write_ranks_manifest,
)

StateSource = nn.Module | Mapping[str, Tensor]
Storage = Literal["cpu", "disk"]

_T = TypeVar("_T")

STATE_FORMAT = "ckptavg.CheckpointWindow"
STATE_VERSION = 1


class CheckpointWindow:
    """The last ``window`` snapshots of a model, merged on demand with any coefficient vector.

    Args:
        window: how many snapshots to keep; the oldest is evicted when a new one arrives.
        storage: ``"cpu"`` keeps them in a host-memory ring buffer (pinned when the model is on a
            GPU); ``"disk"`` writes each as a safetensors file in ``dirpath`` from a background
            thread, crash-safe and reopenable with :meth:`open`.
        dirpath: the folder of a disk window (required with ``storage="disk"``).
        pin_memory: pin the host buffers; by default, pinned when the first snapshot's tensors are
            on a CUDA device.
        spread: in a multi-process run over replicas (DDP), keep only this rank's ``1/world`` of
            every tensor, so that host memory per rank is ``window x model / world``. By default,
            spread when the snapshots come from a ``DistributedDataParallel`` module. A spread
            window's ``merge``, ``load_into`` and ``swapped`` are collective (every rank calls them;
            each gets the full merged tensors); ``snapshot`` agrees on the NaN check with one
            small all-reduce.
        process_group: the ``torch.distributed`` group the window spans (default: the world).

    In a multi-process run every rank may pass the same ``dirpath``: each keeps its own files in
    ``dirpath/rank<r>``, with a manifest recording the world size and where each tensor's piece
    sits in the full model (FSDP2 shards, spread slices or full replicas);
    :func:`ckptavg.consolidate` rebuilds the full merged state dict from such a folder offline.
    FSDP2 (DTensor) windows hold each rank's local shards: snapshot, merge and restore are local,
    with no communication.

    Floating tensors are averaged in fp32 (fp64 stays fp64) and cast back once; integer and bool
    tensors (for example BatchNorm's ``num_batches_tracked``) come from the newest snapshot.
    Tensors are paired by name. A DTensor contributes its local shard.

    Example:
        >>> import torch
        >>> from ckptavg import CheckpointWindow
        >>> model = torch.nn.Linear(4, 2)
        >>> win = CheckpointWindow(window=3)
        >>> for step in range(5):
        ...     with torch.no_grad():
        ...         _ = model.weight.add_(1.0)
        ...     win.snapshot(model, step=step)
        True
        True
        True
        True
        True
        >>> win.steps
        [2, 3, 4]
        >>> win.weights("wma")
        [0.16666666666666666, 0.3333333333333333, 0.5]
        >>> with win.swapped(model, "sma"):
        ...     pass  # evaluate the merged model here; the raw weights come back afterwards
    """

    def __init__(
        self,
        window: int = 8,
        storage: Storage = "cpu",
        dirpath: str | os.PathLike[str] | None = None,
        *,
        pin_memory: bool | None = None,
        spread: bool | None = None,
        process_group: Any = None,
    ):
        check_int(window, "window", minimum=1)
        if storage not in ("cpu", "disk"):
            raise ValueError(f"storage must be 'cpu' or 'disk', got {storage!r}")
        if storage == "disk":
            if dirpath is None:
                raise ValueError("storage='disk' needs a dirpath for the snapshot files")
        self.window = window
        self.storage: Storage = storage
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.pin_memory = pin_memory
        self.spread = spread
        self.process_group = process_group
        self._store: SnapshotStore | None = None
        self._swap_backup: dict[str, Tensor] | None = None  # swapped()'s copy of the model's weights, reused
        self._swap_backup_in_use = False
        self._spread: Spread | None = None
        self._sharding: dict[str, Any] | None = None
        self._in_flight: PendingCopy | None = None
        self._finite_steps: set[int] = set()  # snapshots a finite merge has read: proven finite
        self._ranks_merge_together = False  # a multi-process window whose ranks hold different parts

    @classmethod
    def open(
        cls, dirpath: str | os.PathLike[str], *, window: int | None = None, readonly: bool = False, evict: bool = False
    ) -> CheckpointWindow:
        """Reopen a disk window, for example after a crash: it holds every snapshot whose write
        completed.

        Args:
            dirpath: the window's folder.
            window: the window size (default: the stored one). Smaller than the snapshots held is
                refused, unless ``evict=True`` deletes the oldest (or ``readonly=True`` merges the
                newest only).
            readonly: inspect and merge without changing anything: no lock taken, nothing
                deleted, no snapshot; works while the folder's writer runs (it sees the last
                committed manifest). Without it, the window becomes the folder's one writer (a
                second writer gets :class:`ckptavg.FolderLockedError` naming the holder's pid) and
                removes what a crashed writer left behind.
            evict: allow a smaller ``window`` to delete the oldest snapshots.

        In a multi-process run each rank reopens its own ``dirpath/rank<r>``; a rank folder can also
        be opened directly (offline), as a window of that rank's pieces."""
        rank, world = distributed_rank()
        path = rank_dirpath(dirpath, rank, world)
        in_run = world > 1 and (path / MANIFEST).is_file()
        store = DiskStore.open(path if in_run else dirpath, capacity=window, readonly=readonly, evict=evict)
        win = cls(store.capacity, "disk", dirpath)
        win._store = store
        win._adopt_sharding(store.sharding, in_run=in_run)
        return win

    # -- inspection -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return 0 if self._store is None else len(self._store)

    @property
    def steps(self) -> list[int]:
        """The steps of the held snapshots, oldest to newest."""
        return [] if self._store is None else self._store.steps

    @property
    def layout(self) -> Layout | None:
        """Names, dtypes and shapes this process stores (``None`` before the first snapshot): the
        local shards of an FSDP2 model, this rank's slices of a spread window."""
        return None if self._store is None else self._store.layout

    @property
    def full_layout(self) -> Layout | None:
        """Names, dtypes and shapes of what a merge returns (the full tensors of a spread window)."""
        return self._spread.full if self._spread is not None else self.layout

    @property
    def sharding(self) -> dict[str, Any] | None:
        """In a multi-process run: ``{"kind": "dtensor" | "spread" | "replicated", "rank",
        "world_size", "placements"}`` (see :mod:`ckptavg.sharding`); ``None`` in one process."""
        return self._sharding

    @property
    def stored_nbytes(self) -> int:
        """What this window holds: host memory (``"cpu"``, the preallocated ring) or disk space
        (``"disk"``, the listed files); this rank's part in a multi-process window."""
        return 0 if self._store is None else self._store.nbytes

    @property
    def pinned_memory(self) -> bool:
        """Whether the host buffers (the ring, or the disk tier's staging buffer) are pinned."""
        return self._store is not None and self._store.pinned

    def read(self, step: int) -> dict[str, Tensor]:
        """The stored snapshot of ``step``, as fresh CPU tensors in the stored dtypes (this rank's
        part in a multi-process window: its shards or slices, named by :attr:`layout`)."""
        steps = self.steps
        if step not in steps:
            raise KeyError(f"no snapshot of step {step} is held (held: {steps})")
        assert self._store is not None
        views = self._store.layout.views(self._store.read_groups(steps.index(step)))
        return {name: t.clone() for name, t in views.items()}

    def __repr__(self) -> str:
        where = f", dirpath={str(self.dirpath)!r}" if self.dirpath is not None else ""
        return f"CheckpointWindow(window={self.window}, storage={self.storage!r}{where}, steps={self.steps})"

    # -- snapshots --------------------------------------------------------------------------------

    def snapshot(self, source: StateSource, step: int | None = None, *, overlap: bool = False) -> bool:
        """Copy the current weights of a model (or a state dict) into the window.

        ``step`` defaults to one past the newest stored step and must increase. Returns ``False``
        and warns, leaving the window unchanged, when a tensor holds NaN or Inf. Raises
        ``ValueError`` naming the key when names, shapes or dtypes differ from the window's.

        CUDA tensors are copied asynchronously into pinned buffers, on a side stream: the call
        returns at once, and the NaN check is resolved when the copy has completed (a refused
        snapshot is then dropped with a warning). The next snapshot waits only if this copy is
        still running. Work queued later on the current stream runs after the copy, unless
        ``overlap=True``: then the forward and backward passes overlap the copy, and
        :meth:`before_update` must be called before the tensors change (the optimizer step).
        """
        tensors = state_tensors(source)
        if not tensors:
            raise ValueError("the snapshot holds no tensors")
        step = self._next_step(step)
        store = self._store
        created = store is None
        if store is None:
            store = self._store = self._new_store(self._plan(source, tensors), tensors)
            self._finite_steps = set()
        else:
            full = self.full_layout
            assert full is not None
            full.check(tensors, what=f"snapshot at step {step}")
        if self._spread is not None:
            synced = with_rank0_buffers(source, tensors, self.process_group)
            copy = store.stage(self._spread.local_views(synced))
            bad = _agreed(copy.verdict(), self.process_group)  # the ranks must keep the same steps
        else:
            copy = store.stage(tensors)
            if copy.in_flight and not created:
                # CUDA: the copy runs on a side stream; the verdict is read when it has completed.
                store.commit(step, copy)
                self._in_flight = copy
                if not overlap:
                    copy.order_before_update()
                return True
            bad = copy.verdict()
        if bad is None:
            store.commit(step)
            return True
        if created:
            store.close()
            self._store, self._spread, self._sharding = None, None, None  # a rejected first snapshot fixes nothing
        warn_rejected(step, bad)
        return False

    def discard_from(self, step: int) -> None:
        """Drop the snapshots taken at or after ``step``, for example those taken after training
        began to diverge (:class:`ckptavg.SpikeGuard` does this when it restores). In a
        multi-process window every rank calls it with the same step; no communication."""
        self.flush()
        self._finite_steps = {s for s in self._finite_steps if s < step}
        if self._store is not None:
            self._store.discard_from(step)

    def before_update(self) -> None:
        """After ``snapshot(..., overlap=True)`` of CUDA tensors: call before changing them in place
        (the optimizer step). The current CUDA stream then waits, on the device, until the
        snapshot's copy has read them; the host does not wait. A no-op otherwise."""
        if self._in_flight is not None:
            self._in_flight.order_before_update()
            self._in_flight = None

    def _next_step(self, step: int | None) -> int:
        steps = self.steps
        if step is None:
            return steps[-1] + 1 if steps else 0
        check_int(step, "step")
        if steps and step <= steps[-1]:
            raise ValueError(f"step {step} is not after the newest stored step {steps[-1]}; steps must increase")
        return step

    def _plan(self, source: StateSource, tensors: Mapping[str, Tensor]) -> Layout:
        """Decide, at the first snapshot, what this process stores: everything (one process, or
        replicas), its DTensor shards (FSDP2), or its slice of every tensor (spread DDP)."""
        full = Layout.from_tensors(tensors)
        if distributed_rank(self.process_group)[1] == 1:
            return full
        sharded = any(is_dtensor(t) for t in tensors.values())
        spread = self.spread if self.spread is not None else isinstance(source, nn.parallel.DistributedDataParallel)
        if spread and sharded:
            raise ValueError(
                "spread=True applies to replicated (DDP) models; this model's tensors are DTensor shards "
                "(FSDP2), which each rank already keeps apart"
            )
        return self._join_run(full, spread, shard_placements(tensors), "dtensor" if sharded else "replicated")

    def _join_run(self, full: Layout, spread: bool, placements: dict[str, Any], kind: str = "replicated") -> Layout:
        """Become this rank's part of a multi-process window over ``full``: its slice of every
        tensor (``spread``), or the tensors it holds, placed by ``placements``. Returns the layout
        this rank stores."""
        rank, world = distributed_rank(self.process_group)
        self._sharding = {"kind": kind, "rank": rank, "world_size": world, "placements": placements}
        self._ranks_merge_together = kind != "replicated" or spread
        if not spread:
            return full
        self._spread = Spread(full, rank, world, self.process_group)
        self._sharding.update(kind="spread", placements=self._spread.placements(), full_layout=full.to_json())
        return self._spread.local

    def _adopt_sharding(self, sharding: Mapping[str, Any] | None, in_run: bool = True) -> None:
        """Take over a stored window's sharding. A spread window gathers again only in a run of
        the same rank and world size; a rank folder opened directly is a window of its slices."""
        self._sharding = dict(sharding) if sharding is not None else None
        self._spread = None
        self._ranks_merge_together = False  # a rank folder opened on its own merges alone
        if in_run and sharding is not None and sharding.get("kind") != "replicated":
            rank, world = distributed_rank(self.process_group)
            if (rank, world) == (sharding["rank"], sharding["world_size"]):
                self._ranks_merge_together = True
                if sharding.get("kind") == "spread":
                    self._spread = Spread(Layout.from_json(sharding["full_layout"]), rank, world, self.process_group)

    def _files_dirpath(self) -> Path:
        assert self.dirpath is not None
        return rank_dirpath(self.dirpath, *distributed_rank(self.process_group))

    def _new_store(self, layout: Layout, tensors: Mapping[str, Tensor]) -> SnapshotStore:
        if self.dirpath is not None and (self._files_dirpath() / MANIFEST).exists():
            raise FileExistsError(
                f"{self._files_dirpath()} already holds a checkpoint window; reopen it with "
                f"CheckpointWindow.open({str(self.dirpath)!r}) or load_state_dict(...), or choose another dirpath"
            )
        pin = self.pin_memory
        if pin is None:
            pin = torch.cuda.is_available() and any(local_tensor(t).is_cuda for t in tensors.values())
        elif pin and not torch.cuda.is_available():
            warnings.warn(
                "pin_memory=True needs CUDA, which is not available: using pageable memory",
                CkptavgWarning,
                stacklevel=3,
            )
            pin = False
        if self.storage == "cpu":
            return CpuRing(layout, self.window, pin_memory=pin)
        if self._sharding is not None and self._sharding["rank"] == 0:
            assert self.dirpath is not None
            write_ranks_manifest(self.dirpath, self._sharding)
        return DiskStore(self._files_dirpath(), layout, self.window, pin_memory=pin, sharding=self._sharding)

    # -- merging ----------------------------------------------------------------------------------

    def weights(
        self,
        method: Method = "sma",
        alpha: float = DEFAULT_ALPHA,
        *,
        before: int | None = None,
        evaluate: Evaluate | None = None,
        **options: Any,
    ) -> list[float]:
        """The coefficient vector of ``method`` over the held snapshots, oldest first; sums to 1.

        ``method`` is a registered method's name (:func:`ckptavg.methods.method_names`: ``"sma"``,
        ``"wma"``, ``"ema"`` with ``alpha``, ``"decay"`` with ``shape``, ...), its ``options`` by
        name, or a list of weights. With ``before``, only snapshots taken at steps ``< before``
        are merged (the others get coefficient 0): for example the stable point before a loss
        spike. An explicit weight list then gives one weight per selected snapshot. Methods that
        choose on held-out data (``"greedy_soup"``) need ``evaluate`` (see :meth:`select`)."""
        self.flush()  # a snapshot still being copied or written counts only once it is kept
        steps = self.steps
        selected = steps if before is None else [s for s in steps if s < before]
        if before is not None and not selected:
            raise ValueError(f"no snapshot was taken before step {before} (held: {steps})")
        excluded = [0.0] * (len(steps) - len(selected))

        def score(weights: Sequence[float]) -> float:
            assert evaluate is not None
            return float(evaluate(self.merge(list(weights) + excluded)))

        return (
            coefficients(method, selected, alpha, score=score if evaluate is not None else None, **options) + excluded
        )

    def select(
        self, evaluate: Evaluate, candidates: Mapping[str, Any] | None = None
    ) -> tuple[list[float], list[dict[str, Any]]]:
        """Deprecated: ``ckptavg.select(window, evaluate, candidates)`` (:func:`ckptavg.selection.select`)."""
        warnings.warn(
            "CheckpointWindow.select is deprecated: use ckptavg.select(window, evaluate, candidates)",
            DeprecationWarning,
            stacklevel=2,
        )
        from .selection import select  # the deprecated spelling only: the window depends on nothing above it

        return select(self, evaluate, candidates)

    def correlation(self) -> Correlation:
        """Whether averaging is safe for the held snapshots: weight and deviation cosines, the
        cosine of consecutive updates, per tensor and over the model, and a verdict (see
        :mod:`ckptavg.diagnostics`). Streamed block by block; never a model per snapshot."""
        if self.sharding is not None:
            raise ValueError(
                "correlation needs whole snapshots: this window holds one rank's part; run it offline on each rank folder"
            )
        if self._store is None or not len(self):
            raise ValueError("the correlation of an empty window: take at least one snapshot first")
        return correlation_of(self.steps, self._store.iter_blocks())

    def ensemble(self, model: nn.Module, average: Literal["logits", "probs"] = "logits") -> nn.Module:
        """Deprecated: ``ckptavg.Ensemble.from_window(window, model, average)``."""
        warnings.warn(
            "CheckpointWindow.ensemble is deprecated: use ckptavg.Ensemble.from_window(window, model, average)",
            DeprecationWarning,
            stacklevel=2,
        )
        from .ensembles import Ensemble  # the deprecated spelling only

        return Ensemble.from_window(self, model, average)

    def learn_weights(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        batches: Iterable[Any],
        *,
        steps: int = 100,
        lr: float = 0.05,
        init: Method = "sma",
    ) -> list[float]:
        """Deprecated: ``ckptavg.learn_weights(window, model, loss_fn, batches, ...)``."""
        warnings.warn(
            "CheckpointWindow.learn_weights is deprecated: use ckptavg.learn_weights(window, model, loss_fn, batches, ...)",
            DeprecationWarning,
            stacklevel=2,
        )
        from .learning import learn_weights  # the deprecated spelling only

        return learn_weights(self, model, loss_fn, batches, steps=steps, lr=lr, init=init)

    def merge(
        self,
        method: Method = "sma",
        alpha: float = DEFAULT_ALPHA,
        *,
        before: int | None = None,
        out: Mapping[str, Tensor] | None = None,
        **options: Any,
    ) -> dict[str, Tensor]:
        """The merged state dict, in the stored dtypes.

        ``method`` and its ``options`` choose the coefficients (see :meth:`weights`; for example
        ``merge("decay", shape="1-sqrt")``), or a list of weights, one per snapshot, oldest first
        (scaled to sum to 1); ``before`` merges only older snapshots. The result is fresh CPU tensors, or is written into ``out`` (for example
        the result of an earlier merge) to reuse its memory.
        """
        return self._merge_with(self._chooser(method, alpha, before, options), out)

    def _chooser(
        self, method: Method, alpha: float, before: int | None, options: Mapping[str, Any]
    ) -> Callable[[], list[float]]:
        """The coefficient vector of a merge over the snapshots held when it is called (checked now;
        a merge that drops a non-finite snapshot asks again): a method's, recomputed; explicit
        weights, each kept with its snapshot and scaled back to their sum."""
        first = self.weights(method, alpha, before=before, **options)
        by_step = dict(zip(self.steps, first, strict=True))
        total = math.fsum(first)

        def again() -> list[float]:
            if isinstance(method, str | MergeSpec):
                return self.weights(method, alpha, before=before, **options)
            weights = [by_step.get(s, 0.0) for s in self.steps]
            left = math.fsum(weights)
            return [w * total / left for w in weights] if abs(left) > 1e-12 else [0.0] * len(weights)

        pending = [first]
        return lambda: pending.pop() if pending else again()

    def _merge_with(
        self, choose: Callable[[], list[float]], out: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """:meth:`merge` with the coefficients given by ``choose`` (see :meth:`_chooser`)."""
        assert self._store is not None and self.full_layout is not None
        if out is not None:
            self.full_layout.check(out, what="out")
            for name, t in out.items():
                if t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(f"out[{name!r}] must be a contiguous CPU tensor")

        def attempt(weights: list[float]) -> dict[str, Tensor]:
            if self._spread is None:
                return self._merge_local(weights, out)
            gathered = self._spread.full_views(self._gathered(weights))
            if out is None:
                return {name: t.to("cpu", copy=True) for name, t in gathered.items()}
            copy_into(out, gathered)
            return dict(out)

        merged, weights = self._finite_merge(choose, attempt)
        if out is None and any(w < 0 for w in weights):
            _check_finite(merged, weights)
        return merged

    def _merge_local(self, weights: list[float], out: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """This process's stored part, merged; :class:`_NonFinite` names the snapshots that made it
        NaN or Inf (in a multi-process window, as every rank found them: a collective)."""
        assert self._store is not None
        found: dict[int, str] = {}
        merged: dict[str, Tensor] = {}
        try:
            merged = self._store.merge(weights, out) if out is None or out else {}  # {}: a rank holding no slice
        except NonFiniteBlock as err:
            found = self._store.non_finite(weights, err.dtype, err.block)
            if not found:  # every row finite: the sum itself overflowed (an extrapolation)
                found = {OVERFLOW: err.block.pieces[0].name}
        if self._ranks_merge_together:  # each rank merged its own part: all drop the same snapshots
            found = _agreed_culprits(found, len(weights), self.process_group)
        if found:
            raise _NonFinite(found)
        return merged

    def _finite_merge(
        self, choose: Callable[[], list[float]], attempt: Callable[[list[float]], _T]
    ) -> tuple[_T, list[float]]:
        """``attempt(choose())``; when the merge meets NaN or Inf, drop the snapshots that hold it
        (a warning names their steps) and merge again with the coefficients ``choose`` gives over
        the snapshots left. Returns the result and the coefficients it used."""
        weights = choose()
        while True:
            try:
                result = attempt(weights)
            except _NonFinite as err:
                dropped = self._drop_non_finite(weights, err.found)
                try:
                    weights = choose()
                except ValueError:  # an empty window, or none left before=
                    weights = []
                if not any(w != 0.0 for w in weights):
                    raise ValueError(
                        f"snapshots of this merge hold NaN or Inf: {dropped}; they were dropped from the window and no "
                        "finite snapshot with a non-zero coefficient is left; nothing was written"
                    ) from None
                warnings.warn(
                    f"snapshots hold NaN or Inf: {dropped}; dropped from the window, merging the {len(self)} left",
                    CkptavgWarning,
                    stacklevel=5,
                )
                continue
            self._finite_steps.update(s for s, w in zip(self.steps, weights, strict=True) if w != 0.0)
            return result, weights

    def _drop_non_finite(self, weights: list[float], found: Mapping[int, str]) -> str:
        """Drop the snapshots a merge found NaN or Inf in; describe them (steps and tensors)."""
        assert self._store is not None
        if OVERFLOW in found:
            name = found[OVERFLOW]
            where = f"{self._store.layout.entries[name].dtype} in tensor {name!r}" if name != OTHER_RANK else name
            raise _overflow(weights, where)
        steps = self.steps
        bad = sorted(found)
        self._store.drop(bad)
        return ", ".join(
            f"step {steps[i]} ({found[i] if found[i] == OTHER_RANK else 'tensor ' + repr(found[i])})" for i in bad
        )

    def _gathered(self, weights: list[float]) -> dict[torch.dtype, Tensor]:
        """Spread window: merge this rank's slices, then gather every rank's (collective)."""
        assert self._spread is not None and self._store is not None
        flats, views = self._spread.local_outputs()
        self._merge_local(weights, views)  # every rank, even one holding no slice: the NaN verdict is agreed
        return self._spread.gather(flats)

    def load_into(
        self,
        model: nn.Module,
        method: Method = "sma",
        alpha: float = DEFAULT_ALPHA,
        *,
        before: int | None = None,
        **options: Any,
    ) -> None:
        """Write the merged weights into ``model`` in place (on its devices, in its dtypes).

        Checked before anything is written: on a mismatch or an unreadable snapshot the model is
        left as it was."""
        choose = self._chooser(method, alpha, before, options)
        self._load_with(self._targets(model), choose)

    def _load_with(
        self, targets: Mapping[str, Tensor], choose: Callable[[], list[float]], backed_up: bool = False
    ) -> None:
        """:meth:`load_into` the model tensors ``targets`` with the coefficients ``choose`` gives
        (``backed_up``: ``swapped`` puts them back whatever happens, so a merge that fails half way
        may write into them)."""
        store = self._store
        assert store is not None  # _targets raised otherwise

        def attempt(weights: list[float]) -> dict[str, Tensor] | None:
            if self._spread is not None:
                return self._spread.full_views(self._gathered(weights))
            in_place = (
                isinstance(store, CpuRing)
                and _writable_in_place(targets, store.layout)
                and not any(w < 0 for w in weights)  # a convex combination of finite values stays finite
                and (
                    backed_up
                    or all(s in self._finite_steps for s, w in zip(self.steps, weights, strict=True) if w != 0.0)
                )
            )  # a snapshot no merge has read yet may hold NaN: load_into merges it where the model cannot see it
            if in_place:
                self._merge_local(weights, targets)  # proven finite: cannot fail past this point, no I/O
                return None
            return self._merge_local(weights, store.scratch())  # idle host memory: no allocation, no page faults

        merged, weights = self._finite_merge(choose, attempt)
        if merged is None:
            _forget_autocast_casts()
            return
        if any(w < 0 for w in weights):
            _check_finite(merged, weights)
        copy_into(targets, merged)

    def merged_model(
        self,
        model: nn.Module,
        method: Method = "sma",
        alpha: float = DEFAULT_ALPHA,
        *,
        before: int | None = None,
        **options: Any,
    ) -> nn.Module:
        """A copy of ``model`` that holds the merged weights, as a model of its own (``model``
        keeps its weights). For a LightningModule, pass the network inside it (``module.model``)
        and a window of that network's snapshots, or use ``swapped``."""
        twin = copy.deepcopy(model)
        self.load_into(twin, method, alpha, before=before, **options)
        return twin

    @contextmanager
    def swapped(
        self,
        model: nn.Module,
        method: Method = "sma",
        alpha: float = DEFAULT_ALPHA,
        *,
        before: int | None = None,
        **options: Any,
    ) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds the merged weights; afterwards, bit for bit, its own,
        also when the block (or the merge) raises."""
        choose = self._chooser(method, alpha, before, options)  # argument errors before any copy
        targets = self._targets(model)
        backup = self._backup_buffers(targets)
        try:
            copy_into(backup, targets)
            try:
                self._load_with(targets, choose, backed_up=True)
                yield model
            finally:
                copy_into(targets, backup)
        finally:
            if backup is self._swap_backup:
                self._swap_backup_in_use = False

    def _backup_buffers(self, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Host buffers for ``swapped``'s copy of the model's own weights: allocated once and reused
        by every later swap of the same tensors (a preview at every validation pays no allocation
        or page faults); a nested swap gets its own."""
        pinned = {
            name: t.is_cuda and torch.cuda.is_available() for name, t in targets.items()
        }  # fast copies back to the GPU

        def allocate() -> dict[str, Tensor]:
            return {n: torch.empty_like(t, device="cpu", pin_memory=pinned[n]) for n, t in targets.items()}

        if self._swap_backup_in_use:
            return allocate()
        kept = self._swap_backup
        if (
            kept is None
            or kept.keys() != targets.keys()
            or any(
                kept[n].shape != t.shape or kept[n].dtype != t.dtype or kept[n].is_pinned() != pinned[n]
                for n, t in targets.items()
            )
        ):
            kept = self._swap_backup = allocate()
        self._swap_backup_in_use = True
        return kept

    def _targets(self, model: nn.Module) -> dict[str, Tensor]:
        if self._store is None or self.full_layout is None:
            raise ValueError("cannot merge an empty window: take at least one snapshot first")
        shapes = {e.name: torch.empty(e.shape, device="meta") for e in self.full_layout}
        return model_targets(model, shapes)

    # -- persistence ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every snapshot is stored (disk: written and renamed into place)."""
        if self._store is not None:
            self._store.flush()

    def close(self) -> None:
        """Finish pending writes and stop the writer thread."""
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> CheckpointWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify(self) -> list[str]:
        """Disk windows: read every file, drop (and name, in a warning) those that are unusable."""
        return self._store.verify() if self._store is not None else []

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the window: the snapshots themselves for ``storage="cpu"``,
        the folder and the steps for ``storage="disk"``. Loadable with ``torch.load(weights_only=True)``."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "window": self.window,
            "storage": self.storage,
            "layout": None if self._store is None else self._store.layout.to_json(),
            "steps": [],
        }
        if self.dirpath is not None:
            state["dirpath"] = str(self.dirpath)
        if self._sharding is not None:
            state["sharding"] = self._sharding
        if self._store is not None:
            state.update(self._store.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the window from :meth:`state_dict` (for example when a run resumes).

        A disk window reopens the files in its own ``dirpath`` and returns them to the recorded
        window: snapshots taken after the checkpoint are dropped (refused when the folder's run
        finished, see :meth:`finish`). When the state was saved by a window in another folder (a
        fork, or a run resumed into a new log dir), this window starts its own folder from hard
        links to the snapshots the state lists (copies across file systems); the other folder is
        only read, and may still be written by its own run."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a CheckpointWindow state dict (its 'format' entry is missing or different)")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"CheckpointWindow state version {state.get('version')!r} is not supported")
        if state.get("storage") != self.storage:
            raise ValueError(
                f"the state holds a {state.get('storage')!r} window; this window stores on {self.storage!r}"
            )
        rank, world = distributed_rank(self.process_group)
        sharding = state.get("sharding")
        whole = self.storage == "cpu" and (sharding is None or sharding["kind"] == "replicated")  # portable
        if sharding is not None and not whole and (sharding["rank"], sharding["world_size"]) != (rank, world):
            raise ValueError(
                f"the state holds the part of rank {sharding['rank']} of {sharding['world_size']} of a multi-process "
                f"window; this process is rank {rank} of {world} (resume with the same number of processes; combine "
                "a spread window's states with CheckpointWindow.combine_states, or merge a disk window offline with "
                "ckptavg.consolidate)"
            )
        layout = _checked_state_layout(state)  # the whole state is checked before anything changes or is allocated
        self._finite_steps = set()
        if self._store is not None:
            self._store.close()
            self._store = None
        self._adopt_sharding(None if whole else sharding)
        if layout is None:
            return
        if whole and world > 1:
            # A whole window (saved by one process, a replica, or combined) joins this multi-process run.
            shapes = {e.name: torch.empty(e.shape, device="meta") for e in layout}
            layout = self._join_run(layout, bool(self.spread), replicated_placements(shapes))
            if self._spread is not None:
                state = self._spread.local_state(state)
        if self.storage == "cpu":
            store: SnapshotStore = CpuRing(layout, self.window, pin_memory=bool(self.pin_memory))
            store.load_state_dict(state)
        else:
            store = self._reopen(state, layout)
        self._store = store

    def _reopen(self, state: Mapping[str, Any], layout: Layout) -> DiskStore:
        """The disk store of a loaded state: the files in this window's own folder, returned to the
        state's steps; or, when the state's files live in another folder (a fork, or a resume into a
        new log dir), a new window here that links the snapshots it inherits from that folder."""
        target = self._files_dirpath()
        recorded = state.get("dirpath")  # the folder of the files themselves (a rank's own, in a multi-process run)
        source = Path(recorded) if recorded is not None else target
        if _same_folder(source, target):
            store = DiskStore.open(target, capacity=self.window)
            if store.layout != layout:
                store.close()
                raise ValueError(f"the files in {store.dirpath} hold a different layout from the checkpoint's window")
            try:
                store.load_state_dict(state)
            except BaseException:
                store.close()
                raise
            return store
        store = DiskStore.inherit(
            source,
            target,
            list(state["steps"]),
            layout,
            self.window,
            pin_memory=bool(self.pin_memory),
            sharding=self._sharding,
        )
        if self._sharding is not None and self._sharding["rank"] == 0:
            assert self.dirpath is not None
            write_ranks_manifest(self.dirpath, self._sharding)
        return store

    def finish(self, step: int | None = None) -> None:
        """Record that the run completed (disk windows; default: at the newest snapshot's step). A
        later resume in this folder from an earlier state, which would delete the snapshots kept
        after it, is then refused: a fork of a finished run needs its own ``dirpath``."""
        if self._store is not None:
            steps = self._store.steps
            self._store.finish(step if step is not None else (steps[-1] if steps else 0))

    @staticmethod
    def combine_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One whole-window state from the :meth:`state_dict` of every rank (in rank order) of a
        spread cpu window: loadable in a single process, or by a run of any number of processes
        (which spreads it again)."""
        states = list(states)
        shardings = [s.get("sharding") or {} for s in states]
        if not states or any(
            sh.get("kind") != "spread" or s.get("storage") != "cpu" for s, sh in zip(states, shardings, strict=True)
        ):
            raise ValueError("combine_states takes the state of every rank of a spread cpu window")
        if [sh["rank"] for sh in shardings] != list(range(len(states))) or {sh["world_size"] for sh in shardings} != {
            len(states)
        }:
            raise ValueError(
                f"combine_states needs one state per rank, in rank order; got ranks {[sh['rank'] for sh in shardings]} "
                f"of world sizes {sorted({sh['world_size'] for sh in shardings})}"
            )
        if any(list(s["steps"]) != list(states[0]["steps"]) for s in states):
            raise ValueError(f"the ranks' windows hold different steps: {[list(s['steps']) for s in states]}")
        full = Layout.from_json(shardings[0]["full_layout"])
        snapshots = {}
        for dtype, numel in full.group_numel.items():
            code = dtype_code(dtype)
            # Rank r holds elements [r * chunk, ...) of each group: its rows continue rank r - 1's.
            rows = torch.cat([s["snapshots"][code] for s in states if code in s["snapshots"]], dim=1)
            if rows.shape[1] != numel:
                raise ValueError(f"the ranks' {code} slices hold {rows.shape[1]} elements; the full layout has {numel}")
            snapshots[code] = rows
        return {
            **{k: v for k, v in states[0].items() if k != "sharding"},
            "layout": full.to_json(),
            "snapshots": snapshots,
        }


def _checked_state_layout(state: Mapping[str, Any]) -> Layout | None:
    """The layout of a window state (``None`` for an empty window), once every field of the state
    is known to be consistent: a tampered or truncated state is a ``ValueError`` naming the field,
    raised before anything is allocated."""
    if "layout" not in state or "steps" not in state:
        raise ValueError(f"the CheckpointWindow state lacks {sorted({'layout', 'steps'} - set(state))}")
    steps = state["steps"]
    if not isinstance(steps, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps
    ):
        raise ValueError(
            f"the CheckpointWindow state's field 'steps' must be a list of non-negative integers, got {steps!r}"
        )
    if list(steps) != sorted(set(steps)):
        raise ValueError(f"the CheckpointWindow state's field 'steps' must increase, got {list(steps)}")
    if state["layout"] is None:
        if steps:
            raise ValueError("the CheckpointWindow state lists steps but no layout")
        return None
    try:
        layout = Layout.from_json(state["layout"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"the CheckpointWindow state's field 'layout' is malformed: {err}") from None
    if state.get("storage") == "cpu" and steps and "snapshots" not in state:
        raise ValueError("the CheckpointWindow state lacks ['snapshots'] (a cpu window's stored tensors)")
    if state.get("storage") == "cpu" and "snapshots" in state:
        snapshots = state["snapshots"]
        if not isinstance(snapshots, Mapping):
            raise ValueError("the CheckpointWindow state's field 'snapshots' must map dtype names to tensors")
        expected = {dtype_code(d): n for d, n in layout.group_numel.items()}
        if sorted(snapshots) != sorted(expected):
            raise ValueError(
                f"the CheckpointWindow state's field 'snapshots' holds groups {sorted(snapshots)}; its layout has {sorted(expected)}"
            )
        for code, rows in snapshots.items():
            if not isinstance(rows, Tensor) or tuple(rows.shape) != (len(steps), expected[code]):
                shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
                raise ValueError(
                    f"the CheckpointWindow state's field 'snapshots[{code!r}]' is {shape}; its layout and steps make "
                    f"({len(steps)}, {expected[code]})"
                )
    return layout


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return a.resolve() == b.resolve()


def _check_finite(merged: Mapping[str, Tensor], weights: list[float]) -> None:
    """An extrapolation (a negative weight) can leave a dtype's range: refuse it, naming the tensor,
    before it reaches a model."""
    for name, tensor in merged.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise _overflow(weights, f"{tensor.dtype} in tensor {name!r}")


def _overflow(weights: list[float], where: str) -> ValueError:
    return ValueError(
        f"the merge with weights {weights} overflows {where} (an extrapolation past the dtype's range); nothing was "
        "written. Use weights closer to a convex combination"
    )


OVERFLOW = -1  # in a _NonFinite's findings: no snapshot holds NaN or Inf, the weighted sum overflowed


class _NonFinite(Exception):
    """A merge met NaN or Inf: ``found`` maps each responsible snapshot (by index) to a tensor
    name, or :data:`OVERFLOW` to the tensor whose sum overflowed."""

    def __init__(self, found: dict[int, str]):
        super().__init__(f"non-finite snapshots: {found}")
        self.found = found


def _agreed_culprits(found: dict[int, str], held: int, group: Any) -> dict[int, str]:
    """Every rank's findings on a merge of its part (collective): all ranks drop the same snapshots."""
    flags = [int(i in found) for i in range(held)] + [int(OVERFLOW in found)]
    agreed = all_ranks_max_each(flags, group)
    keys = list(range(held)) + [OVERFLOW]
    return {key: found.get(key, OTHER_RANK) for key, flag in zip(keys, agreed, strict=True) if flag}


def _agreed(bad: str | None, group: Any) -> str | None:
    """Every rank's NaN verdict on a spread snapshot: all ranks keep it, or none does."""
    if all_ranks_max(0 if bad is None else 1, group) and bad is None:
        return OTHER_RANK
    return bad


def _writable_in_place(targets: Mapping[str, Tensor], layout: Layout) -> bool:
    """Whether the merge kernel can write straight into the model's own tensors."""
    return all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype == layout.entries[name].dtype
        for name, t in targets.items()
    )


def model_targets(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's own tensors (local shards) for every name in ``tensors``, after checking that
    the names and shapes match exactly, so that a write either happens in full or not at all."""
    params = state_tensors(model, keep_vars=True)
    for name in tensors:
        if name not in params:
            raise ValueError(f"the model has no tensor named {name!r}")
    for name, target in params.items():
        if name not in tensors:
            raise ValueError(f"the merged weights have no tensor for the model's {name!r}")
        shape = tuple(local_tensor(target).shape)
        if shape != tuple(tensors[name].shape):
            raise ValueError(f"key {name!r}: the model holds shape {shape}, the merge {tuple(tensors[name].shape)}")
    return {name: local_tensor(t) for name, t in params.items()}


@torch.no_grad()
def copy_into(targets: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    """``targets[n].copy_(values[n])`` for every name: one fused copy for same-device pairs."""
    same = [n for n in targets if targets[n].device == values[n].device]
    if same:
        torch._foreach_copy_([targets[n] for n in same], [values[n] for n in same])
    for name in targets.keys() - set(same):
        targets[name].copy_(values[name])  # host <-> device; blocking, so the source may be freed
    _forget_autocast_casts()


def _forget_autocast_casts() -> None:
    """Inside ``torch.autocast``, the low-precision copies of the weights are cached until the
    region ends: weights written in place would be ignored by the next forward without this."""
    if torch.is_autocast_cache_enabled():
        torch.clear_autocast_cache()


def load_state(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` into ``model``'s parameters and buffers in place, matched by name (all
    names and shapes are checked before anything is written)."""
    copy_into(model_targets(model, tensors), tensors)
