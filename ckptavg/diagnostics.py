"""Is averaging safe for these snapshots? A correlation diagnostic over a window, streamed.

The seed observation: snapshots whose weights are highly correlated (cosine above 0.9) average
well; snapshots of separately trained models, or on both sides of a loss spike, do not. One pass
over the stored blocks accumulates, per tensor, the Gram matrix of the snapshots' differences
from the newest one (``R_i = M_i - M_N``, exact in the stored precision for nearby snapshots),
``<R_i, M_N>`` and ``|M_N|^2``: each block's products as one fp32 GEMM (fp64 for fp64
windows), summed across blocks in fp64: weight cosines to about 1e-5, deviation cosines (which
cancel the mean) to about 1e-3, far below any threshold. About ten merges' worth of time. Every figure below is a linear transform of those:

- ``weight_cosine[i][j]``: cosine of the weights of snapshots i and j (the verdict's measure);
- ``deviation_cosine[i][j]``: cosine of their deviations from the window's mean;
- ``update_cosine[k]``: cosine of consecutive updates ``M_{k+1} - M_k`` and ``M_{k+2} - M_{k+1}``;
- ``relative_spread``: the largest distance between two snapshots over the mean weight norm.

Memory: one block per snapshot (``N x 4 MiB``) and ``N x N`` numbers per tensor; never a model per
snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .layout import Block, is_averaged

AVERAGE_ABOVE = 0.9
"""Every pair of snapshots this correlated (weight cosine): simple averaging is expected to work."""


@dataclass
class Correlation:
    """The diagnostic of one window (see the module docstring); ``verdict`` is one of
    ``"average"``, ``"newest"`` (average only the newest ``newest_correlated`` snapshots, or
    weight toward them) and ``"do not average"``, with ``reason``."""

    steps: list[int]
    weight_cosine: list[list[float]]
    deviation_cosine: list[list[float]]
    update_cosine: list[float]
    relative_spread: float
    verdict: str
    reason: str
    newest_correlated: int
    per_tensor: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The few numbers worth logging: the lowest weight cosine, the mean update cosine, the
        mean deviation correlation between different snapshots, the spread, and the verdict."""
        n = len(self.steps)
        off = [self.deviation_cosine[i][j] for i in range(n) for j in range(n) if i != j]
        return {
            "min_weight_cosine": min((min(row) for row in self.weight_cosine), default=1.0),
            "update_cosine": sum(self.update_cosine) / len(self.update_cosine) if self.update_cosine else float("nan"),
            "deviation_corr": sum(off) / len(off) if off else float("nan"),
            "relative_spread": self.relative_spread,
            "verdict": self.verdict,
        }


class _Gram:
    """``R R^T``, ``R M_N`` and ``|M_N|^2`` of one tensor, accumulated over its pieces."""

    def __init__(self, n: int):
        self.g = torch.zeros(n, n, dtype=torch.float64)
        self.v = torch.zeros(n, dtype=torch.float64)
        self.s = torch.zeros((), dtype=torch.float64)

    def add(self, diff: Tensor, newest: Tensor) -> None:
        """One piece: ``diff`` (``[N, n]``, the rows minus the newest) and the newest row. The
        products run in the rows' precision (fp32 GEMM, or fp64 for fp64 windows) and are summed
        across pieces in fp64."""
        self.g += (diff @ diff.T).double()
        self.v += (diff @ newest).double()
        self.s += (newest @ newest).double()

    def merge(self, other: _Gram) -> None:
        self.g += other.g
        self.v += other.v
        self.s += other.s

    def raw(self) -> Tensor:
        """``K = M M^T`` from the accumulated terms."""
        return self.g + self.v[:, None] + self.v[None, :] + self.s


def _cosines(gram: Tensor) -> Tensor:
    norms = gram.diagonal().clamp_min(0).sqrt()
    scale = norms[:, None] * norms[None, :]
    return torch.where(scale > 0, gram / scale.where(scale > 0, torch.ones_like(scale)), torch.zeros_like(gram))


