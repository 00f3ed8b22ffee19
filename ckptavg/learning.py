"""Merges learned on held-out data by gradient descent, through a differentiable merge.

- :func:`learn_weights` (TWA-style): one coefficient per stored snapshot of one run.
- :func:`np_merge` (NP Merge, arXiv 2412.15467): one coefficient per parameter, for separately
  trained models that a plain average breaks.

Both evaluate the merged weights with ``torch.func.functional_call``, so the model passed in keeps
its own weights, and the merge kernel (:mod:`ckptavg.kernels`) is not involved: it stays the fast,
no-grad path for every other merge.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import check_int
from .kernels import all_finite

if TYPE_CHECKING:
    from .window import CheckpointWindow

LossFn = Callable[[Any, Any], Tensor]


def functional_names(model: nn.Module) -> list[str]:
    """The names ``torch.func.functional_call`` is given for ``model``: its state dict's parameters
    and persistent buffers, each tied tensor once (under its first name, as ``named_parameters``
    lists them). Non-persistent buffers (an attention mask) stay the model's own."""
    persistent = set(model.state_dict(keep_vars=True))
    return [name for name, _ in itertools.chain(model.named_parameters(), model.named_buffers()) if name in persistent]


def call_with(model: nn.Module, weights: Mapping[str, Tensor], inputs: Any) -> Any:
    """``model(inputs)`` with ``weights`` in place of its own tensors (tied names given once)."""
    names = functional_names(model)
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"the merged weights have no {missing[0]!r}, which the model has ({len(missing)} missing)")
    return torch.func.functional_call(model, {name: weights[name] for name in names}, (inputs,))


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.state_dict(keep_vars=True))


def check_batches(batches: Iterable[Any], what: str) -> list[Any]:
    batches = list(batches)
    if not batches:
        raise ValueError(f"{what} needs at least one batch of held-out data ((inputs, targets) pairs)")
    return batches


def _check_training_args(steps: int, lr: float, what: str) -> None:
    check_int(steps, f"{what}: steps")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"{what}: lr must be a positive number, got {lr!r}")


