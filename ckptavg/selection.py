"""Choosing a merge on held-out data: an ``evaluate`` function, and the candidates to try.

``evaluate(state_dict) -> float`` receives merged weights (``{name: tensor}``) and returns a
number, lower is better. :func:`evaluator` builds one from a model, a loss and batches, without
touching the model's own weights (``torch.func.functional_call``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .learning import call_with, check_batches
from .methods import Evaluate, MergeSpec, Method

if TYPE_CHECKING:
    from .window import CheckpointWindow

Candidate = Method | tuple[str, Mapping[str, Any]]
"""A method name, an explicit weight list, or ``(method, options)``."""


def evaluator(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], batches: Iterable[Any]) -> Evaluate:
    """An ``evaluate`` function: the mean of ``loss_fn(model(inputs), targets)`` over ``batches``
    (``(inputs, targets)`` pairs, kept in a list), with the merged weights in place of the
    model's, in eval mode and without gradients (``torch.func.functional_call``; tied weights
    are given once). The model itself is left as it is."""
    batches = check_batches(batches, "evaluator")
    device = next((t.device for t in model.state_dict().values()), torch.device("cpu"))

    @torch.no_grad()
    def evaluate(state: Mapping[str, Tensor]) -> float:
        weights = {name: t.to(device) for name, t in state.items()}
        was_training = model.training
        model.eval()
        try:
            losses = [float(loss_fn(call_with(model, weights, x), y)) for x, y in batches]
        finally:
            model.train(was_training)
        return math.fsum(losses) / len(losses)

    return evaluate


POSTHOC_WIDTHS = (0.05, 0.1, 0.2)


def default_candidates(n: int, steps: Sequence[int] | None = None) -> dict[str, Candidate]:
    """The newest snapshot alone, SMA over the newest ``k`` for every ``k``, WMA, EMA, the decay
    shapes, and, given the snapshots' (positive) ``steps``, post-hoc EMA of widths
    ``POSTHOC_WIDTHS``."""
    candidates: dict[str, Candidate] = {}
    for k in range(1, n + 1):
        candidates["newest" if k == 1 else f"sma-newest-{k}"] = [0.0] * (n - k) + [1.0] * k
    candidates.update(
        {
            "wma": "wma",
            "ema": "ema",
            "decay-cosine": ("decay", {"shape": "cosine"}),
            "decay-1-sqrt": ("decay", {"shape": "1-sqrt"}),
        }
    )
    if (
        steps is not None and steps[0] > 0
    ):  # post-hoc EMA needs the run's steps; a short window truncates it (no warning here)
        for width in POSTHOC_WIDTHS:
            candidates[f"posthoc-{width}"] = ("posthoc", {"sigma_rel": width, "max_lost": 1.0})
    return candidates


def as_method(candidate: Candidate) -> tuple[Method, dict[str, Any]]:
    if (
        isinstance(candidate, tuple)
        and len(candidate) == 2
        and isinstance(candidate[0], str)
        and isinstance(candidate[1], Mapping)
    ):
        return candidate[0], dict(candidate[1])
    if isinstance(candidate, (str, MergeSpec)):
        return candidate, {}
    if isinstance(candidate, Sequence) and all(isinstance(w, (int, float)) for w in candidate):
        return [float(w) for w in candidate], {}  # type: ignore[arg-type]  # numbers, checked above
    raise ValueError(f"a candidate is a method name, a weight list or (method, options), got {candidate!r}")


def select(
    window: CheckpointWindow, evaluate: Evaluate, candidates: Mapping[str, Candidate] | None = None
) -> tuple[list[float], list[dict[str, Any]]]:
    """Try merges of ``window`` on held-out data and return the best one's coefficient vector, with
    a table of every candidate (``name``, ``score``, ``weights``; lower scores are better).

    Args:
        evaluate: merged state dict -> number, lower is better (:func:`ckptavg.evaluator`).
        candidates: ``{name: method name | weight list | (method, options)}``; by default the
            newest snapshot alone, SMA over the newest ``k`` for every ``k``, WMA, EMA, the
            decay shapes and post-hoc EMA widths 0.05, 0.1 and 0.2. One merge and one
            evaluation each.

    A merge chosen on data is only as good as that data: choose on held-out data other than
    the data you report."""
    chosen = candidates if candidates is not None else default_candidates(len(window), window.steps)
    if not chosen:
        raise ValueError("select needs at least one candidate")
    tried: list[tuple[str, float, list[float]]] = []
    for name, candidate in chosen.items():
        method, options = as_method(candidate)
        weights = window.weights(method, evaluate=evaluate, **options)
        tried.append((name, float(evaluate(window.merge(weights))), weights))
    finite = [row for row in tried if math.isfinite(row[1])]  # a NaN score is never best
    if not finite:
        raise ValueError(
            f"select: no candidate scored a finite value on the held-out data ({ {name: score for name, score, _ in tried} })"
        )
    _, _, best = min(finite, key=lambda row: row[1])
    return best, [{"name": name, "score": score, "weights": weights} for name, score, weights in tried]
