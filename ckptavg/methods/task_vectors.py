"""Merges of task vectors ``model_i - base``: task arithmetic, TIES, DARE, Model Breadcrumbs.

For inputs ``M_1 .. M_N`` fine-tuned from ``B`` with weights ``w_i``, each method sparsifies the
task vectors ``d_i = M_i - B`` (or not), weights them, optionally keeps only the entries whose
sign agrees with the elected sign (TIES), sums, optionally divides by the weight that reached each
entry (``normalize``), scales by ``lambda`` and adds the base. The definitions follow the papers
and mergekit's ``generalized_task_arithmetic`` (its defaults per method included), so configs
carry over.

>>> import torch
>>> from ckptavg.methods.elementwise import apply_elementwise
>>> base = torch.zeros(4)
>>> a, b = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([1.0, 1.0, -0.5, 3.0])
>>> apply_elementwise("task_arithmetic", "w", base, [a, b], [1.0, 1.0], {"lambda": 0.5})
tensor([ 1.0000, -0.5000,  0.0000,  1.5000])
>>> apply_elementwise("ties", "w", base, [a, b], [1.0, 1.0], {"density": 1.0})  # sign election, disjoint mean
tensor([ 1.0000, -2.0000,  0.5000,  3.0000])
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .elementwise import TensorContext, elementwise_method


def magnitude_thresholds(chunks: Callable[[], Iterable[Sequence[Tensor]]], numel: int, density: float) -> list[float]:
    """For each of several tensors given as matching chunks (``chunks()`` yields a list with one
    chunk of each, anew on each call), the ``k``-th largest ``|x|``, ``k = max(1, int(density *
    numel))``: exact, in the memory of one chunk each, in two passes over the data.

    A radix selection over the bits: for ``x >= 0`` the float32 bit pattern read as an integer is
    ordered like ``x``, so two counting passes (the high 16 bits, then the low 16 bits within the
    chosen bucket) find it; no sort and no full-size copy (``torch.kthvalue`` copies its input and
    is several times slower on large tensors)."""
    k = max(1, int(density * numel))
    high: list[Tensor] = []
    for group in chunks():
        per_chunk = [torch.bincount(_magnitude_bits(c) >> 16, minlength=1 << 15) for c in group]
        high = per_chunk if not high else [h + c for h, c in zip(high, per_chunk, strict=True)]
    found = [_kth_from_top(h, k) for h in high]
    low = [torch.zeros(1 << 16, dtype=torch.int64) for _ in found]
    for group in chunks():
        for tally, chunk, (bucket, _) in zip(low, group, found, strict=True):
            bits = _magnitude_bits(chunk)
            tally += torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    patterns = [(b << 16) | _kth_from_top(tally, rank)[0] for tally, (b, rank) in zip(low, found, strict=True)]
    return torch.tensor(patterns, dtype=torch.int32).view(torch.float32).tolist()


def _magnitude_bits(chunk: Tensor) -> Tensor:
    return chunk.reshape(-1).float().abs().view(torch.int32).long()


def _kth_from_top(counts: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th largest value, and that value's rank within the bin."""
    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, k))
    return counts.numel() - 1 - index, k - (int(from_top[index - 1]) if index else 0)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the ``gamma`` share largest in magnitude, then the smallest, keeping ``density``."""
    if density >= 1.0:
        return torch.ones_like(delta)
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[torch.sort(delta.abs().reshape(-1)).indices[bottom : bottom + keep]] = 1
    return mask.view_as(delta)


def random_mask(delta: Tensor, density: float, seed: int, name: str, index: int) -> Tensor:
    """DARE's Bernoulli(``density``) keep-mask, from a generator seeded by (seed, tensor name, input):
    the same bits on every run, in every process, whatever else was drawn before."""
    if density >= 1.0:
        return torch.ones_like(delta)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + index) % 2**63)
    return torch.bernoulli(torch.full_like(delta, density), generator=generator)


def combine(
    ctx: TensorContext,
    *,
    elect_sign: bool,
    normalize: bool,
    lambda_: float,
    thresholds: Sequence[float] | None = None,
    deltas: Sequence[Tensor] | None = None,
) -> Tensor:
    """Chunk by chunk: the task vectors (``deltas`` when given, already sparsified; else
    ``input - base``, each trimmed to its magnitude threshold when given), weighted, kept where
    they agree with the elected sign (TIES: the sign of the weighted sum), summed, divided by the
    weight that reached each entry (normalize), scaled by ``lambda`` and added to the base."""
    weights = ctx.weights

    def merge(base: Tensor | None, chunks: list[Tensor]) -> Tensor:
        assert base is not None
        for i, delta in enumerate(chunks):
            if deltas is None:
                delta.sub_(base)
            if thresholds is not None:
                delta.mul_(delta.abs() >= thresholds[i])
            delta.mul_(weights[i])
        total = torch.stack(chunks).sum(0)
        if elect_sign:
            positive = total >= 0
            total.zero_()
            divisor = torch.zeros_like(total)
            for delta, weight in zip(chunks, weights, strict=True):
                agree = ((delta > 0) == positive) & (delta != 0)  # a zero entry has no sign
                total.add_(delta * agree)
                divisor.add_(agree, alpha=weight)
            divisor[divisor == 0] = 1
        else:
            divisor = torch.full_like(total, math.fsum(weights))
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            total.div_(divisor)
        return base.add_(total, alpha=lambda_)

    return ctx.chunkwise(merge, *([deltas] if deltas is not None else []))


def _deltas(ctx: TensorContext) -> list[Tensor]:
    assert ctx.base is not None
    return [t - ctx.base for t in ctx.tensors]


@elementwise_method("task_arithmetic", base=True)
def task_arithmetic(ctx: TensorContext, *, lambda_: float = 1.0, normalize: bool = False) -> Tensor:
    """Task arithmetic (arXiv 2212.04089): ``B + lambda sum_i w_i (M_i - B)``; negative weights
    subtract a task (forgetting by negation)."""
    return combine(ctx, elect_sign=False, normalize=normalize, lambda_=lambda_)


@elementwise_method("ties", base=True)
def ties(ctx: TensorContext, *, density: float = 1.0, lambda_: float = 1.0, normalize: bool = True) -> Tensor:
    """TIES (arXiv 2306.01708): trim each task vector to its top ``density`` by magnitude, elect
    each entry's sign by total mass, average the agreeing entries (disjoint mean)."""
    if density >= 1.0:
        return combine(ctx, elect_sign=True, normalize=normalize, lambda_=lambda_)
    if density <= 0.0:
        thresholds = [math.inf] * len(ctx.stored_tensors)
    else:
        numel = ctx.stored_tensors[0].numel()
        thresholds = magnitude_thresholds(lambda: _task_vector_chunks(ctx), numel, density)
    return combine(ctx, elect_sign=True, normalize=normalize, lambda_=lambda_, thresholds=thresholds)


