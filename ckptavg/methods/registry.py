"""The merge-method registry: every merge is a vector of coefficients over the stored snapshots.

A method is one function in its own module, registered by name with :func:`merge_method`. It
receives a :class:`MergeContext` (the snapshots' steps, and an ``evaluate`` callable for methods
that choose on held-out data) and returns one coefficient per snapshot, oldest first. Its
keyword-only parameters are its options: their names, defaults and annotations are the schema
that every option given by a user is checked against, before any arithmetic.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from .spec import MergeSpec

from torch import Tensor

Method = Union[str, "MergeSpec", Sequence[float]]
"""A registered merge method's name, a :class:`~ckptavg.methods.MergeSpec` (a method with its
options), or an explicit weight list (one per snapshot, oldest first)."""

Evaluate = Callable[[Mapping[str, Tensor]], float]
"""Scores a merged state dict on held-out data; lower is better."""

DEFAULT_ALPHA = 0.2


@dataclass(frozen=True)
class MergeContext:
    """What a method may look at: the steps of the snapshots (oldest first) and, for methods that
    choose on held-out data, ``score``: merges the snapshots with a coefficient vector and
    returns the user's ``evaluate`` of the result (lower is better)."""

    steps: tuple[int, ...]
    score: Callable[[Sequence[float]], float] | None = None

    @property
    def n(self) -> int:
        return len(self.steps)

    def require_score(self, method: str) -> Callable[[Sequence[float]], float]:
        if self.score is None:
            raise ValueError(
                f"merge method {method!r} chooses on held-out data: give evaluate=, a function from a merged state dict "
                "to a number, lower is better (ckptavg.evaluator builds one from a model, a loss and batches)"
            )
        return self.score


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable[..., Sequence[float]]
    options: Mapping[str, inspect.Parameter]

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.function) or "").split("\n")[0]


_METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str) -> Callable[[Callable[..., Sequence[float]]], Callable[..., Sequence[float]]]:
    """Register ``function(ctx, *, option=default, ...)`` as the merge method ``name``."""

    def register(function: Callable[..., Sequence[float]]) -> Callable[..., Sequence[float]]:
        key = name.lower()
        if key in _METHODS:
            raise ValueError(
                f"a merge method named {key!r} is already registered ({_METHODS[key].function.__module__})"
            )
        parameters = list(inspect.signature(function).parameters.values())
        if not parameters or parameters[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise TypeError(f"merge method {key!r}: the first parameter must take the MergeContext")
        options = parameters[1:]
        loose = [p.name for p in options if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        if loose:
            raise TypeError(f"merge method {key!r}: options must be keyword-only, got {loose}")
        _METHODS[key] = MergeMethod(key, function, {p.name: p for p in options})
        return function

    return register


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MergeMethod:
    key = name.lower() if isinstance(name, str) else name
    if key not in _METHODS:
        raise ValueError(f"unknown merge method {name!r}; expected one of {method_names()} or a list of weights")
    return _METHODS[key]


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return alpha


def check_options(method: Method, options: Mapping[str, Any]) -> None:
    """Refuse unknown options and options of the wrong type, naming them (nothing is computed)."""
    if not isinstance(method, str):
        if options:
            raise ValueError(f"explicit weights take no options, got {sorted(options)}")
        return
    spec = get_method(method)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(
            f"merge method {spec.name!r} has no option {unknown[0]!r}; its options: {sorted(spec.options) or 'none'}"
        )
    missing = [n for n, p in spec.options.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise ValueError(f"merge method {spec.name!r} needs the option {missing[0]!r}")
    for name, value in options.items():
        _check_type(spec.name, name, value, spec.options[name].annotation)


def _check_type(method: str, name: str, value: Any, annotation: Any) -> None:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = {part.strip() for part in str(text).split("|")}
    if value is None and "None" in kinds:
        return
    if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return
    if "str" in kinds and isinstance(value, str):
        return
    if "bool" in kinds and isinstance(value, bool):
        return
    if any(k.startswith(("Callable", "Evaluate")) for k in kinds) and callable(value):
        return
    if kinds & {"Any", "inspect._empty", "_empty"}:
        return
    raise ValueError(f"merge method {method!r}: option {name!r} must be {text}, got {value!r}")


def coefficients(
    method: Method,
    steps: int | Sequence[int],
    alpha: float = DEFAULT_ALPHA,
    *,
    score: Callable[[Sequence[float]], float] | None = None,
    **options: Any,
) -> list[float]:
    """The coefficient vector of ``method`` over snapshots at ``steps`` (or ``n`` evenly spaced
    ones), oldest first; sums to 1. ``alpha`` is ``"ema"``'s option (checked for every method,
    so that a typo is not silently ignored); other options go by name. ``score`` (see
    :class:`MergeContext`) is given by a window for methods that choose on held-out data."""
    from .spec import MergeSpec  # built on this module

    if isinstance(method, MergeSpec):
        if options or alpha != DEFAULT_ALPHA:
            raise ValueError(f"{method!r} carries its own options; give them to the MergeSpec, not here")
        spec_options = dict(method.options)
        method, options = method.method, spec_options
    check_alpha(alpha)
    steps = tuple(range(steps)) if isinstance(steps, int) else tuple(int(s) for s in steps)
    if not steps:
        raise ValueError("cannot merge an empty window: take at least one snapshot first")
    if not isinstance(method, str):
        if not (isinstance(method, Sequence) or hasattr(method, "__len__")):
            raise ValueError(f"merge method must be a name {method_names()} or a list of weights, got {method!r}")
        check_options(method, options)
        return normalize(method, len(steps))  # type: ignore[arg-type]  # a sized sequence of numbers, checked there
    spec = get_method(method)
    if "alpha" in spec.options and "alpha" not in options:
        options = {**options, "alpha": alpha}
    check_options(method, options)
    weights = [float(w) for w in spec.function(MergeContext(steps, score), **options)]
    if len(weights) != len(steps) or not all(math.isfinite(w) for w in weights):
        raise RuntimeError(f"merge method {spec.name!r} returned {weights} for {len(steps)} snapshots")
    return normalize(weights, len(steps))


def normalize(weights: Sequence[float], n: int) -> list[float]:
    """An explicit weight list, scaled to sum to 1. Negative entries are allowed (extrapolation);
    the sum must be a positive, finite number."""
    if n < 1:
        raise ValueError("cannot merge an empty window: take at least one snapshot first")
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
