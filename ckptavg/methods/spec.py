"""``MergeSpec``: a merge method and its options, checked once and bound.

Every API that merges takes ``str | MergeSpec | explicit weights``. A name is a method with its
default options; a ``MergeSpec`` carries the options, validated when it is built (so a typo fails
where it is written, not at the end of a run); explicit weights are one number per snapshot.

>>> spec = MergeSpec("ema", alpha=0.5)
>>> [round(w, 3) for w in spec.coefficients(3)]
[0.25, 0.25, 0.5]
>>> MergeSpec("decay", shape="cosnie")
Traceback (most recent call last):
...
ValueError: merge method 'decay': shape 'cosnie' is not one of ['1-sqrt', '1-square', 'cosine', 'linear'] (or give a callable)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .elementwise import check_elementwise, is_elementwise
from .registry import check_options, coefficients, get_method


class MergeSpec:
    """A registered merge method and its options, validated on construction (on two evenly spaced
    snapshots, silently), then immutable.

    Args:
        method: a registered method's name (:func:`ckptavg.methods.method_names`).
        **options: the method's options by name, e.g. ``alpha`` for ``"ema"``, ``shape`` for
            ``"decay"``.

    Example::

        window.merge(MergeSpec("decay", shape="1-sqrt"))
    """

    __slots__ = ("method", "options")
    method: str
    options: Mapping[str, Any]

    def __init__(self, method: str, **options: Any):
        if isinstance(method, MergeSpec):
            raise TypeError("MergeSpec(method, ...): method is a name; use MergeSpec.of(spec) to accept both")
        if not isinstance(method, str):
            raise ValueError(f"a MergeSpec's method must be a registered method's name, got {method!r}")
        if is_elementwise(method):  # fine-tuned models with a base: options checked, no coefficients
            check_elementwise(method, options, None, None)
            object.__setattr__(self, "method", method.lower())
            object.__setattr__(self, "options", dict(options))
            return
        name = get_method(method).name
        check_options(name, options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. post-hoc EMA's short-window warning: there is no window yet
            coefficients(name, [1, 2], score=lambda weights: 0.0, **options)  # value checks (ranges, shapes)
        object.__setattr__(self, "method", name)
        object.__setattr__(self, "options", dict(options))

    @classmethod
    def of(cls, merge: str | MergeSpec, **options: Any) -> MergeSpec:
        """``merge`` as a ``MergeSpec``: a name with ``options``, or a spec (then no options)."""
        if isinstance(merge, MergeSpec):
            if options:
                raise ValueError(f"{merge!r} carries its own options; got more: {sorted(options)}")
            return merge
        return cls(merge, **options)

    def coefficients(
        self, steps: int | Sequence[int], *, score: Callable[[Sequence[float]], float] | None = None
    ) -> list[float]:
        """The coefficient vector over snapshots at ``steps`` (or ``n`` evenly spaced), oldest first."""
        if is_elementwise(self.method):
            raise ValueError(
                f"{self.method!r} merges fine-tuned models element by element (merge_state_dicts(..., base=...)); "
                "it has no coefficient vector over snapshots"
            )
        return coefficients(self.method, steps, score=score, **self.options)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a MergeSpec is immutable: build a new one")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MergeSpec) and (self.method, dict(self.options)) == (other.method, dict(other.options))

    def __hash__(self) -> int:
        return hash((self.method, tuple(sorted((k, repr(v)) for k, v in self.options.items()))))

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"MergeSpec({self.method!r}{options})"
