"""Saving and restoring what an extra forward pass could change: the RNG streams, every tensor a
module holds, and the state of torchmetrics objects. The previews and the restore check evaluate
the model "off the record" with these; they are framework-neutral, so every adapter uses them."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return copy.deepcopy(value)


def metric_states(module: torch.nn.Module) -> list[tuple[Any, dict[str, Any]]]:
    """A copy of the state of every torchmetrics ``Metric`` inside ``module``."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return []
    saved = []
    for m in module.modules():
        if isinstance(m, Metric):
            names = list(getattr(m, "_defaults", {})) + ["_update_count", "_computed", "_forward_cache", "_is_synced"]
            saved.append((m, {n: _clone(getattr(m, n)) for n in names if hasattr(m, n)}))
    return saved


def restore_metric_states(saved: list[tuple[Any, dict[str, Any]]]) -> None:
    for metric, state in saved:
        for name, value in state.items():
            setattr(metric, name, value)


_Saved = tuple[torch.nn.Module, str, str, torch.Tensor, torch.Tensor]


def module_tensors(module: torch.nn.Module) -> list[_Saved]:
    """A copy of every tensor a module and its submodules hold (parameters, buffers, persistent or
    not, and plain tensor attributes), with the objects they are bound to."""
    saved: list[_Saved] = []
    for owner in module.modules():
        for where, tensors in (
            ("_parameters", owner._parameters),
            ("_buffers", owner._buffers),
            ("__dict__", vars(owner)),
        ):
            for name, tensor in tensors.items():
                if isinstance(tensor, torch.Tensor) and (
                    where != "__dict__" or not isinstance(tensor, torch.nn.Parameter)
                ):
                    saved.append((owner, where, name, tensor, tensor.detach().clone()))
    return saved


@torch.no_grad()
def restore_module_tensors(saved: list[_Saved]) -> None:
    """Bind every name back to its own tensor (a step may have rebound it) and restore its values."""
    for owner, where, name, tensor, value in saved:
        (vars(owner) if where == "__dict__" else getattr(owner, where))[name] = tensor
        tensor.copy_(value)


@contextmanager
def untouched(module: torch.nn.Module) -> Iterator[None]:
    """Inside: run anything on ``module`` (a forward, a loss); afterwards the RNG streams, every
    tensor the module holds and its torchmetrics states are as they were."""
    saved_rng, saved_metrics, saved_tensors = rng_state(), metric_states(module), module_tensors(module)
    try:
        yield
    finally:
        set_rng_state(saved_rng)
        restore_metric_states(saved_metrics)
        restore_module_tensors(saved_tensors)
