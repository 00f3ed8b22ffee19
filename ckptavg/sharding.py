"""How a rank's window relates to the full model when a run spans several processes.

Three cases, one placement record per tensor (plain JSON, stored in manifests and state dicts):

* **FSDP2 / DTensor**: each rank holds its local shard; ``{"shape": full shape, "offset": [start
  of the shard in each dimension]}``. Snapshot, merge and restore are local: no communication.
* **DDP, spread** (:class:`Spread`): replicas are identical, so rank ``r`` of ``W`` keeps one
  contiguous ``1/W`` of every dtype group; ``{"shape": full shape, "flat": [lo, hi]}`` names the
  elements of the flattened tensor it holds. A merge is computed on the slices and gathered.
* **Replicated**: every rank holds every tensor in full; ``offset`` is all zeros.

:func:`assemble` rebuilds full tensors from the ranks' pieces, offline (see
:func:`ckptavg.consolidate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Layout, dtype_from_code, flat_local, local_tensor

Placement = dict[str, Any]

# Slice boundaries fall on multiples of this many elements, so every rank's slice starts
# cache-line aligned and the vectorised kernels see the same element alignment as unsharded.
SPREAD_ALIGN = 64


def distributed_rank(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` outside ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_dtensor(tensor: Tensor) -> bool:
    return callable(getattr(tensor, "to_local", None)) and hasattr(tensor, "placements")


def shard_placements(tensors: Mapping[str, Tensor]) -> dict[str, Placement]:
    """Where each rank-local tensor sits in the full one: a DTensor's local shard, or (for a plain
    tensor, such as an unsharded buffer) the whole tensor."""
    placements = replicated_placements(tensors)
    for name, tensor in tensors.items():
        if is_dtensor(tensor):
            chunk = tensor.__create_chunk_list__()[0]  # type: ignore[attr-defined]  # this rank's offsets and sizes (what DCP records)
            placements[name]["offset"] = [int(o) for o in chunk.offsets]
    return placements


def replicated_placements(tensors: Mapping[str, Tensor]) -> dict[str, Placement]:
    """Every tensor whole: the placements of a replica."""
    return {name: {"shape": list(t.shape), "offset": [0] * t.dim()} for name, t in tensors.items()}


def collective_device(group: Any = None) -> torch.device:
    """Where tensors must live for ``group``'s collectives: CUDA for NCCL, host memory otherwise."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_ranks_max(value: int, group: Any = None) -> int:
    """The largest ``value`` over the ranks of ``group`` (``value`` itself in one process)."""
    return all_ranks_max_each([value], group)[0]


