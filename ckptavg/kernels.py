"""The two hot loops: copying a snapshot into flat host buffers, and the weighted sum.

Both walk the layout's cache-sized blocks, so per-call Python work scales with the number of
blocks and tensors, never with the number of elements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .layout import BLOCK_NUMEL, Block, Entry, Layout, accumulation_dtype, flat_local, is_averaged, local_tensor

RowSource = Callable[[torch.dtype, int, int], Iterable[tuple[Tensor, float]]]
"""``rows(dtype, lo, hi)`` yields ``(row, coefficient)`` for elements ``[lo, hi)`` of a dtype group,
one pair per snapshot with a non-zero coefficient. A row may be a reused buffer: it is consumed
before the next one is requested."""

NewestSource = Callable[[torch.dtype, int, int], Tensor]
"""``newest(dtype, lo, hi)``: elements ``[lo, hi)`` of the newest snapshot's group."""


def weighted_sum_(acc: Tensor, rows: Iterable[tuple[Tensor, float]], scratch: Tensor | None = None) -> Tensor:
    """``acc <- sum_i c_i * row_i``, computed in ``acc``'s dtype whatever the rows' dtype.

    Rows in another dtype (bf16/fp16 into an fp32 accumulator) are first converted into
    ``scratch`` (cache-resident, like ``acc``): a vectorised conversion plus a same-dtype
    ``add_`` is about twice as fast as torch's mixed-dtype ``add_``, and exactly as accurate.
    """
    empty = True
    for row, coefficient in rows:
        if row.dtype != acc.dtype:
            converted = scratch[: row.numel()] if scratch is not None else torch.empty_like(acc)
            row = converted.copy_(row)
        if empty:
            torch.mul(row, coefficient, out=acc)
            empty = False
        else:
            acc.add_(row, alpha=coefficient)
    if empty:
        acc.zero_()
    return acc


@torch.no_grad()
def merge_blocks(
    layout: Layout,
    rows: RowSource,
    newest: NewestSource,
    out: Mapping[str, Tensor] | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Tensor]:
    """Apply one coefficient vector (already bound into ``rows``) to every block of the layout;
    raise :class:`NonFiniteBlock` at the first floating block that comes out NaN or Inf.

    Writes into ``out`` (contiguous CPU tensors matching the layout) or, by default, into fresh
    independent tensors (no shared storage, so the result can be saved with safetensors
    directly). Floating groups are accumulated block by block in a cache-resident fp32 (fp64 for
    fp64) accumulator and cast once; other groups are copied from the newest snapshot.
    ``progress(n)`` is told of every block done (``n``: its elements).
    """
    merged = dict(out) if out is not None else {e.name: torch.empty(e.shape, dtype=e.dtype) for e in layout}
    flat_out = {name: t.view(-1) for name, t in merged.items()}
    for dtype, blocks in layout.blocks.items():
        if not is_averaged(dtype):
            for block in blocks:
                scatter_block(block, newest(dtype, block.lo, block.hi), flat_out)
                if progress is not None:
                    progress(block.hi - block.lo)
            continue
        acc_dtype = accumulation_dtype(dtype)
        size = min(layout.block_numel, layout.group_numel[dtype])
        acc = torch.empty(size, dtype=acc_dtype)
        scratch = torch.empty(size, dtype=acc_dtype) if dtype != acc_dtype else None
        for block in blocks:
            if dtype == acc_dtype and len(block.pieces) == 1:
                # One tensor, same dtype: accumulate straight into the result, no copy after.
                piece = block.pieces[0]
                result = weighted_sum_(
                    flat_out[piece.name][piece.start : piece.start + piece.length], rows(dtype, block.lo, block.hi)
                )
                if not is_finite_block(result):
                    raise NonFiniteBlock(dtype, block)
            else:
                result = weighted_sum_(acc[: block.hi - block.lo], rows(dtype, block.lo, block.hi), scratch)
                if not is_finite_block(result):
                    raise NonFiniteBlock(dtype, block)
                scatter_block(block, result, flat_out)
            if progress is not None:
                progress(block.hi - block.lo)
    return merged