def _train(
    model: nn.Module,
    parameters: list[Tensor],
    merged: Callable[[], dict[str, Tensor]],
    loss_fn: LossFn,
    batches: list[Any],
    steps: int,
    lr: float,
) -> list[float]:
    """Adam on ``parameters``, one batch per step (cycling), the model in eval mode; the losses."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    was_training = model.training
    model.eval()
    losses: list[float] = []
    try:
        for step in range(steps):
            inputs, targets = batches[step % len(batches)]
            loss = loss_fn(call_with(model, merged(), inputs), targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the held-out loss became {value} at learning step {step}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(value)
    finally:
        model.train(was_training)
    return losses


def learn_weights(
    window: CheckpointWindow,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    steps: int = 100,
    lr: float = 0.05,
    init: Any = "sma",
) -> list[float]:
    """Learn one coefficient per stored snapshot by gradient descent on held-out batches.

    The coefficients are ``softmax(a)`` (a convex combination: no extrapolation), ``a`` starting
    from the coefficients of ``init`` (a method name or weights, non-negative) and trained with
    Adam, one batch per step, cycling through ``batches``. The merged weights are evaluated with
    ``torch.func.functional_call`` in eval mode; ``model`` keeps its weights.

    Args:
        window: a one-process window of ``model``'s snapshots.
        model: the module the snapshots are of (its device and dtypes are used).
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar tensor.
        batches: ``(inputs, targets)`` pairs of held-out data, on the model's device.
        steps: gradient steps. ``0`` returns ``init``'s coefficients.
        lr: Adam's learning rate on the logits ``a``.
        init: where to start (default SMA).

    Returns:
        The coefficient vector, oldest first, summing to 1: give it to ``merge``, ``load_into``,
        ``swapped`` or the callback's ``merge=``.

    Memory: every stored snapshot's floating-point tensors, in float32 on the model's device
    (``N x model``; twice that for a moment while they are read and stacked), plus one merged
    copy, its gradient, and the activations of one batch. Time per step: one forward and
    backward pass, and ``N`` multiply-adds of the model.

    Example:
        >>> import torch
        >>> from ckptavg import CheckpointWindow, learn_weights
        >>> model = torch.nn.Linear(3, 1)
        >>> window = CheckpointWindow(window=4)
        >>> for step in range(1, 5):
        ...     with torch.no_grad():
        ...         _ = model.weight.add_(0.1)
        ...     _ = window.snapshot(model, step=step)
        >>> batches = [(torch.ones(8, 3), torch.zeros(8, 1))]
        >>> weights = learn_weights(window, model, torch.nn.functional.mse_loss, batches, steps=20)
        >>> len(weights), round(sum(weights), 6)
        (4, 1.0)
    """
    _check_training_args(steps, lr, "learn_weights")
    if window.sharding is not None:
        raise ValueError(
            "learn_weights needs the full snapshots in one process; this window holds one rank's part. Learn the weights "
            "offline on the consolidated snapshots, or on one rank's full window (spread=False)"
        )
    batches = check_batches(batches, "learn_weights")
    start = window.weights(init)
    if any(w < 0 for w in start):
        raise ValueError(f"learn_weights: init must be non-negative coefficients (a convex combination), got {start}")
    if steps == 0:
        return start
    targets = _model_tensors(model)
    snapshots = [window.read(step) for step in window.steps]
    missing = sorted(set(targets) - set(snapshots[-1]))
    if missing:
        raise ValueError(f"learn_weights: the window's snapshots have no {missing[0]!r}, which the model has")
    stacks: dict[str, Tensor] = {}
    fixed: dict[str, Tensor] = {}
    for name, target in targets.items():
        if target.is_floating_point():
            stacks[name] = torch.stack([s[name].to(target.device, torch.float32) for s in snapshots])
        else:
            fixed[name] = snapshots[-1][name].to(target.device)  # integer tensors: the newest, as every merge
    del snapshots
    logits = torch.tensor([math.log(max(w, 1e-8)) for w in start], dtype=torch.float32, requires_grad=True)

    def merged() -> dict[str, Tensor]:
        coefficients = torch.softmax(logits, 0)
        out = dict(fixed)
        for name, stack in stacks.items():
            c = coefficients.to(stack.device).view(-1, *([1] * (stack.dim() - 1)))
            out[name] = (c * stack).sum(0).to(targets[name].dtype)
        return out

    _train(model, [logits], merged, loss_fn, batches, steps, lr)
    return [float(w) for w in torch.softmax(logits.detach().double(), 0)]


def np_merge(
    model: nn.Module,
    states: Sequence[Mapping[str, Tensor]],
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    steps: int = 200,
    lr: float = 0.05,
    granularity: str = "element",
) -> dict[str, Tensor]:
    """NP Merge (arXiv 2412.15467): merge separately trained models with a learned coefficient
    per parameter.

    For two models, ``merged = alpha * W_A + (1 - alpha) * W_B`` with ``alpha = sigmoid(a)``,
    ``a`` starting at 0 (the plain average) and trained with Adam on the held-out batches (one per
    step, cycling), the merged weights evaluated with ``torch.func.functional_call`` in eval
    mode. More than two models are merged successively: ``((A, B), C), ...``. Integer tensors are
    taken from the first model. Models trained from different initialisations are not aligned
    here (no neuron permutation); NP Merge learns which model each parameter follows.

    Args:
        model: a module of the states' architecture (its device and dtypes are used; its own
            weights are left as they are).
        states: two or more state dicts with the same names and shapes.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar tensor.
        batches: ``(inputs, targets)`` pairs of held-out data, on the model's device.
        steps: gradient steps per pairwise merge.
        lr: Adam's learning rate on ``a``.
        granularity: ``"element"`` (one coefficient per weight, as the paper) or ``"tensor"``
            (one per tensor: far fewer to fit on little data).

    Returns:
        The merged state dict, in the states' dtypes, on the model's device.

    Memory: two models' tensors and the coefficients with their Adam state (about 5 x model in
    float32), plus the activations of one batch.

    Example:
        >>> import torch
        >>> from ckptavg import np_merge
        >>> a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
        >>> batches = [(torch.randn(16, 3), torch.randn(16, 1))]
        >>> merged = np_merge(a, [a.state_dict(), b.state_dict()], torch.nn.functional.mse_loss, batches, steps=5)
        >>> sorted(merged)
        ['bias', 'weight']
    """
    _check_training_args(steps, lr, "np_merge")
    if granularity not in ("element", "tensor"):
        raise ValueError(f"np_merge: granularity must be 'element' or 'tensor', got {granularity!r}")
    if len(states) < 2:
        raise ValueError(f"np_merge needs at least two state dicts, got {len(states)}")
    targets = _model_tensors(model)
    for index, state in enumerate(states):
        names = set(state)
        if names != set(targets):
            extra, missing = sorted(names - set(targets)), sorted(set(targets) - names)
            raise ValueError(
                f"np_merge: states[{index}] does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, target in targets.items():
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(
                    f"np_merge: states[{index}][{name!r}] has shape {tuple(state[name].shape)}, the model {tuple(target.shape)}"
                )
            if state[name].is_floating_point() and not all_finite(state[name]):
                raise ValueError(f"np_merge: states[{index}][{name!r}] holds NaN or Inf")
    batches = check_batches(batches, "np_merge")
    merged = {name: t.detach().to(targets[name].device) for name, t in states[0].items()}
    for other in states[1:]:
        merged = _np_pair(model, targets, merged, other, loss_fn, batches, steps, lr, granularity)
    return {name: t.to(states[0][name].dtype) for name, t in merged.items()}


def _np_pair(
    model: nn.Module,
    targets: Mapping[str, Tensor],
    first: Mapping[str, Tensor],
    second: Mapping[str, Tensor],
    loss_fn: LossFn,
    batches: list[Any],
    steps: int,
    lr: float,
    granularity: str,
) -> dict[str, Tensor]:
    pairs = {
        name: (first[name].to(t.device, torch.float32), second[name].to(t.device, torch.float32))
        for name, t in targets.items()
        if t.is_floating_point()
    }
    logits = {
        name: torch.zeros(a.shape if granularity == "element" else (), device=a.device, requires_grad=True)
        for name, (a, _) in pairs.items()
    }

    def merged() -> dict[str, Tensor]:
        out = {name: first[name] for name, t in targets.items() if not t.is_floating_point()}
        for name, (a, b) in pairs.items():
            alpha = torch.sigmoid(logits[name])
            out[name] = (b + alpha * (a - b)).to(targets[name].dtype)
        return out

    _train(model, list(logits.values()), merged, loss_fn, batches, steps, lr)
    with torch.no_grad():
        return {name: t.detach() for name, t in merged().items()}
