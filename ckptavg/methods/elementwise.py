"""The registry of element-wise merge methods: the one extension of "every merge is a vector of
coefficients over the stored snapshots".

Methods for separately fine-tuned models (task arithmetic, TIES, DARE, SLERP, Model Stock, ...)
combine the inputs element by element, relative to a shared ``base``, instead of weighting them.
Each is one function registered with :func:`elementwise_method`::

    @elementwise_method("ties", base=True)
    def ties(ctx: TensorContext, *, density: float = 1.0, lambda_: float = 1.0) -> Tensor: ...

It receives one tensor at a time (:class:`TensorContext`): the base's (``None`` for methods
without one), the inputs', one weight per input, and the tensor's name, in the accumulation dtype
(float32, float64 for float64) or chunk by chunk (``ctx.chunkwise``: bounded memory for methods
that are element-wise all the way); it returns the merged tensor. Its keyword-only parameters are its options, checked like a
coefficient method's. An option may also be given per tensor, as mergekit's configs allow: a list
of ``{"filter": "<substring of the tensor name>", "value": v}`` with a last ``{"value": v}`` for
the rest. ``lambda`` is spelled ``lambda_`` in the signature (a Python keyword) and ``lambda``
by users.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..layout import BLOCK_NUMEL
from .registry import _check_type

ElementwiseFunction = Callable[..., Tensor]


@dataclass(frozen=True)
class TensorContext:
    """One tensor of every input (as stored: never changed in place) and its name (for per-tensor
    options and seeds). ``base`` and ``tensors`` give them in the accumulation dtype, converted on
    first use; a method that streams :meth:`chunks` instead holds no full-size converted copy."""

    name: str
    stored_base: Tensor | None
    stored_tensors: list[Tensor]
    weights: list[float]
    work: torch.dtype  # float32, or float64 for float64 inputs

    @functools.cached_property
    def base(self) -> Tensor | None:
        return None if self.stored_base is None else self.stored_base.to(self.work)

    @functools.cached_property
    def tensors(self) -> list[Tensor]:
        return [t.to(self.work) for t in self.stored_tensors]

    def chunks(self, *others: Sequence[Tensor]) -> Iterator[tuple[slice, Tensor | None, list[Tensor]]]:
        """``(where, base, inputs)`` over matching flat chunks of the base and the inputs (or of
        ``others``, full-size tensors of the same shape), each a fresh copy in the accumulation
        dtype that the caller may change in place."""
        sources = list(others[0]) if others else self.stored_tensors
        flat = [t.reshape(-1) for t in sources]
        base = None if self.stored_base is None else self.stored_base.reshape(-1)
        for start in range(0, flat[0].numel(), BLOCK_NUMEL):
            where = slice(start, start + BLOCK_NUMEL)
            yield (
                where,
                None if base is None else base[where].to(self.work, copy=True),
                [t[where].to(self.work, copy=True) for t in flat],
            )

    def chunkwise(self, merge: Callable[[Tensor | None, list[Tensor]], Tensor], *others: Sequence[Tensor]) -> Tensor:
        """The merged tensor, in the inputs' dtype, from ``merge(base_chunk, input_chunks)`` applied
        chunk by chunk (memory: the output and one chunk's temporaries)."""
        out = torch.empty_like(self.stored_tensors[0], memory_format=torch.contiguous_format)
        flat_out = out.view(-1)
        for where, base, inputs in self.chunks(*others):
            flat_out[where] = merge(base, inputs)
        return out


@dataclass(frozen=True)
class ElementwiseMethod:
    name: str
    function: ElementwiseFunction
    options: Mapping[str, inspect.Parameter]
    base: bool  # whether the method needs a base model
    min_inputs: int
    max_inputs: int | None

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.function) or "").split("\n")[0]


_ELEMENTWISE: dict[str, ElementwiseMethod] = {}


