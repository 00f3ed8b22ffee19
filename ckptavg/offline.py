"""Merging checkpoints that were saved separately (no window, no training loop)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from .kernels import weighted_sum_
from .layout import BLOCK_NUMEL, Layout, accumulation_dtype, flat_local, is_averaged, local_tensor, state_tensors
from .merges import DEFAULT_ALPHA, Method, coefficients
from .sharding import Placement, assemble, replicated_placements
from .storage import DiskStore, rank_dirpaths

CheckpointSource = Union[nn.Module, Mapping[str, Tensor], str, os.PathLike]


class _SafetensorsFile(Mapping[str, Tensor]):
    """The tensors of a safetensors file, each read (memory-mapped) only when asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._keys:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_state_file(path: str | os.PathLike[str]) -> Mapping[str, Tensor]:
    """A state dict from a file, never unpickling code: safetensors (read lazily), or a torch file
    (``.pt``, ``.pth``, ``.bin``, Lightning ``.ckpt``: its ``state_dict`` entry) loaded with
    ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return _SafetensorsFile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # safetensors and torch raise a variety of types for bad files
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _describe(source: CheckpointSource, index: int) -> str:
    return f"checkpoint {source}" if isinstance(source, (str, os.PathLike)) else f"state dict #{index}"


@torch.no_grad()
def merge_state_dicts(
    state_dicts: Sequence[CheckpointSource],
    weights: Method | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, Tensor]:
    """Merge separately saved checkpoints, oldest first, with the same kernel as the window.

    Each item is a state dict, a model, or a file path (safetensors, or a torch/Lightning
    checkpoint loaded with ``weights_only=True``). ``weights`` is ``None`` (uniform), a method name
    (``"sma"``, ``"wma"``, ``"ema"``) or one number per checkpoint (scaled to sum to 1). Floats are
    accumulated in fp32 (fp64 in fp64) and cast back once; integer and bool tensors come from the
    last checkpoint. Tensors are paired by name; any difference in names, shapes or dtypes raises
    ``ValueError`` naming the key and the checkpoint.

    >>> import torch
    >>> a = {"w": torch.zeros(2), "n": torch.tensor(1)}
    >>> b = {"n": torch.tensor(5), "w": torch.ones(2)}
    >>> merge_state_dicts([a, b], weights=[1, 3])
    {'w': tensor([0.7500, 0.7500]), 'n': tensor(5)}
    """
    if isinstance(state_dicts, (str, os.PathLike, Mapping)):
        raise TypeError("merge_state_dicts takes a sequence of checkpoints")
    sources = list(state_dicts)
    coeffs = coefficients("sma" if weights is None else weights, len(sources), alpha)
    loaded = [load_state_file(s) if isinstance(s, (str, os.PathLike)) else s for s in sources]
    dicts = [state_tensors(d) for d in loaded]
    layout = Layout.from_tensors(dicts[0])
    for index, (source, tensors) in enumerate(zip(sources, dicts)):
        layout.check(tensors, what=_describe(source, index))

    live = [(d, c) for d, c in zip(dicts, coeffs) if c != 0.0]
    merged: dict[str, Tensor] = {}
    for entry in layout:
        out = torch.empty(entry.shape, dtype=entry.dtype)
        merged[entry.name] = out
        if not is_averaged(entry.dtype):
            out.copy_(local_tensor(dicts[-1][entry.name]))
            continue
        rows = [(flat_local(d[entry.name]), c) for d, c in live]  # each file read once
        flat = out.view(-1)
        acc = torch.empty(min(BLOCK_NUMEL, entry.numel), dtype=accumulation_dtype(entry.dtype))
        for lo in range(0, entry.numel, BLOCK_NUMEL):
            hi = min(lo + BLOCK_NUMEL, entry.numel)
            flat[lo:hi].copy_(weighted_sum_(acc[: hi - lo], ((row[lo:hi], c) for row, c in rows)))
    return merged


def consolidate(
    dirpath: str | os.PathLike[str],
    method: Method = "sma",
    alpha: float = DEFAULT_ALPHA,
    *,
    before: int | None = None,
) -> dict[str, Tensor]:
    """The full merged state dict of a disk window written by a multi-process run, in one process.

    ``dirpath`` is the folder every rank was given (holding rank 0's index ``manifest.json`` and
    the folders ``rank0``, ``rank1``, ...) or a single-process window. Each rank's files are merged with the same coefficient vector over the
    steps that every rank holds (a crash can leave one rank a snapshot ahead), and the pieces are
    put in place: FSDP2 shards at their offsets, spread slices at their ranges, replicas once.
    Peak memory: the full result, one rank's merge, and a byte per element (the coverage check).

    Raises ``FileNotFoundError`` naming a missing rank folder or manifest, and ``ValueError``
    naming the folder when the ranks disagree on the world size or no step is held by all of them.
    """
    from .window import CheckpointWindow

    folders = rank_dirpaths(dirpath)
    manifests = [DiskStore.read_manifest(folder) for folder in folders]
    worlds = {int((m.get("sharding") or {}).get("world_size", 1)) for m in manifests}
    if len(worlds) != 1 or worlds != {len(folders)}:
        raise ValueError(
            f"{dirpath}: found rank folders {[f.name for f in folders]} recording world sizes {sorted(worlds)}; "
            "a consolidated merge needs the folder of every rank of one run"
        )
    held = [[int(r["step"]) for r in m["snapshots"]] for m in manifests]
    common = sorted(set.intersection(*(set(h) for h in held)))
    if before is not None:
        common = [s for s in common if s < before]
    if not common:
        raise ValueError(f"{dirpath}: no snapshot step is held by every rank (held: {held})")
    chosen = dict(zip(common, coefficients(method, len(common), alpha)))

    def rank_merges() -> Iterator[tuple[dict[str, Tensor], Mapping[str, Placement]]]:
        for folder, manifest in zip(folders, manifests):  # one rank's merge in memory at a time
            with CheckpointWindow.open(folder, readonly=True) as window:
                merged = window.merge([chosen.get(step, 0.0) for step in window.steps])
            sharding = manifest.get("sharding")
            yield merged, sharding["placements"] if sharding else replicated_placements(merged)

    return assemble(rank_merges(), where=str(dirpath))
