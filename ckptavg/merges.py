"""Every merge is a vector of coefficients over the stored snapshots, oldest to newest.

These functions only choose the coefficients; one weighted-sum kernel (:mod:`ckptavg.kernels`)
applies any of them. Formulas (see the PMA paper, arXiv 2505.12082) for snapshots
``M_1`` (oldest) .. ``M_N`` (newest):

- SMA: ``w_i = 1 / N``
- WMA: ``w_i = i / (1 + 2 + ... + N)`` (linear, newest heaviest)
- EMA: ``M^(1) = M_1``, ``M^(i) = alpha * M_i + (1 - alpha) * M^(i-1)``, so
  ``w_1 = (1 - alpha)^(N-1)`` and ``w_i = alpha * (1 - alpha)^(N-i)`` for ``i >= 2``.

>>> sma(4)
[0.25, 0.25, 0.25, 0.25]
>>> wma(3)
[0.16666666666666666, 0.3333333333333333, 0.5]
>>> [round(w, 3) for w in ema(3, alpha=0.5)]
[0.25, 0.25, 0.5]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

Method = Union[str, Sequence[float]]
"""A merge method name (``"sma"``, ``"wma"``, ``"ema"``) or an explicit weight list."""

DEFAULT_ALPHA = 0.2


def _check_count(n: int) -> None:
    if n < 1:
        raise ValueError("cannot merge an empty window: take at least one snapshot first")


def sma(n: int) -> list[float]:
    """Simple moving average: equal weights."""
    _check_count(n)
    return [1.0 / n] * n


def wma(n: int) -> list[float]:
    """Weighted moving average: weight proportional to position, newest heaviest."""
    _check_count(n)
    total = n * (n + 1) / 2
    return [i / total for i in range(1, n + 1)]


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return alpha


def ema(n: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """PMA's exponential moving average, seeded with the oldest snapshot."""
    _check_count(n)
    alpha = check_alpha(alpha)
    weights = [alpha * (1.0 - alpha) ** (n - i) for i in range(1, n + 1)]
    weights[0] = (1.0 - alpha) ** (n - 1)
    return weights


def normalize(weights: Sequence[float], n: int) -> list[float]:
    """An explicit weight list, scaled to sum to 1. Negative entries are allowed (extrapolation);
    the sum must be a positive, finite number."""
    _check_count(n)
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be numbers, got {weights!r}") from None
    if len(values) != n:
        raise ValueError(f"expected {n} weights (one per stored snapshot, oldest first), got {len(values)}")
    try:
        total, magnitude = math.fsum(values), math.fsum(abs(v) for v in values)
    except OverflowError:
        raise ValueError(f"weights {values} overflow when summed; scale them down") from None
    if not all(math.isfinite(v) for v in values) or not math.isfinite(total) or not total > 0.0:
        raise ValueError(f"weights must be finite and sum to a positive number, got {values} (sum {total})")
    if total < 1e-6 * magnitude:
        raise ValueError(
            f"weights {values} nearly cancel (sum {total:.3g}, total magnitude {magnitude:.3g}): scaled to sum to 1 they "
            "would amplify rounding errors beyond any precision; give weights whose sum is not tiny next to their size"
        )
    return [v / total for v in values]


METHODS: dict[str, Callable[..., list[float]]] = {"sma": sma, "wma": wma, "ema": ema}


def coefficients(method: Method, n: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """The coefficient vector of ``method`` over ``n`` snapshots, oldest first; sums to 1."""
    if isinstance(method, str):
        key = method.lower()
        if key not in METHODS:
            raise ValueError(f"unknown merge method {method!r}; expected one of {sorted(METHODS)} or a list of weights")
        if key == "ema":
            return ema(n, alpha)
        check_alpha(alpha)  # validated for every method, so a typo is not silently ignored
        return METHODS[key](n)
    if isinstance(method, Sequence) or hasattr(method, "__len__"):
        return normalize(method, n)  # type: ignore[arg-type]
    raise ValueError(f"merge method must be a name {sorted(METHODS)} or a list of weights, got {method!r}")
