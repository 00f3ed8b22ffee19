"""Spherical merges: SLERP between two models, and the Karcher (Riemannian) mean of several.

>>> import torch
>>> from ckptavg.methods.elementwise import apply_elementwise
>>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
>>> apply_elementwise("slerp", "w", a, [b], [1.0], {"t": 0.5})  # halfway along the arc, not the chord
tensor([0.7071, 0.7071])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .elementwise import TensorContext, elementwise_method

DOT_THRESHOLD = 0.9995  # nearly parallel (or opposite) unit vectors: linear interpolation instead


def slerp_tensors(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two whole tensors (their directions as unit vectors; the result
    scaled like the linear interpolation of the originals would not be: SLERP's classic form)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    dot = float(torch.dot(a / (na if na > eps else 1), b / (nb if nb > eps else 1)).clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * v0 + (math.sin(t * theta) / sin_theta) * v1


@elementwise_method("slerp", base=True, min_inputs=1, max_inputs=1)
def slerp(ctx: TensorContext, *, t: float = 0.5) -> Tensor:
    """SLERP from the base (``t = 0``) to the other model (``t = 1``), per tensor; nearly parallel
    tensors are interpolated linearly."""
    assert ctx.base is not None
    return slerp_tensors(t, ctx.base, ctx.tensors[0])


@elementwise_method("karcher", base=False, min_inputs=2)
def karcher(ctx: TensorContext, *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The Karcher mean: the point on the unit sphere minimising the weighted squared geodesic
    distances to the inputs' directions (fixed-point iteration, at most ``max_iter`` steps, stopping
    when the tangent step is below ``tol``), scaled by the weighted mean of their norms."""
    total = sum(ctx.weights)
    alphas = [w / total for w in ctx.weights]
    norms = [torch.linalg.vector_norm(t) for t in ctx.tensors]
    valid = [(a, t / n) for a, t, n in zip(alphas, ctx.tensors, norms, strict=True) if n > tol]
    if not valid:
        return torch.zeros_like(ctx.tensors[0])
    weight = sum(a for a, _ in valid)
    units = [(a / weight, u) for a, u in valid]
    mean = sum(a * u for a, u in units)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0][1].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in units:
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        mean = mean / torch.linalg.vector_norm(mean)
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean
