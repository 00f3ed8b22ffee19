"""The folder format of a disk window: the manifest's names and version, the snapshot file names,
the per-rank folders of a multi-process window and rank 0's index of them, and the checks every
manifest record passes before a file it names is opened."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CkptavgWarning, check_int
from ..files import atomic_write_json, read_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ckptavg.window"
MANIFEST_VERSION = 1
RANKS_FORMAT = "ckptavg.ranks"  # the top-level index of a multi-process window
_SNAPSHOT_FILE = re.compile(r"^snapshot-(\d+)\.safetensors$")


def snapshot_filename(step: int) -> str:
    return f"snapshot-{step:012d}.safetensors"


def rank_dirpath(dirpath: str | os.PathLike[str], rank: int, world: int) -> Path:
    """Where one rank of a multi-process run keeps its files: ``dirpath/rank<r>`` (``dirpath``
    itself in a single process), so that every rank can be given the same ``dirpath``."""
    return Path(dirpath) / f"rank{rank}" if world > 1 else Path(dirpath)


def write_ranks_manifest(dirpath: str | os.PathLike[str], sharding: Mapping[str, Any]) -> None:
    """Rank 0's index of a multi-process window: the world size and the kind of sharding (each
    rank's own manifest holds its placements). Written without communication."""
    Path(dirpath).mkdir(parents=True, exist_ok=True)
    world = int(sharding["world_size"])
    atomic_write_json(
        Path(dirpath) / MANIFEST,
        {"format": RANKS_FORMAT, "version": MANIFEST_VERSION, "world_size": world, "kind": sharding["kind"],
         "ranks": [rank_dirpath(dirpath, r, world).name for r in range(world)]},
    )  # fmt: skip


def rank_dirpaths(dirpath: str | os.PathLike[str]) -> list[Path]:
    """The per-rank folders of a multi-process window, as rank 0's index lists them (a missing one
    raises ``FileNotFoundError`` naming it); ``[dirpath]`` for a single-process window."""
    path = Path(dirpath) / MANIFEST
    index = read_json(path) if path.is_file() else {}
    if index.get("format") != RANKS_FORMAT:
        return [Path(dirpath)]
    try:
        world = int(index["world_size"])
        names = list(index["ranks"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the index {path} is malformed: {err!r}") from None
    # Names are read from a file that may have been edited: only this index's own plain names.
    if names != [f"rank{r}" for r in range(world)]:
        raise ValueError(f"the index {path} field 'ranks' must be ['rank0', ..., 'rank{world - 1}'], got {names!r}")
    folders = [Path(dirpath) / name for name in names]
    missing = [f.name for f in folders if not (f / MANIFEST).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{dirpath} is a window of {index['world_size']} processes, but the folders of {missing} are missing or hold no manifest"
        )
    return folders


def wanted_records(store: Any, steps: list[int], dirpath: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``store`` (the window in ``dirpath``, ``None`` if there is none) for ``steps``
    (a checkpoint's window); steps whose files are gone are reported."""
    on_disk = {int(r["step"]): r for r in store._records} if store is not None else {}
    missing = [int(s) for s in steps if int(s) not in on_disk]
    if missing:
        warnings.warn(
            f"the checkpoint's window lists steps {missing}, whose files are no longer in {dirpath}; "
            f"continuing with the {len(steps) - len(missing)} that are",
            CkptavgWarning,
            stacklevel=5,  # the caller of CheckpointWindow.load_state_dict
        )
    return [on_disk[int(s)] for s in steps if int(s) in on_disk]


def check_record(record: Any, i: int) -> None:
    """One manifest entry: a plain snapshot file name inside the folder (never a path), matching its
    step, and non-negative integer sizes and checksums."""
    field = lambda key: f"field 'snapshots[{i}].{key}'"  # noqa: E731
    if not isinstance(record, dict):
        raise ValueError(f"field 'snapshots[{i}]' must be an object, got {record!r}")
    for key in ("step", "nbytes", "header_bytes", "header_crc32"):
        value = record.get(key)
        check_int(value, field(key))
    name = record.get("file")
    if not isinstance(name, str) or name != snapshot_filename(record["step"]):
        raise ValueError(
            f"{field('file')} must be the plain file name {snapshot_filename(record['step'])!r}, got {name!r}"
        )
    crcs = record.get("group_crc32")
    if not isinstance(crcs, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in crcs.values()):
        raise ValueError(f"{field('group_crc32')} must map dtype names to integers, got {crcs!r}")
