"""Merge methods: each chooses a coefficient vector over the stored snapshots (oldest first).

One weighted-sum kernel (:mod:`ckptavg.kernels`) applies any of them. A new method is one module
here and one :func:`merge_method` decorator; see :mod:`ckptavg.methods.registry`.
"""

from . import decay, greedy_soup, model_stock, moving_averages, posthoc, spherical, task_vectors  # noqa: F401  (registers the methods)
from .elementwise import TensorContext, elementwise_method, elementwise_names, is_elementwise
from .registry import (
    DEFAULT_ALPHA,
    Evaluate,
    MergeContext,
    MergeMethod,
    Method,
    check_alpha,
    check_options,
    coefficients,
    get_method,
    merge_method,
    method_names,
    normalize,
)
from .spec import MergeSpec


def sma(n: int) -> list[float]:
    """Simple moving average over ``n`` snapshots."""
    return coefficients("sma", n)


def wma(n: int) -> list[float]:
    """Weighted moving average over ``n`` snapshots: linear, newest heaviest."""
    return coefficients("wma", n)


def ema(n: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """PMA's exponential moving average over ``n`` snapshots, seeded with the oldest."""
    return coefficients("ema", n, alpha)


__all__ = [
    "DEFAULT_ALPHA",
    "TensorContext",
    "elementwise_method",
    "elementwise_names",
    "is_elementwise",
    "Evaluate",
    "MergeContext",
    "MergeMethod",
    "MergeSpec",
    "Method",
    "check_alpha",
    "check_options",
    "coefficients",
    "ema",
    "get_method",
    "merge_method",
    "method_names",
    "normalize",
    "sma",
    "wma",
]
