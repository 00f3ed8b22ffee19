"""Where every tensor of a snapshot lives in flat host buffers.

A snapshot is stored as one contiguous 1-D buffer per dtype ("group"). The layout maps each tensor
name to an offset in its group, and cuts each group into cache-sized blocks. The same block plan
drives the snapshot copy (copy a block, check it while it is still in cache) and the merge kernel
(accumulate a block over all snapshots in a cache-resident accumulator), and it is also the byte
layout of the disk tier's safetensors files, so a block on disk is one contiguous read.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# 1M elements: a 4 MiB fp32 accumulator stays in L2/L3 while W snapshot rows stream past it.
# Measured on the 2-core development machine: 0.62x the time of W full-size add_ passes.
BLOCK_NUMEL = 1 << 20

# torch dtype <-> safetensors dtype code. The codes also name dtypes in manifests and state dicts.
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    return _DTYPE_CODES[dtype]


def dtype_from_code(code: str) -> torch.dtype:
    try:
        return _CODE_DTYPES[code]
    except KeyError:
        raise ValueError(f"unknown dtype code {code!r}; expected one of {sorted(_CODE_DTYPES)}") from None


def is_averaged(dtype: torch.dtype) -> bool:
    """Floating tensors are averaged; integer and bool tensors (step counters such as BatchNorm's
    ``num_batches_tracked``) are taken from the newest snapshot."""
    return dtype.is_floating_point


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 accumulates in fp64; every other float (bf16, fp16, fp32) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_tensor(tensor: Tensor) -> Tensor:
    """The data this process holds: a DTensor's local shard, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def flat_local(tensor: Tensor) -> Tensor:
    """The data this process holds, flattened and detached: a view for contiguous tensors (the
    usual case); a non-contiguous one is copied."""
    return local_tensor(tensor).detach().reshape(-1)


def state_tensors(source: nn.Module | Mapping[str, Any], *, keep_vars: bool = False) -> dict[str, Tensor]:
    """The named tensors of a model (its ``state_dict``) or of a mapping; non-tensor entries (such
    as ``_extra_state`` objects) are skipped. With ``keep_vars`` a model's own parameter and buffer
    objects are returned, so writing into them updates the model in place."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(source, nn.Module):
        items = source.state_dict(keep_vars=keep_vars).items()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        raise TypeError(f"expected an nn.Module or a mapping of name -> tensor, got {type(source).__name__}")
    tensors = {}
    for name, value in items:
        if isinstance(value, Tensor):
            if not isinstance(name, str):
                raise TypeError(f"state dict keys must be strings, got {name!r}")
            tensors[name] = value
    return tensors


@dataclass(frozen=True)
class Entry:
    """One tensor: its name, dtype, shape and element offset in its dtype group."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


@dataclass(frozen=True)
class Piece:
    """A run of ``length`` elements of tensor ``name``, from element ``start`` of the flattened
    tensor, stored at ``offset`` in its group."""

    name: str
    start: int
    offset: int
    length: int


@dataclass(frozen=True)
class Block:
    """Elements ``[lo, hi)`` of a dtype group and the tensor pieces stored there."""

    lo: int
    hi: int
    pieces: tuple[Piece, ...]


def _check_dense(data: Tensor, what: str) -> None:
    """Only dense tensors with data can be stored (meta tensors hold none; sparse ones are not flat)."""
    if data.is_meta or data.layout != torch.strided:
        kind = "on the meta device (it holds no data)" if data.is_meta else f"{data.layout} (not a dense tensor)"
        raise ValueError(f"{what} is {kind}; ckptavg stores dense tensors with data")


