"""Schedule-matched merges (WSM, arXiv 2507.17634): a learning-rate decay, emulated by merging.

Averaging checkpoints of a constant-LR run weighs each update by how many merged snapshots come
after it. With ``c_j = f(t_j) - f(t_{j+1})`` the update made after snapshot ``j`` gets the weight
``f(t_{j+1})``, exactly as if the learning rate had been multiplied by ``f`` from the oldest
snapshot on: the merge emulates the decay ``f`` (``f(0) = 1``, ``f(1) = 0``) over the window.
``shape="linear"`` is SMA.

Positions come from the steps, so uneven spacing (a snapshot skipped, a restore) is handled:
snapshot ``j`` stands for the updates from its step to the next snapshot's, the newest for one
mean interval, and ``t_j`` is the fraction of that span before snapshot ``j``. For evenly spaced
snapshots ``t_j = j / N``, the paper's rule.

>>> from ckptavg.methods import coefficients
>>> coefficients("decay", [10, 20, 30, 40], shape="linear")
[0.25, 0.25, 0.25, 0.25]
>>> [round(c, 4) for c in coefficients("decay", 4, shape="1-sqrt")]
[0.5, 0.2071, 0.1589, 0.134]
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .registry import MergeContext, merge_method

SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "1-sqrt": lambda t: 1.0 - math.sqrt(t),
    "1-square": lambda t: 1.0 - t * t,
}


def positions(steps: tuple[int, ...]) -> list[float]:
    """``t_0 = 0 < t_1 < ... < t_N = 1``: where each snapshot's updates start in the merged span."""
    if len(steps) == 1:
        return [0.0, 1.0]
    last = (steps[-1] - steps[0]) / (len(steps) - 1)  # the newest snapshot stands for one mean interval
    span = steps[-1] - steps[0] + last
    return [(s - steps[0]) / span for s in steps] + [1.0]


@merge_method("decay")
def decay(ctx: MergeContext, *, shape: str | Callable[[float], float] = "linear") -> list[float]:
    """Emulate a learning-rate decay ``shape`` over the window: ``"linear"`` (SMA), ``"cosine"``,
    ``"1-sqrt"``, ``"1-square"``, or any callable ``f`` on [0, 1] with ``f(0) = 1``, ``f(1) = 0``,
    non-increasing."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(
                f"merge method 'decay': shape {shape!r} is not one of {sorted(SHAPES)} (or give a callable)"
            )
        f = SHAPES[shape]
    else:
        f = shape
        if not math.isclose(f(0.0), 1.0, abs_tol=1e-9) or not math.isclose(f(1.0), 0.0, abs_tol=1e-9):
            raise ValueError(
                f"merge method 'decay': shape must have f(0) = 1 and f(1) = 0, got f(0) = {f(0.0)}, f(1) = {f(1.0)}"
            )
    t = positions(ctx.steps)
    weights = [f(a) - f(b) for a, b in zip(t[:-1], t[1:], strict=True)]
    if any(w < -1e-12 for w in weights):
        raise ValueError(f"merge method 'decay': shape must not increase, but it gives weights {weights}")
    return weights
