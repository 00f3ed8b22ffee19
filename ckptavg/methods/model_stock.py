"""Model Stock (arXiv 2403.19522): interpolate between the base and the average of the fine-tuned
models with a per-tensor ratio from the angle between their task vectors.

>>> import torch
>>> from ckptavg.methods.elementwise import apply_elementwise
>>> base = torch.zeros(2)
>>> apply_elementwise("model_stock", "w", base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1.0, 1.0], {})
tensor([0., 0.])
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .elementwise import TensorContext, elementwise_method


@elementwise_method("model_stock", base=True, min_inputs=2)
def model_stock(ctx: TensorContext) -> Tensor:
    """``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise cosine between the task
    vectors; the result is ``t * mean(M_i) + (1 - t) * B`` (orthogonal task vectors: the base)."""
    assert ctx.base is not None
    base = ctx.base.reshape(-1)
    offsets = [t.reshape(-1) - base for t in ctx.tensors]
    cosines = [
        (torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).clamp(min=1e-6)).clamp(-1, 1)
        for a, b in itertools.combinations(offsets, 2)
    ]
    cos = torch.stack(cosines).mean()
    n = len(ctx.tensors)
    denominator = 1 + (n - 1) * cos
    ratio = torch.zeros_like(cos) if denominator.abs() < 1e-6 else n * cos / denominator
    average = sum(ctx.tensors) / n
    return ratio * average + (1 - ratio) * ctx.base