def elementwise_method(
    name: str, *, base: bool, min_inputs: int = 1, max_inputs: int | None = None
) -> Callable[[ElementwiseFunction], ElementwiseFunction]:
    """Register ``function(ctx, *, option=default, ...)`` as ``name``."""

    def register(function: ElementwiseFunction) -> ElementwiseFunction:
        key = name.lower()
        if key in _ELEMENTWISE:
            raise ValueError(f"an element-wise merge method named {key!r} is already registered")
        parameters = list(inspect.signature(function).parameters.values())
        options = parameters[1:]
        loose = [p.name for p in options if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        if not parameters or loose:
            raise TypeError(f"merge method {key!r}: (ctx, *, options...) expected")
        _ELEMENTWISE[key] = ElementwiseMethod(
            key, function, {_user_name(p.name): p for p in options}, base, min_inputs, max_inputs
        )
        return function

    return register


def _user_name(parameter: str) -> str:
    return parameter.removesuffix("_") if parameter.endswith("_") else parameter


def is_elementwise(method: Any) -> bool:
    return isinstance(method, str) and method.lower() in _ELEMENTWISE


def elementwise_names() -> list[str]:
    return sorted(_ELEMENTWISE)


def get_elementwise(name: str) -> ElementwiseMethod:
    if not is_elementwise(name):
        raise ValueError(f"unknown element-wise merge method {name!r}; expected one of {elementwise_names()}")
    return _ELEMENTWISE[name.lower()]


def check_elementwise(name: str, options: Mapping[str, Any], n_inputs: int | None, has_base: bool | None) -> None:
    """Refuse unknown options, options of the wrong type, per-tensor lists that are malformed, a
    missing base and a wrong number of inputs, naming them; nothing is computed."""
    method = get_elementwise(name)
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        raise ValueError(
            f"merge method {method.name!r} has no option {unknown[0]!r}; its options: {sorted(method.options) or 'none'}"
        )
    for option, value in options.items():
        for candidate in _per_tensor_values(method.name, option, value):
            _check_type(method.name, option, candidate, method.options[option].annotation)
    if has_base is False and method.base:
        raise ValueError(
            f"merge method {method.name!r} needs a base model (base=..., or --base): the shared starting point"
        )
    if n_inputs is not None:
        if n_inputs < method.min_inputs:
            raise ValueError(
                f"merge method {method.name!r} needs at least {method.min_inputs} input model(s), got {n_inputs}"
            )
        if method.max_inputs is not None and n_inputs > method.max_inputs:
            raise ValueError(
                f"merge method {method.name!r} takes at most {method.max_inputs} input model(s), got {n_inputs}"
            )


def _per_tensor_values(method: str, option: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or not value or not all(isinstance(v, Mapping) for v in value):
        return [value]
    values = []
    for i, rule in enumerate(value):
        if set(rule) - {"filter", "value"} or "value" not in rule:
            raise ValueError(
                f"merge method {method!r}: option {option!r}[{i}] must be {{'filter': <name substring>, 'value': v}}, got {rule!r}"
            )
        values.append(rule["value"])
    if "filter" in value[-1]:
        raise ValueError(f"merge method {method!r}: option {option!r} needs a last rule without 'filter' (the default)")
    return values


def resolve(options: Mapping[str, Any], tensor: str) -> dict[str, Any]:
    """Options for one tensor: per-tensor rules resolved by the first filter its name contains."""
    resolved = {}
    for option, value in options.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            value = next(rule["value"] for rule in value if rule.get("filter", "") in tensor)
        resolved[option] = value
    return resolved


def apply_elementwise(
    name: str,
    tensor: str,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    options: Mapping[str, Any],
) -> Tensor:
    """Merge one tensor (``tensor`` names it, for per-tensor options and seeds) with method ``name``;
    computed in float32 (float64 for float64 inputs) and returned in the inputs' dtype."""
    method = get_elementwise(name)
    dtype = tensors[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    kwargs = {p.name: value for p, value in ((method.options[k], v) for k, v in resolve(options, tensor).items())}
    ctx = TensorContext(tensor, base, list(tensors), [float(w) for w in weights], work)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. torch's advice on bernoulli's dtypes
        merged = method.function(ctx, **kwargs)
    return merged.to(dtype)
