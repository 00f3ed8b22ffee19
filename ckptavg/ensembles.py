"""Aggregating models that cannot be averaged: prediction ensembles, and distillation.

A merge gives one model for the price of one; when the snapshots are not one basin (see
:meth:`CheckpointWindow.correlation`), averaging their outputs still works, at ``N`` times the
inference cost, and :func:`distill` trains one model to reproduce the ensemble.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from .errors import check_int
from .learning import functional_names

if TYPE_CHECKING:
    from .window import CheckpointWindow


class Ensemble(nn.Module):
    """The average of the outputs of one architecture under several sets of weights.

    ``average="logits"`` averages the outputs themselves (any output: logits, regression
    values); ``"probs"`` averages ``softmax`` over the last dimension and returns the log of that
    average, which is itself a valid set of logits (``cross_entropy``, ``argmax``).

    The weights are stacked (``N x model`` memory) and evaluated in one batched call
    (``torch.func.vmap`` over ``functional_call``) when the model allows it; otherwise, one
    model at a time. ``vectorized`` says which path the last forward took.
    """

    def __init__(
        self, model: nn.Module, states: Sequence[Mapping[str, Tensor]], average: Literal["logits", "probs"] = "logits"
    ):
        super().__init__()
        if average not in ("logits", "probs"):
            raise ValueError(f"average must be 'logits' or 'probs', got {average!r}")
        if len(states) < 1:
            raise ValueError("an ensemble needs at least one state dict")
        self.template = copy.deepcopy(model)
        self.average = average
        self.names = functional_names(model)
        self._keys: dict[str, str] = {}
        for index, state in enumerate(states):
            missing = [n for n in self.names if n not in state]
            if missing:
                raise ValueError(f"states[{index}] has no {missing[0]!r}, which the model has ({len(missing)} missing)")
        reference = dict(model.state_dict())
        for name in self.names:
            values = [state[name] for state in states]
            shapes = {tuple(v.shape) for v in values}
            if shapes != {tuple(reference[name].shape)}:
                raise ValueError(
                    f"tensor {name!r} has shapes {sorted(shapes)} across the states; the model's is {tuple(reference[name].shape)}"
                )
            key = "stacked_" + name.replace(".", "__")
            self._keys[name] = key
            self.register_buffer(
                key, torch.stack([v.detach().to(reference[name].device, reference[name].dtype) for v in values])
            )
        self.size = len(states)
        self.vectorized: bool | None = None

    @classmethod
    def from_window(
        cls, window: CheckpointWindow, model: nn.Module, average: Literal["logits", "probs"] = "logits"
    ) -> Ensemble:
        """The ensemble of a window's held snapshots: its forward averages the outputs of ``model``'s
        architecture under each snapshot's weights. Holds every snapshot (``N x model``) on the
        model's device."""
        if window.sharding is not None:
            raise ValueError("an ensemble needs whole snapshots: this window holds one rank's part")
        return cls(model, [window.read(step) for step in window.steps], average)

    def _stacked(self) -> dict[str, Tensor]:
        return {name: getattr(self, key) for name, key in self._keys.items()}

    def members(self, inputs: Any) -> Tensor:
        """Every member's output, stacked: ``[N, ...]``."""
        stacked = self._stacked()

        def one(weights: dict[str, Tensor], x: Any) -> Tensor:
            return torch.func.functional_call(self.template, weights, (x,))

        if self.vectorized is not False:
            try:
                out = torch.func.vmap(one, in_dims=(0, None), randomness="different")(stacked, inputs)
                self.vectorized = True
                return out
            except (RuntimeError, ValueError, NotImplementedError):
                self.vectorized = False  # a model vmap cannot batch (data-dependent control flow, ...): loop
        return torch.stack([one({n: t[i] for n, t in stacked.items()}, inputs) for i in range(self.size)])

    def forward(self, inputs: Any) -> Tensor:
        outputs = self.members(inputs)
        if self.average == "logits":
            return outputs.mean(0)
        return torch.logsumexp(torch.log_softmax(outputs, dim=-1), dim=0) - math.log(self.size)


def ensemble(
    model: nn.Module, states: Sequence[Mapping[str, Tensor]], average: Literal["logits", "probs"] = "logits"
) -> Ensemble:
    """A prediction ensemble of ``model``'s architecture over ``states`` (see :class:`Ensemble`).

    Example:
        >>> import torch
        >>> from ckptavg.ensembles import ensemble
        >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        >>> both = ensemble(a, [a.state_dict(), b.state_dict()])
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(both(x), (a(x) + b(x)) / 2)
        True
    """
    return Ensemble(model, states, average)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int = 1000,
    temperature: float = 2.0,
    hard_weight: float = 0.5,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
) -> list[float]:
    """Knowledge distillation (Hinton et al. 2015): train ``student`` in place to match
    ``teacher``'s softened outputs, ``T^2 KL(softmax(t / T) || softmax(s / T))``, plus
    ``hard_weight`` times the cross-entropy with the labels when batches are ``(inputs,
    targets)`` pairs (``hard_weight=0``: the teacher alone; bare input batches: the teacher alone).

    Args:
        student: the model trained (in place, in train mode; its mode is restored after).
        teacher: any module giving logits: an :class:`Ensemble`, a merged model, another model.
            Evaluated in eval mode, without gradients.
        batches: an iterable of batches (a DataLoader), cycled for ``steps`` steps.
        steps: optimizer steps.
        temperature: the softening temperature ``T``.
        hard_weight: the weight of the hard loss (the distillation loss gets ``1 - hard_weight``).
        lr: AdamW's learning rate, when no ``optimizer`` is given.
        optimizer: an optimizer over the student's parameters.
        progress: a tqdm bar on a terminal.

    Returns:
        The training loss of every step.
    """
    check_int(steps, "distill: steps")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distill: temperature must be a positive number, got {temperature!r}")
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"distill: hard_weight must be in [0, 1], got {hard_weight!r}")
    optimizer = optimizer or torch.optim.AdamW(student.parameters(), lr=lr)
    from tqdm.auto import tqdm

    was_training = (student.training, teacher.training)
    student.train()
    teacher.eval()
    losses: list[float] = []
    source = _forever(batches)
    try:
        for _ in tqdm(range(steps), desc="distilling", disable=True if not progress else None, leave=False):
            batch = next(source)
            inputs, targets = (
                (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
            )
            with torch.no_grad():
                teacher_logits = teacher(inputs)
            loss = distillation_loss(
                student(inputs), teacher_logits, targets, temperature=temperature, hard_weight=hard_weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    return losses


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 2.0,
    hard_weight: float = 0.5,
) -> Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, mixed with ``hard_weight`` times the
    cross-entropy with ``targets`` when they are given: the loss :func:`distill` minimises, for a
    training step of your own (a LightningModule's ``training_step``, for example)."""
    soft = (
        nn.functional.kl_div(
            torch.log_softmax(student_logits / temperature, dim=-1),
            torch.softmax(teacher_logits.detach() / temperature, dim=-1),
            reduction="batchmean",
        )
        * temperature**2
    )
    if targets is None or hard_weight == 0:
        return soft
    return (1 - hard_weight) * soft + hard_weight * nn.functional.cross_entropy(student_logits, targets)


def _forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Pass after pass over ``batches`` (a DataLoader reshuffles each pass), holding none of them."""
    while True:
        seen = 0
        for batch in batches:
            seen += 1
            yield batch
        if not seen:
            raise ValueError(
                "distill: the batches ran out (or were empty); give a re-iterable such as a DataLoader or a list"
            )
