"""The two hot loops: copying a snapshot into flat host buffers, and the weighted sum.

Both walk the layout's cache-sized blocks, so per-call Python work scales with the number of
blocks and tensors, never with the number of elements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from .layout import Layout, accumulation_dtype, is_averaged, local_tensor

RowSource = Callable[[torch.dtype, int, int], Iterable[tuple[Tensor, float]]]
"""``rows(dtype, lo, hi)`` yields ``(row, coefficient)`` for elements ``[lo, hi)`` of a dtype group,
one pair per snapshot with a non-zero coefficient. A row may be a reused buffer: it is consumed
before the next one is requested."""

NewestSource = Callable[[torch.dtype, int, int], Tensor]
"""``newest(dtype, lo, hi)``: elements ``[lo, hi)`` of the newest snapshot's group."""


def weighted_sum_(acc: Tensor, rows: Iterable[tuple[Tensor, float]]) -> Tensor:
    """``acc <- sum_i c_i * row_i``, computed in ``acc``'s dtype whatever the rows' dtype.

    In-place ``add_`` promotes a bf16/fp16 row to the fp32 accumulator before multiplying, so
    low-precision snapshots lose nothing until the single final cast.
    """
    acc.zero_()
    for row, coefficient in rows:
        acc.add_(row, alpha=coefficient)
    return acc


def merge_blocks(layout: Layout, rows: RowSource, newest: NewestSource) -> dict[str, Tensor]:
    """Apply one coefficient vector (already bound into ``rows``) to every block of the layout.

    Returns a fresh, independent CPU tensor per name (no shared storage, so the result can be
    saved with safetensors directly). Floating groups are accumulated block by block in a
    cache-resident fp32 (fp64 for fp64) accumulator and cast once; other groups are copied from
    the newest snapshot.
    """
    merged = {e.name: torch.empty(e.shape, dtype=e.dtype) for e in layout}
    flat_out = {name: t.view(-1) for name, t in merged.items()}
    for dtype, blocks in layout.blocks.items():
        averaged = is_averaged(dtype)
        acc = torch.empty(min(layout.block_numel, layout.group_numel[dtype]), dtype=accumulation_dtype(dtype))
        for block in blocks:
            if averaged:
                result = weighted_sum_(acc[: block.hi - block.lo], rows(dtype, block.lo, block.hi))
            else:
                result = newest(dtype, block.lo, block.hi)
            scatter_block(block, result, flat_out)
    return merged


def scatter_block(block, values: Tensor, flat_out: Mapping[str, Tensor]) -> None:
    """Copy a block's values (indexed from ``block.lo``) into the flattened output tensors."""
    dst = [flat_out[p.name][p.start : p.start + p.length] for p in block.pieces]
    src = [values[p.offset - block.lo : p.offset - block.lo + p.length] for p in block.pieces]
    torch._foreach_copy_(dst, src)


def _flat_source(tensor: Tensor) -> Tensor:
    # A view for contiguous tensors (the usual case); a non-contiguous one is copied once here.
    return local_tensor(tensor).detach().reshape(-1)


@torch.no_grad()
def copy_checked(layout: Layout, tensors: Mapping[str, Tensor], buffers: Mapping[torch.dtype, Tensor]) -> str | None:
    """Copy ``tensors`` into the flat ``buffers``; return the name of a tensor holding NaN or Inf,
    or ``None`` when every value is finite.

    The finiteness check is fused into the copy: each block is summed right after it is copied,
    while it is still in cache (a separate pass over the model would cost half a copy again). A
    finite sum proves every element finite; a non-finite sum (NaN/Inf, or an overflow of huge but
    finite values) is confirmed element-wise on that block only. Device-to-host copies are issued
    non-blocking into (pinned) buffers, with one synchronisation per device for the whole snapshot.
    """
    sources = {name: _flat_source(t) for name, t in tensors.items()}
    devices = {s.device for s in sources.values() if s.device.type != "cpu"}
    asynchronous = bool(devices)
    sums: list[tuple[torch.dtype, object, Tensor]] = []
    for dtype, blocks in layout.blocks.items():
        flat = buffers[dtype]
        averaged = is_averaged(dtype)
        for block in blocks:
            dst = [flat[p.offset : p.offset + p.length] for p in block.pieces]
            src = [sources[p.name][p.start : p.start + p.length] for p in block.pieces]
            if asynchronous:
                for d, s in zip(dst, src):
                    d.copy_(s, non_blocking=True)
            else:
                torch._foreach_copy_(dst, src)
                if averaged:
                    sums.append((dtype, block, flat[block.lo : block.hi].sum()))
    for device in devices:
        torch.cuda.current_stream(device).synchronize()  # the host reads the buffers next
    if asynchronous:
        sums = [(d, b, buffers[d][b.lo : b.hi].sum()) for d in layout.blocks if is_averaged(d) for b in layout.blocks[d]]
    if not sums:
        return None
    finite = torch.stack([s.float() for _, _, s in sums]).isfinite()
    if bool(finite.all()):
        return None
    for (dtype, block, _), ok in zip(sums, finite.tolist()):
        if ok:
            continue
        for piece in block.pieces:
            if not bool(buffers[dtype][piece.offset : piece.offset + piece.length].isfinite().all()):
                return piece.name
    return None  # the sums overflowed, but every value is finite
