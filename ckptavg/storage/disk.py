"""The disk tier: one safetensors file per snapshot, written in a background thread, listed by a
manifest that is rewritten atomically after each file (the format: :mod:`.manifest`)."""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import check_int
from ..files import (
    TMP_SUFFIX,
    CkptavgWarning,
    CorruptSnapshotError,
    FolderLock,
    SnapshotReader,
    atomic_write_json,
    check_against_file,
    link_or_copy,
    read_json,
    snapshot_metadata,
    write_snapshot,
)
from ..kernels import PendingCopy, copy_snapshot, merge_blocks, non_finite_tensor
from ..layout import Block, Layout
from .manifest import (
    _SNAPSHOT_FILE,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    RANKS_FORMAT,
    check_record,
    snapshot_filename,
    wanted_records,
)
from .protocol import warn_rejected

PROGRESS_BYTES = 2 << 30  # a disk merge reading this much shows a progress bar (on a terminal)


def progress_bar(total: float, description: str, quiet: bool = False) -> Any:
    """A tqdm bar counting bytes, shown on a terminal only (and not with ``quiet``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        leave=False,
        disable=True if quiet else None,
    )


class DiskStore:
    """``capacity`` snapshots as safetensors files in ``dirpath``, indexed by ``manifest.json``.

    ``put`` copies the snapshot into a host staging buffer and returns; a background thread writes
    the file (temporary name, fsync, rename), then the manifest the same way, then deletes the
    evicted file. A crash at any instant leaves a manifest that lists only complete files. The
    staging buffer is reused, so a ``put`` waits only if the previous write is still running.

    A merge streams every file block by block through a reused buffer (peak extra memory: the
    merged result plus a few blocks), verifying each file's size, header and checksums on the way.
    A file that fails is moved aside as ``*.corrupt`` and dropped from the window, and the error
    names it; the remaining snapshots stay usable.

    A folder has one writer, enforced by :class:`ckptavg.files.FolderLock` (released when the
    store closes or its process ends). A ``readonly`` store takes no lock and never changes the
    folder: it merges and verifies what the last committed manifest lists, also while a writer runs.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        layout: Layout,
        capacity: int,
        pin_memory: bool = False,
        sharding: dict[str, Any] | None = None,
        readonly: bool = False,
    ):
        self.dirpath = Path(dirpath)
        self.readonly = readonly
        self.layout = layout
        self.capacity = capacity
        self.sharding = sharding  # rank, world size and placements of a multi-process window
        self._pin_memory = pin_memory
        self._records: list[dict[str, Any]] = []  # committed snapshots, oldest -> newest
        self._verified: set[tuple[str, torch.dtype]] = set()  # (file, group) whose checksum held
        self._staging: dict[torch.dtype, Tensor] | None = None
        self._staging_views: dict[str, Tensor] = {}
        self._pending: tuple[Future[dict[str, Any] | str], int] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = FolderLock(self.dirpath)
        self._pinned: dict[str, int] = {}  # a reader's descriptors of the files it lists
        self.finished_at: int | None = None  # set by finish(): the run that wrote the folder completed
        if not readonly:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()

    # -- opening ----------------------------------------------------------------------------------

    @staticmethod
    def read_manifest(dirpath: str | os.PathLike[str]) -> dict[str, Any]:
        manifest = DiskStore._parse_manifest(dirpath)
        if manifest.get("format") == RANKS_FORMAT:
            raise ValueError(
                f"{dirpath} holds the folders of a {manifest.get('world_size')}-process window: reopen it inside that "
                "run, open one rank's folder, or merge them all with ckptavg.consolidate"
            )
        return manifest

    @staticmethod
    def _parse_manifest(dirpath: str | os.PathLike[str]) -> dict[str, Any]:
        path = Path(dirpath) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no ckptavg window in {dirpath}: {path} does not exist")
        try:
            manifest = read_json(path)
            if manifest.get("format") == RANKS_FORMAT:
                return manifest  # raised below, outside the "malformed" wording
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            if manifest.get("version") != MANIFEST_VERSION:
                raise ValueError(f"version {manifest.get('version')!r} is not supported (expected {MANIFEST_VERSION})")
            if not isinstance(manifest.get("snapshots"), list):
                raise ValueError("field 'snapshots' must be a list")
            for i, record in enumerate(manifest["snapshots"]):
                check_record(record, i)
            steps = [record["step"] for record in manifest["snapshots"]]
            if steps != sorted(set(steps)):
                raise ValueError(f"field 'snapshots': steps must increase, got {steps}")
            window = manifest.get("window")
            check_int(window, "field 'window'", minimum=1)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"manifest {path} is malformed: {err}") from err
        return manifest

    @classmethod
    def open(
        cls,
        dirpath: str | os.PathLike[str],
        capacity: int | None = None,
        pin_memory: bool = False,
        *,
        readonly: bool = False,
        evict: bool = False,
    ) -> DiskStore:
        """Reopen a window written earlier (by this process or one that crashed).

        A writer (the default) takes the folder's lock and removes what a crashed writer left
        behind. A ``capacity`` smaller than the snapshots held raises, naming them, unless
        ``evict`` allows deleting the oldest. ``readonly`` changes nothing and takes no lock."""
        check_int(capacity, "window", minimum=1, optional=True)
        manifest = cls.read_manifest(dirpath)
        try:
            layout = Layout.from_json(manifest["layout"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"manifest {Path(dirpath) / MANIFEST} is malformed: field 'layout': {err}") from None
        records = list(manifest["snapshots"])
        capacity = capacity if capacity is not None else int(manifest["window"])
        if len(records) > capacity and not (evict or readonly):
            raise ValueError(
                f"{dirpath} holds {len(records)} snapshots (steps {[int(r['step']) for r in records]}); a window of "
                f"{capacity} would delete the oldest {len(records) - capacity}. Pass evict=True to delete them, or "
                "readonly=True to merge the newest without changing the folder"
            )
        try:
            store = cls(dirpath, layout, capacity, pin_memory, manifest.get("sharding"), readonly=readonly)
        except OSError as err:
            if readonly or err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # A downloaded or archived copy, a read-only mount: there is nothing to clean up or lock.
            warnings.warn(
                f"{dirpath} is not writable ({err.strerror}): opened readonly; merge and verify work, snapshots are refused",
                CkptavgWarning,
                stacklevel=3,
            )
            return cls.open(dirpath, capacity, pin_memory, readonly=True)
        try:
            if readonly:
                store._pin(records[-capacity:])
            store._check_files(manifest["snapshots"] if not readonly else store._records)
        except BaseException:
            store.close()
            raise
        store.finished_at = manifest.get("finished_at") if isinstance(manifest.get("finished_at"), int) else None
        if readonly:
            return store
        store._records = records
        store._remove_leftovers()
        if len(store._records) > store.capacity:
            store._replace_records(store._records[-store.capacity :])
        return store

    @classmethod
    def inherit(
        cls,
        source: str | os.PathLike[str],
        target: str | os.PathLike[str],
        steps: list[int],
        layout: Layout,
        capacity: int,
        pin_memory: bool = False,
        sharding: dict[str, Any] | None = None,
    ) -> DiskStore:
        """A new window in ``target`` that starts with the snapshots of ``steps`` held by the window
        in ``source`` (a run resumed or forked from a checkpoint of another folder). ``source`` is
        only read, as by a ``readonly`` reader: it may belong to a run that is still writing. Each
        file is hard-linked (no space used; files are never changed in place, so the two windows
        cannot disturb each other) or, across file systems, copied. Snapshots that are gone
        (evicted since, or a folder deleted or not copied along with the checkpoint) are reported,
        and the window goes on without them."""
        target = Path(target)
        if (target / MANIFEST).exists():
            raise FileExistsError(
                f"{target} already holds a checkpoint window, so it cannot start from the snapshots of {source}. "
                "Choose another dirpath for this run, or remove that folder"
            )
        reader = cls.open(source, readonly=True) if (Path(source) / MANIFEST).is_file() else None
        try:
            if reader is not None and reader.layout != layout:
                raise ValueError(f"the files in {source} hold a different layout from the checkpoint's window")
            records = wanted_records(reader, steps, source)[-capacity:]
            store = cls(target, layout, capacity, pin_memory, sharding)
            try:
                store._remove_leftovers()  # of an earlier attempt that crashed: the folder had no manifest
                for record in records:
                    assert reader is not None
                    link_or_copy(
                        reader.dirpath / record["file"], reader._pinned[record["file"]], target / record["file"]
                    )
                store._replace_records(records)
            except BaseException:
                store.close()
                raise
        finally:
            if reader is not None:
                reader.close()
        return store

    def _pin(self, records: list[dict[str, Any]], attempts: int = 5) -> None:
        """A reader opens every listed file at once: its view is the manifest it read, even when the
        writer evicts (deletes) files meanwhile. A file evicted between reading the manifest and
        opening it means a newer manifest is committed: read that one."""
        for _ in range(attempts):
            pinned: dict[str, int] = {}
            try:
                for record in records:
                    pinned[record["file"]] = os.open(
                        self.dirpath / record["file"], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                    )
            except FileNotFoundError:
                for fd in pinned.values():
                    os.close(fd)
                records = list(self.read_manifest(self.dirpath)["snapshots"])[-self.capacity :]
                continue
            self._records, self._pinned = records, pinned
            return
        missing = next(r["file"] for r in records if not (self.dirpath / r["file"]).exists())
        raise CorruptSnapshotError(self.dirpath / missing, f"listed by the manifest but missing ({attempts} attempts)")

    def _check_files(self, records: list[dict[str, Any]]) -> None:
        """Every listed file's own header must describe the manifest's layout (see
        :func:`ckptavg.files.check_against_file`); raises ``ValueError`` naming the manifest."""
        manifest = self.dirpath / MANIFEST
        for i, record in enumerate(records):
            try:
                check_against_file(
                    self.dirpath / record["file"],
                    self._pinned.get(record["file"]),
                    self.layout,
                    record,
                    f"snapshots[{i}]",
                )
            except ValueError as err:
                raise ValueError(f"manifest {manifest} is malformed: {err}") from None

    def _reader(self, record: dict[str, Any]) -> SnapshotReader:
        return SnapshotReader(
            self.dirpath / record["file"], self.layout, record, pinned=self._pinned.get(record["file"])
        )

    def _remove_leftovers(self) -> None:
        """Delete what a crashed writer of this folder left behind (the lock proves none is
        running): its temporary files, and snapshot files the manifest does not list. Only
        ckptavg's own names are touched; links are removed, never followed."""
        listed = {r["file"] for r in self._records}
        for path in self.dirpath.iterdir():
            name = path.name
            ours = name.endswith(TMP_SUFFIX) and (
                name == MANIFEST + TMP_SUFFIX or _SNAPSHOT_FILE.match(name[: -len(TMP_SUFFIX)])
            )
            if ours or (_SNAPSHOT_FILE.match(name) and name not in listed):
                path.unlink(missing_ok=True)

    # -- writing ----------------------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        steps = [int(r["step"]) for r in self._records]
        if self._pending is not None:
            steps.append(self._pending[1])
        return steps[-self.capacity :]

    def __len__(self) -> int:
        return len(self.steps)

    def _check_writable(self, action: str) -> None:
        if self.readonly:
            raise ValueError(
                f"cannot {action}: {self.dirpath} was opened readonly (CheckpointWindow.open(..., readonly=True)); "
                "only its writer changes it"
            )
        if not self._lock.held:
            self._lock.acquire()  # writing again after close(): the folder must still be ours alone

    def stage(self, tensors: Mapping[str, Tensor]) -> PendingCopy:
        """Copy a snapshot into the staging buffer (see :func:`copy_snapshot`). Nothing is written
        until :meth:`commit`. Waits only if the previous write still uses the buffer."""
        self._check_writable("take a snapshot")
        self.flush()
        staging, views = self._staging_buffers()
        return copy_snapshot(self.layout, tensors, staging, views)

    def commit(self, step: int, copy: PendingCopy | None = None) -> None:
        """Write the staged snapshot in the background (see :meth:`flush`); with a copy still in
        flight, the writer waits for it and drops the snapshot if it is not finite."""
        assert self._staging is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptavg-writer")
        future = self._executor.submit(self._write, step, list(self._records), self._staging, copy)
        self._pending = (future, step)

    def _write(
        self, step: int, records: list[dict[str, Any]], staging: dict[torch.dtype, Tensor], copy: PendingCopy | None
    ) -> dict[str, Any] | str:
        """Writer thread: snapshot file, then manifest, then evictions. Returns the new record, or
        the name of a non-finite tensor (nothing written)."""
        bad = copy.verdict() if copy is not None else None
        if bad is not None:
            return bad
        name = snapshot_filename(step)
        record = write_snapshot(self.dirpath / name, self.layout, staging, snapshot_metadata(step))
        record.update(file=name, step=step)
        window = (records + [record])[-self.capacity :]
        try:
            self._write_manifest(window)
        except BaseException:
            (self.dirpath / name).unlink(
                missing_ok=True
            )  # never committed: leave no orphan (on a full disk, the space)
            raise
        for old in records[: len(records) + 1 - len(window)]:
            (self.dirpath / old["file"]).unlink(missing_ok=True)
        return record

    def flush(self) -> None:
        """Wait for the background write; raise if it failed (the window keeps what it had)."""
        if self._pending is None:
            return
        future, step = self._pending
        try:
            record = future.result()  # an interrupt (Ctrl-C) here leaves the write pending: the next flush keeps it
        except Exception as err:
            self._pending = None
            raise OSError(
                f"writing the snapshot of step {step} to {self.dirpath / snapshot_filename(step)} failed: {err}; "
                f"the window keeps its previous {len(self._records)} snapshots"
            ) from err
        self._pending = None
        if isinstance(record, str):
            warn_rejected(step, record)
            return
        self._records = (self._records + [record])[-self.capacity :]
        self._verified.update((record["file"], d) for d in self.layout.group_numel)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._lock.release()
            for fd in self._pinned.values():
                os.close(fd)
            self._pinned = {}

    def _write_manifest(self, records: list[dict[str, Any]], finished_at: int | None = None) -> None:
        """Commit ``records``. Any change but :meth:`finish` makes the folder a run in progress again."""
        atomic_write_json(
            self.dirpath / MANIFEST,
            {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "window": self.capacity,
                "layout": self.layout.to_json(),
                **({"sharding": self.sharding} if self.sharding is not None else {}),
                **({"finished_at": finished_at} if finished_at is not None else {}),
                "snapshots": records,
            },
        )
        self.finished_at = finished_at

    def finish(self, step: int) -> None:
        """Record that the run writing this folder completed at ``step``: a later resume in this
        folder from an earlier checkpoint (a fork) is refused instead of deleting what it kept."""
        self._check_writable("mark the window finished")
        self.flush()
        self._write_manifest(self._records, finished_at=step)

    def discard_from(self, step: int) -> None:
        """Drop the snapshots taken at or after ``step`` (always the newest): the manifest is
        committed first, then their files are deleted."""
        self._check_writable("discard snapshots")
        self.flush()
        kept = [r for r in self._records if int(r["step"]) < step]
        if len(kept) != len(self._records):
            self._replace_records(kept)

    def _replace_records(self, records: list[dict[str, Any]]) -> None:
        """Commit a new list of records (a subset of the current ones) and delete the rest."""
        dropped = [r for r in self._records if r not in records]
        self._write_manifest(records)
        self._records = list(records)
        for record in dropped:
            (self.dirpath / record["file"]).unlink(missing_ok=True)

    # -- merging ----------------------------------------------------------------------------------

    @contextmanager
    def _reading(
        self, records: list[dict[str, Any]]
    ) -> Iterator[Callable[[int, torch.dtype, int, int, Tensor], Tensor]]:
        """``read(i, dtype, lo, hi, out)``: elements ``[lo, hi)`` of group ``dtype`` of file
        ``records[i]``, each file opened once and its checksums verified on the first full pass.
        A damaged file is dropped from the window (``CorruptSnapshotError`` goes on); files read
        through without error count as verified."""
        readers: dict[int, SnapshotReader] = {}

        def read(i: int, dtype: torch.dtype, lo: int, hi: int, out: Tensor) -> Tensor:
            if i not in readers:
                readers[i] = self._reader(records[i])
            readers[i].verify = (records[i]["file"], dtype) not in self._verified
            return readers[i].read(dtype, lo, hi, out)

        try:
            yield read
        except CorruptSnapshotError as err:
            self._quarantine(Path(err.path).name)
            raise
        finally:
            for reader in readers.values():
                reader.close()
        for i, reader in readers.items():
            self._verified.update((records[i]["file"], d) for d in reader.verified_groups())

    def iter_blocks(self) -> Iterator[tuple[torch.dtype, Block, list[Tensor]]]:
        """Every block of every group, as one row per held snapshot (oldest first), read from the
        files block by block (one block per snapshot in memory), checksums verified as a merge
        does: a damaged file is dropped from the window and raises ``CorruptSnapshotError``."""
        self.flush()
        records = list(self._records)
        with self._reading(records) as read:
            for dtype, blocks in self.layout.blocks.items():
                size = min(self.layout.block_numel, self.layout.group_numel[dtype])
                buffers = [torch.empty(size, dtype=dtype) for _ in records]
                for block in blocks:
                    yield (
                        dtype,
                        block,
                        [read(i, dtype, block.lo, block.hi, b[: block.hi - block.lo]) for i, b in enumerate(buffers)],
                    )

    def scratch(self) -> dict[str, Tensor]:
        """A merge output to copy elsewhere at once, with no allocation after the first: views of
        the staging buffer (idle once written), valid until the next snapshot."""
        self.flush()
        return dict(self._staging_buffers()[1])

    def _staging_buffers(self) -> tuple[dict[torch.dtype, Tensor], dict[str, Tensor]]:
        """The staging buffer (allocated at first use) and each tensor's view of it (built once)."""
        if self._staging is None:
            self._staging = self.layout.new_buffers(pin_memory=self._pin_memory)
            self._staging_views = self.layout.views(self._staging)
        return self._staging, self._staging_views

    def merge(self, coefficients: list[float], out: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.flush()
        records = list(self._records)
        buffers = {d: torch.empty(min(self.layout.block_numel, n), dtype=d) for d, n in self.layout.group_numel.items()}
        live = [(i, c) for i, c in enumerate(coefficients) if c != 0.0]
        reading = len(live) * self.layout.nbytes
        bar = (
            progress_bar(reading, f"ckptavg: merging {len(live)} snapshots from {self.dirpath}")
            if reading >= PROGRESS_BYTES
            else None
        )
        numel = sum(self.layout.group_numel.values())
        try:
            with self._reading(records) as read:

                def rows(dtype: torch.dtype, lo: int, hi: int) -> Iterator[tuple[Tensor, float]]:
                    return ((read(i, dtype, lo, hi, buffers[dtype]), c) for i, c in live)

                def newest(dtype: torch.dtype, lo: int, hi: int) -> Tensor:
                    return read(
                        live[-1][0], dtype, lo, hi, buffers[dtype]
                    )  # the newest merged, not one excluded by before=

                return merge_blocks(
                    self.layout, rows, newest, out, None if bar is None else lambda n: bar.update(reading * n / numel)
                )
        finally:
            if bar is not None:
                bar.close()

    def non_finite(self, coefficients: list[float], dtype: torch.dtype, block: Block) -> dict[int, str]:
        self.flush()
        records = list(self._records)
        row = torch.empty(block.hi - block.lo, dtype=dtype)
        found = {}
        with self._reading(records) as read:
            for index, c in enumerate(coefficients):
                name = non_finite_tensor(block, read(index, dtype, block.lo, block.hi, row)) if c != 0.0 else None
                if name is not None:
                    found[index] = name
        return found

    def drop(self, indices: list[int]) -> None:
        """Drop snapshots from the window: the manifest first, then their files (a reader only drops
        them from its own view)."""
        self.flush()
        dropped = set(indices)
        kept = [r for i, r in enumerate(self._records) if i not in dropped]
        if self.readonly:
            self._records = kept
            return
        self._check_writable("drop snapshots")
        self._replace_records(kept)

    def _quarantine(self, name: str) -> None:
        """Drop a bad file from the window, keeping it as ``*.corrupt`` for inspection (a reader
        only drops it from its own view)."""
        if self.readonly:
            self._records = [r for r in self._records if r["file"] != name]
            return
        self._check_writable("drop an unusable file")
        kept = [r for r in self._records if r["file"] != name]
        self._write_manifest(kept)  # first: a crash in between leaves an unlisted file, never a listed one missing
        self._records = kept
        path = self.dirpath / name
        if path.exists():
            path.replace(path.with_name(name + ".corrupt"))

    def verify(self) -> list[str]:
        """Read every file in full; drop the unusable ones. Return the names of those dropped."""
        self.flush()
        bad = []
        for record in list(self._records):
            try:
                r = self._reader(record)
                try:
                    for dtype, numel in self.layout.group_numel.items():
                        buffer = torch.empty(min(self.layout.block_numel, numel), dtype=dtype)
                        for lo in range(0, numel, self.layout.block_numel):
                            r.read(dtype, lo, min(lo + self.layout.block_numel, numel), buffer)
                finally:
                    r.close()
            except CorruptSnapshotError as err:
                warnings.warn(str(err), CkptavgWarning, stacklevel=2)
                self._quarantine(record["file"])
                bad.append(record["file"])
            else:
                self._verified.update((record["file"], d) for d in self.layout.group_numel)
        return bad

    @property
    def pinned(self) -> bool:
        return self._staging is not None and all(b.is_pinned() for b in self._staging.values())

    @property
    def nbytes(self) -> int:
        """Disk space held by the listed snapshot files."""
        return sum(int(r["nbytes"]) for r in self._records)

    def read_groups(self, index: int) -> dict[torch.dtype, Tensor]:
        """Snapshot ``index`` (0 = oldest held) as one fresh flat tensor per dtype group, read
        front to back so that every group's checksum is verified (an unusable file is dropped
        and named, as in a merge)."""
        self.flush()
        record = self._records[index]
        try:
            reader = self._reader(record)
            try:
                return {d: reader.read(d, 0, n, torch.empty(n, dtype=d)) for d, n in self.layout.group_numel.items()}
            finally:
                reader.close()
        except CorruptSnapshotError as err:
            self._quarantine(Path(err.path).name)
            raise

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {"steps": [int(r["step"]) for r in self._records], "dirpath": str(self.dirpath)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Return the files to the window a checkpoint recorded: snapshots taken after it (by a run
        that went on and crashed) are dropped; snapshots it lists that are gone are reported."""
        self._check_writable("resume from a checkpoint")
        self.flush()
        newest = max(state["steps"], default=-1)
        later = [int(r["step"]) for r in self._records if int(r["step"]) > newest]
        if later and self.finished_at is not None:
            raise ValueError(
                f"{self.dirpath} holds the window of a run that finished at step {self.finished_at}; resuming here from "
                f"a checkpoint whose window ends at step {newest} would delete its snapshots of steps {later}. Give this "
                "run its own dirpath: it starts from links to the snapshots it inherits, and the finished run keeps its window"
            )
        if later:
            warnings.warn(
                f"{self.dirpath}: dropping the snapshots of steps {later} taken after the checkpoint (by the run that "
                "stopped); the window goes on from the checkpoint's",
                CkptavgWarning,
                stacklevel=4,
            )
        self._replace_records(wanted_records(self, state["steps"], self.dirpath)[-self.capacity :])