def all_finite(tensor: Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf, checked block by block (:func:`is_finite_block`):
    ``torch.isfinite`` on a whole tensor makes full-size temporaries (an ``abs`` copy and two
    masks), half again the tensor, and is slower than a sum."""
    flat = tensor.reshape(-1)
    return all(is_finite_block(block) for block in flat.split(BLOCK_NUMEL))


def stream_merge(
    entries: Iterable[Entry], sources: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> Iterator[tuple[Entry, int, int, Tensor]]:
    """The merge of whole tensors held elsewhere (files read lazily, state dicts), tensor by tensor
    in ``entries``' order and block by block: ``(entry, lo, hi, values)`` for elements ``[lo, hi)``
    of the flattened tensor. Floating tensors are accumulated with :func:`weighted_sum_` in
    ``entry``'s accumulation dtype (``values`` is a reused buffer: consume it before the next
    item); integer and bool tensors come whole from the newest source with a non-zero weight, as
    in the window. Each source tensor is read once. The offline merges and the command line
    write these blocks into tensors or straight into a file."""
    live = [(s, w) for s, w in zip(sources, weights, strict=True) if w != 0.0]
    newest = live[-1][0]
    buffers: dict[torch.dtype, tuple[Tensor, Tensor]] = {}  # per accumulation dtype: (acc, scratch)
    for entry in entries:
        if not is_averaged(entry.dtype):
            yield entry, 0, entry.numel, flat_local(newest[entry.name])
            continue
        rows = [(flat_local(s[entry.name]), w) for s, w in live]
        acc_dtype = accumulation_dtype(entry.dtype)
        if acc_dtype not in buffers:
            buffers[acc_dtype] = (torch.empty(BLOCK_NUMEL, dtype=acc_dtype), torch.empty(BLOCK_NUMEL, dtype=acc_dtype))
        acc, scratch = buffers[acc_dtype]
        for lo in range(0, entry.numel, BLOCK_NUMEL):
            hi = min(lo + BLOCK_NUMEL, entry.numel)
            yield entry, lo, hi, weighted_sum_(acc[: hi - lo], ((row[lo:hi], w) for row, w in rows), scratch)


def stream_elementwise(
    entries: Iterable[Entry],
    base: Mapping[str, Tensor] | None,
    sources: Sequence[Mapping[str, Tensor]],
    method: str,
    weights: Sequence[float],
    options: Mapping[str, Any],
) -> Iterator[tuple[Entry, Tensor]]:
    """An element-wise method (:mod:`ckptavg.methods.elementwise`) over tensors held elsewhere,
    one tensor at a time (memory: the inputs' and the base's copies of one tensor, and the result);
    integer and bool tensors come from the base (else from the first input)."""
    from .methods.elementwise import apply_elementwise

    for entry in entries:
        if not is_averaged(entry.dtype):
            yield entry, local_tensor((base or sources[0])[entry.name])
            continue
        tensors = [local_tensor(s[entry.name]) for s in sources]
        origin = None if base is None else local_tensor(base[entry.name])
        yield entry, apply_elementwise(method, entry.name, origin, tensors, weights, options)


def block_views(
    block: Block, values: Tensor, origin: int, tensors: Mapping[str, Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Matching views of each piece of ``block``: in ``values`` (whose element 0 is element
    ``origin`` of the group) and in the flattened ``tensors``."""
    inside = [values[p.offset - origin : p.offset - origin + p.length] for p in block.pieces]
    outside = [tensors[p.name][p.start : p.start + p.length] for p in block.pieces]
    return inside, outside


def scatter_block(block: Block, values: Tensor, flat_out: Mapping[str, Tensor]) -> None:
    """Copy a block's values (indexed from ``block.lo``) into the flattened output tensors."""
    inside, outside = block_views(block, values, block.lo, flat_out)
    torch._foreach_copy_(outside, inside)


class PendingCopy:
    """The outcome of a snapshot copy: the name of a tensor holding NaN or Inf, or ``None``.

    Known at once for host tensors. For CUDA tensors the copy runs on a side stream, ordered after
    the work already queued by an event, and the verdict is read once the copy has completed: the
    host waits only when it asks for the verdict before then.
    """

    def __init__(
        self,
        verdict: str | None = None,
        *,
        done: Iterable[tuple[torch.device, Any]] = (),
        flags: Iterable[tuple[list[str], Tensor]] = (),
    ):
        self._verdict = verdict
        self._done = list(done)  # (device, CUDA event) per device
        self._flags = list(flags)  # (names, pinned per-tensor max |x|) per device

    @property
    def in_flight(self) -> bool:
        return bool(self._done)

    def ready(self) -> bool:
        """Whether the copy has completed (never waits)."""
        return all(event.query() for _, event in self._done)

    def order_before_update(self) -> None:
        """Make each device's current stream wait for the copy (on the device: the host goes on),
        so that an in-place update queued next cannot change the tensors while they are read."""
        for device, event in self._done:
            torch.cuda.current_stream(device).wait_event(event)

    def verdict(self) -> str | None:
        """The outcome, waiting for the copy to complete if it is still running."""
        if self._done:
            for _, event in self._done:
                event.synchronize()
            self._done = []
            for names, maxima in self._flags:
                finite = maxima.isfinite().tolist()
                if not all(finite):
                    self._verdict = names[finite.index(False)]
                    break
        return self._verdict


