"""Crash-safe files: atomic writes and safetensors snapshots written and read in blocks.

A snapshot file is a standard safetensors file (any safetensors reader opens it) whose data section
is the layout's dtype groups back to back, so a block of a group is one contiguous read. Every
write goes to a temporary name, is flushed to disk and renamed over the final name: a crash at any
instant leaves either the old file or the new one, never a torn one. Nothing here unpickles.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CkptavgWarning, CorruptSnapshotError, FolderLockedError  # noqa: F401  (their home before 0.2)
from .layout import Layout, dtype_code

TMP_SUFFIX = ".tmp"
_WRITE_CHUNK = 64 << 20  # bytes per write() call; bounds the time the GIL-free crc/write hold a view


def human_size(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # pragma: no cover


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, chunks: Iterable[memoryview | bytes]) -> int:
    """Write ``chunks`` to ``path`` atomically; return the crc32 of everything written."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    crc = 0
    try:
        # A file (or a planted symlink) left at the temporary name is replaced, never written through.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                crc = zlib.crc32(chunk, crc)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return crc


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes a whole file at a temporary name beside ``path``, which then replaces
    ``path`` in one rename: a crash or a full disk never leaves a half-written file there, and a
    file or link planted at the temporary name is replaced, never written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        tmp.unlink(missing_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _sibling(output: Path, tag: str) -> Path:
    return output.with_name(f".{output.name}.ckptavg-{tag}-{os.getpid()}")


def atomic_folder(output: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(folder)`` on a fresh folder beside ``output``, then put it in place in one rename
    (an existing output moves aside first and is removed last): an error or an interrupt leaves
    the old output, or nothing, never a partial folder."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(output, "new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        if output.is_symlink() or output.is_file():
            output.unlink()
        if output.exists():
            old = _sibling(output, "old")
            os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def link_or_copy(source: Path, source_fd: int, target: Path) -> None:
    """Give ``target`` the content of the open file ``source_fd`` (found at ``source``): a hard
    link to it when the file system allows, else an atomic copy read from the descriptor (the
    name may already be gone: another writer may have evicted it since it was opened)."""
    try:
        os.link(source, target, follow_symlinks=False)
        if os.stat(target, follow_symlinks=False).st_ino == os.fstat(source_fd).st_ino:
            return
        target.unlink()  # the name now points at another file than the one that was opened
    except OSError as err:
        if err.errno == errno.EEXIST:
            raise
    size = os.fstat(source_fd).st_size
    atomic_write_bytes(target, _chunks_of(source_fd, size))


def _chunks_of(fd: int, size: int) -> Iterator[bytes]:
    for offset in range(0, size, _WRITE_CHUNK):
        yield os.pread(fd, min(_WRITE_CHUNK, size - offset), offset)


class FolderLock:
    """The one-writer lock of a window folder: an exclusive ``flock`` on ``dirpath/.lock``, held
    while the writer lives and released by the kernel when its process ends (no stale lock to
    clean up by hand). The file holds the holder's pid, for the error a second writer gets."""

    NAME = ".lock"

    def __init__(self, dirpath: Path):
        self.path = dirpath / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform: one writer is on trust
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderLockedError(
                f"{self.path.parent} is being written by another process (pid {holder}); a window folder has one "
                "writer. Inspect it with CheckpointWindow.open(dirpath, readonly=True) or ckptavg.consolidate, or "
                "give this run its own dirpath"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, [json.dumps(obj, indent=1, sort_keys=True).encode()])


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def tensor_bytes(tensor: Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    return tensor.view(torch.uint8).numpy().data.cast("B") if tensor.numel() else memoryview(b"")


def snapshot_header(layout: Layout, metadata: dict[str, str]) -> bytes:
    """The safetensors header (length prefix included) for a snapshot stored in ``layout`` order."""
    bases = layout.group_byte_offsets()
    header: dict[str, Any] = {"__metadata__": metadata}
    for entry in layout:
        start = bases[entry.dtype] + entry.offset * entry.dtype.itemsize
        header[entry.name] = {
            "dtype": dtype_code(entry.dtype),
            "shape": list(entry.shape),
            "data_offsets": [start, start + entry.numel * entry.dtype.itemsize],
        }
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(body)) + body


def safetensors_metadata(kind: str, **fields: str) -> dict[str, str]:
    """The metadata of every safetensors file ckptavg writes: ``"format": "pt"`` (transformers
    refuses a file whose format is anything else), and ``"ckptavg"`` naming what the file holds
    (``"snapshot"``, ``"merged"``)."""
    return {"format": "pt", "ckptavg": kind, **fields}


def snapshot_metadata(step: int) -> dict[str, str]:
    return safetensors_metadata("snapshot", step=str(step))


def _legacy_snapshot_metadata(step: int) -> dict[str, str]:
    """What snapshots written before 0.2 carry: folders from then still open."""
    return {"format": "ckptavg.snapshot", "step": str(step)}


def check_against_file(path: Path, fd: int | None, layout: Layout, record: dict[str, Any], field: str) -> None:
    """Before anything is allocated or merged: a manifest record's sizes follow from the layout, and
    the file's own safetensors header describes exactly that layout. A readable header that
    describes other tensors means the manifest is wrong (``ValueError`` naming ``field``); a file
    that is missing, truncated or fails its header checksum is left to the merge, which drops it
    (a damaged file, not a wrong manifest). ``field`` names the record, such as ``snapshots[0]``."""
    expected = record["header_bytes"] + layout.nbytes
    if record["nbytes"] != expected:
        raise ValueError(
            f"field '{field}.nbytes' is {record['nbytes']}, but the layout and header_bytes make {expected}"
        )
    try:
        opened = os.dup(fd) if fd is not None else os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        if os.fstat(opened).st_size != record["nbytes"]:
            return
        header = os.pread(opened, record["header_bytes"], 0)
    finally:
        os.close(opened)
    if zlib.crc32(header) != record["header_crc32"]:
        return
    if all(
        header != snapshot_header(layout, metadata(record["step"]))
        for metadata in (snapshot_metadata, _legacy_snapshot_metadata)
    ):
        raise ValueError(
            f"field 'layout' (and '{field}') disagree with the header of {path}, which matches its checksum: the "
            "manifest was edited or belongs to other files; nothing was changed"
        )


def write_snapshot(
    path: Path, layout: Layout, buffers: dict[torch.dtype, Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Atomically write one snapshot; return its manifest record (sizes and checksums)."""
    header = snapshot_header(layout, metadata)
    chunks: list[memoryview | bytes] = [header]
    group_crcs = {}
    for dtype in layout.group_numel:
        data = tensor_bytes(buffers[dtype])
        group_crcs[dtype_code(dtype)] = zlib.crc32(data)
        chunks.extend(data[i : i + _WRITE_CHUNK] for i in range(0, len(data), _WRITE_CHUNK))
    atomic_write_bytes(path, chunks)
    return {
        "header_bytes": len(header),
        "header_crc32": zlib.crc32(header),
        "group_crc32": group_crcs,
        "nbytes": len(header) + layout.nbytes,
    }


class SnapshotReader:
    """Reads blocks of one snapshot file, verifying its header and, per group, its checksum.

    The file's size and header are checked when it is opened; a group's crc is checked once the
    whole group has been read in order (the merge reads groups front to back).
    """

    def __init__(
        self, path: Path, layout: Layout, record: dict[str, Any], verify: bool = True, pinned: int | None = None
    ):
        self.path = path
        self.record = record
        self.verify = verify
        try:
            # ``pinned``: a descriptor opened earlier (a reader's view survives the writer's eviction).
            self._file = (
                os.fdopen(os.dup(pinned), "rb", buffering=0) if pinned is not None else open(path, "rb", buffering=0)
            )
        except FileNotFoundError:
            raise CorruptSnapshotError(path, "the file is missing") from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size != record["nbytes"]:
                raise CorruptSnapshotError(path, f"expected {record['nbytes']} bytes, found {size} (truncated?)")
            header = self._read_exact(0, record["header_bytes"])
            if zlib.crc32(header) != record["header_crc32"]:
                raise CorruptSnapshotError(path, "its header does not match the manifest checksum")
        except BaseException:
            self._file.close()
            raise
        self._bases = {d: record["header_bytes"] + b for d, b in layout.group_byte_offsets().items()}
        self._crc: dict[torch.dtype, tuple[int, int]] = {}  # dtype -> (bytes verified so far, running crc)
        self._group_bytes = {d: n * d.itemsize for d, n in layout.group_numel.items()}

    def _read_exact(self, offset: int, length: int, into: memoryview | None = None) -> memoryview:
        view = into if into is not None else memoryview(bytearray(length))
        got = 0
        while got < length:
            n = os.preadv(self._file.fileno(), [view[got:length]], offset + got)
            if n == 0:
                raise CorruptSnapshotError(self.path, f"unexpected end of file at byte {offset + got}")
            got += n
        return view[:length]

    def read(self, dtype: torch.dtype, lo: int, hi: int, out: Tensor) -> Tensor:
        """Elements ``[lo, hi)`` of group ``dtype`` into ``out`` (a flat buffer of that dtype)."""
        size = dtype.itemsize
        dst = out[: hi - lo]
        data = self._read_exact(self._bases[dtype] + lo * size, (hi - lo) * size, tensor_bytes(dst))
        if self.verify:
            self._track_crc(dtype, lo * size, data)
        return dst

    def _track_crc(self, dtype: torch.dtype, start: int, data: memoryview) -> None:
        done, crc = self._crc.get(dtype, (0, 0))
        if start != done:  # not a sequential pass over the group: cannot verify it this time
            self._crc[dtype] = (-1, 0)
            return
        done, crc = done + len(data), zlib.crc32(data, crc)
        self._crc[dtype] = (done, crc)
        if done == self._group_bytes[dtype] and crc != self.record["group_crc32"][dtype_code(dtype)]:
            raise CorruptSnapshotError(self.path, f"checksum mismatch in its {dtype_code(dtype)} data")

    def verified_groups(self) -> list[torch.dtype]:
        """Groups read in full, in order, with a matching checksum."""
        return [d for d, (done, _) in self._crc.items() if done == self._group_bytes[d]]

    def close(self) -> None:
        self._file.close()


def add_safetensors_metadata(path: Path, fields: dict[str, str]) -> None:
    """Add ``fields`` to a safetensors file's metadata (atomically; the tensor bytes are copied as
    they are, a chunk at a time)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **fields}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep the data aligned, as safetensors writes it

        def chunks() -> Iterator[bytes]:
            yield struct.pack("<Q", len(encoded)) + encoded
            while chunk := f.read(_WRITE_CHUNK):
                yield chunk

        atomic_write_bytes(path, chunks())