def correlation_of(steps: list[int], blocks: Iterable[tuple[torch.dtype, Block, list[Tensor]]]) -> Correlation:
    """The diagnostic from a stream of ``(dtype, block, rows)`` (see ``SnapshotStore.iter_blocks``)."""
    n = len(steps)
    per_tensor: dict[str, _Gram] = {}
    for dtype, block, rows in blocks:
        if not is_averaged(dtype):
            continue
        work = torch.float64 if dtype == torch.float64 else torch.float32
        newest = rows[-1].to(work)
        diff = torch.empty(len(rows), newest.numel(), dtype=work)
        for row, out in zip(rows, diff, strict=True):
            torch.sub(row.to(work), newest, out=out)  # exact for nearby snapshots (Sterbenz's lemma)
        for piece in block.pieces:
            lo = piece.offset - block.lo
            per_tensor.setdefault(piece.name, _Gram(n)).add(
                diff[:, lo : lo + piece.length], newest[lo : lo + piece.length]
            )
    total = _Gram(n)
    for gram in per_tensor.values():
        total.merge(gram)
    return _summarise(steps, total, per_tensor)


def _summarise(steps: list[int], total: _Gram, per_tensor: dict[str, _Gram]) -> Correlation:
    n = len(steps)
    raw = total.raw()
    weight_cos = _cosines(raw)
    centering = torch.eye(n, dtype=torch.float64) - 1.0 / n
    deviation_cos = _cosines(centering @ total.g @ centering)
    differences = (
        (torch.eye(n, dtype=torch.float64)[1:] - torch.eye(n, dtype=torch.float64)[:-1])
        if n > 1
        else torch.zeros(0, n, dtype=torch.float64)
    )
    update_gram = differences @ total.g @ differences.T
    update_cos = _cosines(update_gram)
    consecutive = [float(update_cos[k, k + 1]) for k in range(n - 2)]
    norms = raw.diagonal().clamp_min(0).sqrt()
    distances = (raw.diagonal()[:, None] + raw.diagonal()[None, :] - 2 * raw).clamp_min(0).sqrt()
    spread = float(distances.max() / norms.mean()) if n and float(norms.mean()) > 0 else 0.0
    newest = 1
    while newest < n and bool((weight_cos[n - newest - 1 :, n - newest - 1 :] >= AVERAGE_ABOVE).all()):
        newest += 1
    lowest = float(weight_cos.min()) if n else 1.0
    if newest == n:
        verdict, reason = (
            "average",
            f"every pair of snapshots has weight cosine >= {AVERAGE_ABOVE} (lowest {lowest:.4f})",
        )
    elif newest >= 2:
        verdict, reason = (
            "newest",
            (
                f"only the newest {newest} snapshots are correlated >= {AVERAGE_ABOVE} (lowest over all {lowest:.4f}): average "
                f"those (merge(..., before=) or weights on the newest), not the whole window"
            ),
        )
    else:
        verdict, reason = (
            "do not average",
            (
                f"the newest snapshot's weights have cosine {float(weight_cos[-1, -2]):.4f} < {AVERAGE_ABOVE} with the one before: "
                "they are not one basin (separately trained models, or both sides of a divergence); average predictions "
                "(an ensemble) or learn a merge (np_merge) instead"
            ),
        )
    tensors = {}
    for name, gram in per_tensor.items():
        cos = _cosines(gram.raw())
        ucos = _cosines(differences @ gram.g @ differences.T)
        tensors[name] = {
            "min_weight_cosine": float(cos.min()),
            "update_cosine": float(sum(ucos[k, k + 1] for k in range(n - 2)) / (n - 2)) if n > 2 else float("nan"),
        }
    return Correlation(
        steps=list(steps),
        weight_cosine=weight_cos.tolist(),
        deviation_cosine=deviation_cos.tolist(),
        update_cosine=consecutive,
        relative_spread=spread,
        verdict=verdict,
        reason=reason,
        newest_correlated=newest,
        per_tensor=tensors,
    )
