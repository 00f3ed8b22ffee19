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

import zlib

import torch
from torch import Tensor

from .elementwise import TensorContext, elementwise_method


def trim_(delta: Tensor, density: float) -> Tensor:
    """Keep, in place, the ``density`` share of the entries largest in magnitude (at least one):
    every entry at least as large as the ``k``-th largest (a linear-time selection, not a sort;
    entries tied with it are kept too)."""
    if density >= 1.0:
        return delta
    if density <= 0.0 or delta.numel() == 0:
        return delta.zero_()
    k = max(1, int(density * delta.numel()))
    magnitude = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, delta.numel() - k + 1).values
    return delta.mul_((magnitude >= threshold).view_as(delta))


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


def combine(ctx: TensorContext, deltas: list[Tensor], *, elect_sign: bool, normalize: bool, lambda_: float) -> Tensor:
    """Weight the (sparsified) task vectors, keep the entries agreeing with the elected sign (TIES:
    the sign of the weighted sum), sum, divide by the weight that reached each entry (normalize),
    scale by ``lambda`` and add the base."""
    assert ctx.base is not None
    stacked = torch.stack(deltas)
    weights = torch.tensor(ctx.weights, dtype=stacked.dtype).view(-1, *[1] * ctx.base.dim())
    stacked = stacked * weights
    if elect_sign:
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
        agree = (stacked.sign() == elected).to(stacked.dtype)
        mixed = (stacked * agree).sum(0)
        divisor = (weights * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = weights.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return ctx.base + lambda_ * mixed


def _deltas(ctx: TensorContext) -> list[Tensor]:
    assert ctx.base is not None
    return [t - ctx.base for t in ctx.tensors]


@elementwise_method("task_arithmetic", base=True)
def task_arithmetic(ctx: TensorContext, *, lambda_: float = 1.0, normalize: bool = False) -> Tensor:
    """Task arithmetic (arXiv 2212.04089): ``B + lambda sum_i w_i (M_i - B)``; negative weights
    subtract a task (forgetting by negation)."""
    return combine(ctx, _deltas(ctx), elect_sign=False, normalize=normalize, lambda_=lambda_)


@elementwise_method("ties", base=True)
def ties(ctx: TensorContext, *, density: float = 1.0, lambda_: float = 1.0, normalize: bool = True) -> Tensor:
    """TIES (arXiv 2306.01708): trim each task vector to its top ``density`` by magnitude, elect
    each entry's sign by total mass, average the agreeing entries (disjoint mean)."""
    deltas = [trim_(d, density) for d in _deltas(ctx)]
    return combine(ctx, deltas, elect_sign=True, normalize=normalize, lambda_=lambda_)


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
    return combine(ctx, _dare(ctx, density, seed), elect_sign=False, normalize=normalize, lambda_=lambda_)


@elementwise_method("dare_ties", base=True)
def dare_ties(
    ctx: TensorContext, *, density: float = 1.0, lambda_: float = 1.0, normalize: bool = False, seed: int = 0
) -> Tensor:
    """DARE (arXiv 2311.03099) then TIES's sign election and disjoint merge."""
    return combine(ctx, _dare(ctx, density, seed), elect_sign=True, normalize=normalize, lambda_=lambda_)


@elementwise_method("breadcrumbs", base=True)
def breadcrumbs(
    ctx: TensorContext, *, density: float = 0.9, gamma: float = 0.01, lambda_: float = 1.0, normalize: bool = False
) -> Tensor:
    """Model Breadcrumbs (arXiv 2312.06795): drop the ``gamma`` largest and the smallest entries of
    each task vector (keeping ``density``), then sum."""
    deltas = [d * outlier_mask(d, density, gamma) for d in _deltas(ctx)]
    return combine(ctx, deltas, elect_sign=False, normalize=normalize, lambda_=lambda_)