def all_ranks_max_each(values: list[int], group: Any = None) -> list[int]:
    """The largest of each of ``values`` over the ranks of ``group`` (``values`` in one process)."""
    if distributed_rank(group)[1] == 1:
        return list(values)
    flags = torch.tensor(values, dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [int(f) for f in flags.tolist()]


def all_ranks_mean(values: list[float], group: Any = None) -> list[float]:
    """The mean of each of ``values`` over the ranks of ``group`` (``values`` in one process); a
    non-finite value on any rank makes that mean non-finite."""
    if distributed_rank(group)[1] == 1:
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return [v / dist.get_world_size(group) for v in summed.tolist()]


def with_rank0_buffers(source: Any, tensors: Mapping[str, Tensor], group: Any = None) -> Mapping[str, Tensor]:
    """``tensors`` with each of ``source``'s buffers replaced by rank 0's values.

    DDP keeps parameters identical across ranks, but every rank updates buffers (BatchNorm
    statistics) from its own batches until DDP broadcasts rank 0's at the next forward; rank 0's
    are the model's, so a spread snapshot takes those (one broadcast per buffer, all in flight)."""
    if not isinstance(source, torch.nn.Module):
        return tensors
    names = [name for name, _ in source.named_buffers() if name in tensors]
    if not names:
        return tensors
    device = collective_device(group)
    copies = {
        name: local_tensor(tensors[name]).detach().to(device, memory_format=torch.contiguous_format, copy=True)
        for name in names
    }
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for work in [dist.broadcast(as_bytes(t), src=src, group=group, async_op=True) for t in copies.values()]:
        assert work is not None
        work.wait()
    return {**tensors, **copies}


def as_bytes(tensor: Tensor) -> Tensor:
    """A contiguous tensor's bytes: collectives then move any dtype (gloo and NCCL refuse int16)."""
    return tensor.reshape(-1).view(torch.uint8)


def all_gather_flat(output: Tensor, local: Tensor, group: Any = None) -> None:
    """``output`` <- the ranks' equally sized flat ``local`` tensors, back to back."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10
    gather(as_bytes(output), as_bytes(local), group=group)


class Spread:
    """Rank ``rank``'s share of a replicated model: elements ``[lo, hi)`` of every dtype group of the
    full layout, with ``hi - lo`` at most ``chunk`` (the groups split in ``world`` aligned parts).

    Because the slice of a group is contiguous and the local layout lists the pieces in the full
    layout's order, the local group buffers are exactly those elements of the full groups: a merge
    of the slices, gathered back to back, is the merge of the full window, bit for bit.
    """

    def __init__(self, full: Layout, rank: int, world: int, group: Any = None):
        self.full, self.rank, self.world, self.group = full, rank, world, group
        self.chunk: dict[torch.dtype, int] = {}
        self.ranges: dict[torch.dtype, tuple[int, int]] = {}
        for dtype, numel in full.group_numel.items():
            per_rank = -(-numel // world)
            chunk = -(-per_rank // SPREAD_ALIGN) * SPREAD_ALIGN
            self.chunk[dtype] = chunk
            self.ranges[dtype] = (min(rank * chunk, numel), min((rank + 1) * chunk, numel))
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self.pieces: dict[str, tuple[int, int]] = {}  # name -> [a, b) of the flattened tensor
        for entry in full:
            lo, hi = self.ranges[entry.dtype]
            a, b = max(lo, entry.offset), min(hi, entry.offset + entry.numel)
            if a < b:
                self.pieces[entry.name] = (a - entry.offset, b - entry.offset)
                specs.append((entry.name, entry.dtype, (b - a,)))
        self.local = Layout(specs, full.block_numel)

    def placements(self) -> dict[str, Placement]:
        return {
            name: {"shape": list(self.full.entries[name].shape), "flat": list(piece)}
            for name, piece in self.pieces.items()
        }

    def local_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's slice of a whole cpu-window state (its ``snapshots`` rows cut to ``[lo, hi)``)."""
        snapshots = {}
        for code, rows in state["snapshots"].items():
            lo, hi = self.ranges[dtype_from_code(code)]
            if hi > lo:
                snapshots[code] = rows[:, lo:hi]
        return {**state, "layout": self.local.to_json(), "snapshots": snapshots}

    def local_views(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This rank's slice of each full tensor (views of contiguous tensors: nothing is copied)."""
        return {name: flat_local(tensors[name])[a:b] for name, (a, b) in self.pieces.items()}

    def local_outputs(self) -> tuple[dict[torch.dtype, Tensor], dict[str, Tensor]]:
        """Zeroed ``chunk``-sized send buffers, one per dtype group, and the local layout's tensors
        as views into them (a merge written there is ready to gather)."""
        flats = {d: torch.zeros(c, dtype=d) for d, c in self.chunk.items()}
        views = {e.name: flats[e.dtype][e.offset : e.offset + e.numel] for e in self.local}
        return flats, views

    def gather(self, flats: Mapping[torch.dtype, Tensor]) -> dict[torch.dtype, Tensor]:
        """Every rank's send buffer, back to back: the full groups (plus alignment padding), on the
        device the process group communicates from."""
        device = collective_device(self.group)
        full = {}
        for dtype, flat in flats.items():
            flat = flat.to(device, non_blocking=False)
            out = torch.empty(self.world * self.chunk[dtype], dtype=dtype, device=device)
            all_gather_flat(out, flat, self.group)
            full[dtype] = out
        return full

    def full_views(self, groups: Mapping[torch.dtype, Tensor]) -> dict[str, Tensor]:
        """The full layout's tensors as views of gathered groups."""
        return {e.name: groups[e.dtype][e.offset : e.offset + e.numel].view(e.shape) for e in self.full}


def assemble(
    pieces: Iterable[tuple[Mapping[str, Tensor], Mapping[str, Placement]]], where: str = "window"
) -> dict[str, Tensor]:
    """Full tensors from every rank's ``(local tensors, placements)``. Each element must be
    covered (replicated pieces may be covered several times); a gap raises ``ValueError`` naming
    the tensor."""
    full: dict[str, Tensor] = {}
    covered: dict[str, Tensor] = {}
    for tensors, placements in pieces:
        for name, tensor in tensors.items():
            place = placements[name]
            shape = tuple(int(s) for s in place["shape"])
            if name not in full:
                full[name] = torch.empty(shape, dtype=tensor.dtype)
                covered[name] = torch.zeros(shape, dtype=torch.bool)
            if "flat" in place:
                a, b = (int(x) for x in place["flat"])
                full[name].view(-1)[a:b] = tensor.reshape(-1)
                covered[name].view(-1)[a:b] = True
            else:
                index = tuple(
                    slice(int(o), int(o) + int(s)) for o, s in zip(place["offset"], tensor.shape, strict=True)
                )
                full[name][index] = tensor
                covered[name][index] = True
    for name, mask in covered.items():
        if not bool(mask.all()):
            raise ValueError(
                f"{where}: tensor {name!r} is incomplete: {int((~mask).sum())} of {mask.numel()} elements are on no "
                "rank's files (a rank's folder is missing?)"
            )
    return full