def _task_vector_chunks(ctx: TensorContext) -> Iterator[list[Tensor]]:
    for _, base, chunks in ctx.chunks():
        assert base is not None
        yield [chunk.sub_(base) for chunk in chunks]


def _dare(ctx: TensorContext, density: float, seed: int) -> list[Tensor]:
    """Drop each entry with probability ``1 - density`` and rescale the rest so that the task
    vector's L1 norm is kept (mergekit's rescaling; ``1 / density`` in expectation)."""
    out = []
    for i, delta in enumerate(_deltas(ctx)):
        masked = delta * random_mask(delta, density, seed, ctx.name, i)
        before, after = delta.abs().sum(), masked.abs().sum()
        out.append(masked if before < 1e-7 or after < 1e-7 else masked * (before / after))
    return out


@elementwise_method("dare_linear", base=True)
def dare_linear(
    ctx: TensorContext, *, density: float = 1.0, lambda_: float = 1.0, normalize: bool = False, seed: int = 0
) -> Tensor:
    """DARE (arXiv 2311.03099) then task arithmetic: random drop with rescale, summed."""
    return combine(ctx, elect_sign=False, normalize=normalize, lambda_=lambda_, deltas=_dare(ctx, density, seed))


@elementwise_method("dare_ties", base=True)
def dare_ties(
    ctx: TensorContext, *, density: float = 1.0, lambda_: float = 1.0, normalize: bool = False, seed: int = 0
) -> Tensor:
    """DARE (arXiv 2311.03099) then TIES's sign election and disjoint merge."""
    return combine(ctx, elect_sign=True, normalize=normalize, lambda_=lambda_, deltas=_dare(ctx, density, seed))


@elementwise_method("breadcrumbs", base=True)
def breadcrumbs(
    ctx: TensorContext, *, density: float = 0.9, gamma: float = 0.01, lambda_: float = 1.0, normalize: bool = False
) -> Tensor:
    """Model Breadcrumbs (arXiv 2312.06795): drop the ``gamma`` largest and the smallest entries of
    each task vector (keeping ``density``), then sum."""
    deltas = [d * outlier_mask(d, density, gamma) for d in _deltas(ctx)]
    return combine(ctx, elect_sign=False, normalize=normalize, lambda_=lambda_, deltas=deltas)