class Layout:
    """The names, dtypes and shapes a window holds, and where each lives in the flat buffers.

    Groups are ordered by item size, largest first, so that every group starts aligned to its own
    item size when the groups are written back to back into one file.
    """

    def __init__(self, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], block_numel: int = BLOCK_NUMEL):
        self.block_numel = block_numel
        self.__dict__.pop("blocks", None)  # a plan made for other entries
        self.entries: dict[str, Entry] = {}  # in the caller's order; offsets follow the groups
        order = sorted({dtype for _, dtype, _ in specs}, key=lambda d: (-d.itemsize, dtype_code(d)))
        self.group_numel: dict[torch.dtype, int] = dict.fromkeys(order, 0)
        for name, dtype, shape in specs:
            if name in self.entries:
                raise ValueError(f"duplicate tensor name {name!r}")
            if name == "__metadata__":
                raise ValueError(
                    "a tensor named '__metadata__' cannot be stored: safetensors reserves that key for metadata"
                )
            dims = tuple(int(s) for s in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"tensor {name!r} has a negative dimension in shape {dims}")
            entry = Entry(name, dtype, dims, self.group_numel[dtype])
            self.entries[name] = entry
            self.group_numel[dtype] += entry.numel

    @functools.cached_property
    def blocks(self) -> dict[torch.dtype, list[Block]]:
        """The block plan, made on first use: a layout read from a file is checked against the
        file's size before anything proportional to its claimed size is built."""
        return {d: self._plan_blocks(d) for d in self.group_numel}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], block_numel: int = BLOCK_NUMEL) -> Layout:
        specs = []
        for name, tensor in tensors.items():
            data = local_tensor(tensor)
            _check_dense(data, f"tensor {name!r}")
            if data.dtype not in _DTYPE_CODES:
                raise ValueError(
                    f"tensor {name!r} has dtype {data.dtype}, which ckptavg cannot store; "
                    f"supported: {', '.join(str(d) for d in _DTYPE_CODES)}"
                )
            specs.append((name, data.dtype, tuple(data.shape)))
        return cls(specs, block_numel)

    # -- validation -------------------------------------------------------------------------------

    def check(self, tensors: Mapping[str, Tensor], what: str = "snapshot") -> None:
        """Raise ``ValueError`` naming the first key whose presence, shape or dtype differs."""
        for name in tensors:
            if name not in self.entries:
                raise ValueError(f"{what} has unexpected key {name!r}, which the window does not hold")
        for name, entry in self.entries.items():
            if name not in tensors:
                raise ValueError(f"{what} is missing key {name!r}, which the window holds")
            data = local_tensor(tensors[name])
            _check_dense(data, f"{what}: key {name!r}")
            if tuple(data.shape) != entry.shape:
                raise ValueError(f"{what}: key {name!r} has shape {tuple(data.shape)}, the window holds {entry.shape}")
            if data.dtype != entry.dtype:
                raise ValueError(f"{what}: key {name!r} has dtype {data.dtype}, the window holds {entry.dtype}")

    # -- sizes ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.to_json() == other.to_json()

    @property
    def nbytes(self) -> int:
        return sum(n * d.itemsize for d, n in self.group_numel.items())

    def group_byte_offsets(self) -> dict[torch.dtype, int]:
        """Byte offset of each group when the groups are stored back to back."""
        offsets, position = {}, 0
        for dtype, numel in self.group_numel.items():
            offsets[dtype] = position
            position += numel * dtype.itemsize
        return offsets

    def new_buffers(self, pin_memory: bool = False) -> dict[torch.dtype, Tensor]:
        """One empty flat host buffer per group."""
        return {d: torch.empty(n, dtype=d, pin_memory=pin_memory) for d, n in self.group_numel.items()}

    def views(self, groups: Mapping[torch.dtype, Tensor]) -> dict[str, Tensor]:
        """Each tensor of the layout as a view into flat group buffers (one per dtype)."""
        return {e.name: groups[e.dtype][e.offset : e.offset + e.numel].view(e.shape) for e in self}

    # -- serialisation ----------------------------------------------------------------------------

    def to_json(self) -> list[list[Any]]:
        """``[[name, dtype code, shape], ...]``; the offsets follow from this order."""
        return [[e.name, dtype_code(e.dtype), list(e.shape)] for e in self.entries.values()]

    @classmethod
    def from_json(cls, specs: list[list[Any]]) -> Layout:
        try:
            return cls(
                [(str(name), dtype_from_code(code), tuple(int(s) for s in shape)) for name, code, shape in specs]
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed layout: {err}") from err

    # -- block plan -------------------------------------------------------------------------------

    def _plan_blocks(self, dtype: torch.dtype) -> list[Block]:
        blocks: list[Block] = []
        pieces: list[Piece] = []
        lo = position = 0
        for entry in sorted((e for e in self.entries.values() if e.dtype == dtype), key=lambda e: e.offset):
            start = 0
            while start < entry.numel:
                take = min(self.block_numel - (position - lo), entry.numel - start)
                pieces.append(Piece(entry.name, start, position, take))
                position += take
                start += take
                if position - lo == self.block_numel:
                    blocks.append(Block(lo, position, tuple(pieces)))
                    lo, pieces = position, []
        if pieces:
            blocks.append(Block(lo, position, tuple(pieces)))
        return blocks
