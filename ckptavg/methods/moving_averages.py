"""The PMA paper's moving averages (arXiv 2505.12082), for snapshots ``M_1`` (oldest) .. ``M_N``.

>>> from ckptavg.methods import coefficients
>>> coefficients("sma", 4)
[0.25, 0.25, 0.25, 0.25]
>>> coefficients("wma", 3)
[0.16666666666666666, 0.3333333333333333, 0.5]
>>> [round(w, 3) for w in coefficients("ema", 3, alpha=0.5)]
[0.25, 0.25, 0.5]
"""

from __future__ import annotations

from .registry import DEFAULT_ALPHA, MergeContext, check_alpha, merge_method


@merge_method("sma")
def sma(ctx: MergeContext) -> list[float]:
    """Simple moving average: ``w_i = 1 / N``."""
    return [1.0 / ctx.n] * ctx.n


@merge_method("wma")
def wma(ctx: MergeContext) -> list[float]:
    """Weighted moving average: ``w_i = i / (1 + ... + N)``, linear, newest heaviest."""
    total = ctx.n * (ctx.n + 1) / 2
    return [i / total for i in range(1, ctx.n + 1)]


@merge_method("ema")
def ema(ctx: MergeContext, *, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """Exponential moving average seeded with the oldest snapshot: ``M^(1) = M_1``,
    ``M^(i) = alpha M_i + (1 - alpha) M^(i-1)``, so ``w_1 = (1 - alpha)^(N-1)`` (the oldest keeps
    the weight of the whole tail) and ``w_i = alpha (1 - alpha)^(N-i)``."""
    alpha = check_alpha(alpha)
    weights = [alpha * (1.0 - alpha) ** (ctx.n - i) for i in range(1, ctx.n + 1)]
    weights[0] = (1.0 - alpha) ** (ctx.n - 1)
    return weights