_SIDE_STREAMS: dict[torch.device, Any] = {}


def _side_stream(device: torch.device) -> Any:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@torch.no_grad()
def copy_snapshot(
    layout: Layout,
    tensors: Mapping[str, Tensor],
    buffers: Mapping[torch.dtype, Tensor],
    views: Mapping[str, Tensor] | None = None,
) -> PendingCopy:
    """Copy ``tensors`` into the flat ``buffers`` (``views``: ``layout.views(buffers)``, which a
    store keeps per buffer: building them costs more than copying a small tensor).

    Host tensors: a plain copy, one fused ``_foreach_copy_`` over the tensors. Whether the values
    are finite is checked where it matters, when a merge reads them: :func:`merge_blocks` checks
    every output block while it is in cache, and the window drops a snapshot that made one
    non-finite. (Checking here cost a second pass over every block of every snapshot.)

    CUDA tensors: see :func:`_copy_from_cuda`: asynchronous, on a side stream, and checked on
    the device, which costs the host nothing.
    """
    local = {name: local_tensor(t) for name, t in tensors.items()}  # no_grad: no detach needed
    if local and all(t.is_cuda for t in local.values()):
        return _copy_from_cuda(layout, {n: t.reshape(-1) for n, t in local.items()}, buffers)
    views = views if views is not None else layout.views(buffers)
    names = [name for name, view in views.items() if view.numel()]
    if names:  # a rank of a spread window may hold no slice
        torch._foreach_copy_([views[n] for n in names], [local[n] for n in names])
    return PendingCopy(None)


class NonFiniteBlock(Exception):
    """A merge's output block holds NaN or Inf (raised by :func:`merge_blocks`, before the block
    is written anywhere else; the window then finds the snapshots responsible)."""

    def __init__(self, dtype: torch.dtype, block: Block):
        super().__init__(f"the merge of a {dtype} block is not finite")
        self.dtype, self.block = dtype, block


def non_finite_tensor(block: Block, values: Tensor) -> str | None:
    """The name of a tensor whose piece of ``block`` holds NaN or Inf in ``values`` (one stored
    row of the block), or ``None``."""
    for piece in block.pieces:
        start = piece.offset - block.lo
        if not bool(values[start : start + piece.length].isfinite().all()):
            return piece.name
    return None


def is_finite_block(values: Tensor) -> bool:
    """Whether a block just computed (still in cache) is finite: a finite sum proves every element
    finite; a non-finite one (NaN/Inf, or an overflow of huge but finite values) is confirmed
    element by element."""
    return bool(values.sum().isfinite()) or bool(values.isfinite().all())


def _copy_from_cuda(
    layout: Layout, sources: Mapping[str, Tensor], buffers: Mapping[torch.dtype, Tensor]
) -> PendingCopy:
    """Device-to-host copies into (pinned) ``buffers`` on a side stream per device, after an
    event on the current stream; no host synchronisation. The finiteness check runs on the
    device too: one fused max-|x| per tensor (``_foreach_norm(inf)``, which never overflows and
    propagates NaN), copied to pinned memory with the data."""
    devices = sorted({s.device for s in sources.values()}, key=str)
    done, flags = [], []
    for device in devices:
        side = _side_stream(device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            side.wait_event(ready)
            for dtype, blocks in layout.blocks.items():
                for block in blocks:
                    dst, src = block_views(block, buffers[dtype], 0, sources)
                    for d, s in zip(dst, src, strict=True):
                        if s.device == device:
                            d.copy_(s, non_blocking=True)
            checked = [(n, s) for n, s in sources.items() if s.device == device and is_averaged(s.dtype) and s.numel()]
            if checked:
                maxima = torch.stack(
                    [m.float() for m in torch._foreach_norm([s for _, s in checked], ord=float("inf"))]
                )
                host = torch.empty(len(checked), dtype=torch.float32, pin_memory=True)
                host.copy_(maxima, non_blocking=True)
                flags.append(([n for n, _ in checked], host))
            event = torch.cuda.Event()
            event.record(side)
            done.append((device, event))
        for s in sources.values():
            if s.device == device:
                s.record_stream(side)  # temporaries (flattened non-contiguous tensors) outlive the copy
    return PendingCopy(done=done, flags=flags)
