"""Loss-spike detection, and restoring a merged stable point instead of crashing.

PMA (arXiv 2505.12082) rescued a run after an irrecoverable loss spike by restarting from the
average of the checkpoints before the collapse. :class:`SpikeGuard` does that inside the running
job: it watches the loss (and optionally the gradient norm), and when training diverges it loads
the merge of the snapshots taken *before the spike began* into the model, resets the optimizer
state, and lets training continue. Framework-free; the Lightning callback drives it from hooks.

A plain loop::

    window = CheckpointWindow(window=8)
    guard = SpikeGuard(window)
    for step, batch in enumerate(loader, start=1):
        loss = train_step(model, optimizer, batch)
        if guard.observe(step, loss.item()):          # True: training diverged, restore now
            event = guard.restore(model, [optimizer], step)
            print(event)
        elif step % 50 == 0 and guard.healthy:         # never snapshot an abnormal state
            window.snapshot(model, step=step)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .merges import DEFAULT_ALPHA, Method
from .sharding import all_ranks_max
from .window import CheckpointWindow


class RecoveryError(RuntimeError):
    """Training kept diverging, or there is no stable snapshot to restore; the message says what
    happened and what to try."""


@dataclass
class RecoveryPolicy:
    """When a loss counts as a spike, and what a restore does. Every field is a plain value.

    Detection: a loss is abnormal when it is not finite, or, once ``warmup`` losses have been
    seen, when it exceeds both ``median + threshold * sigma`` and ``median * (1 + min_increase)``
    over the last ``history`` normal losses (``sigma`` = 1.4826 x the median absolute deviation, a
    robust standard deviation; the relative floor avoids alarms when the loss barely moves). The
    same rule applies to the gradient norm when ``grad_norm_threshold`` is set. A restore happens
    after ``patience`` abnormal optimizer steps in a row (at once for a non-finite loss); while
    the loss is abnormal no snapshot is taken, and only snapshots from before the spike began are
    merged. (The loss of step t measures the weights left by step t - 1, so the snapshot of the
    step just before the first abnormal loss is not trusted either.)

    Action: load the merge (``merge``; default: the caller's) of the pre-spike snapshots, reset
    the optimizer state (``reset_optimizer``), and scale the learning rate by ``lr_scale`` for
    ``lr_scale_steps`` steps. More than ``max_restores`` restores within ``restore_span`` steps
    raise :class:`RecoveryError` instead of looping.
    """

    history: int = 100
    warmup: int = 20
    threshold: float = 6.0
    min_increase: float = 0.5
    patience: int = 2
    grad_norm_threshold: float | None = None
    reset_optimizer: bool = True
    lr_scale: float = 1.0
    lr_scale_steps: int = 0
    max_restores: int = 3
    restore_span: int = 1000
    merge: str | None = None

    def __post_init__(self) -> None:
        positive = {"history": self.history, "patience": self.patience, "max_restores": self.max_restores, "restore_span": self.restore_span}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RecoveryPolicy.{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "lr_scale_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"RecoveryPolicy.{name} must be a non-negative integer, got {value!r}")
        if not self.threshold > 0 or not self.min_increase >= 0:
            raise ValueError("RecoveryPolicy.threshold must be > 0 and min_increase >= 0")
        if self.grad_norm_threshold is not None and not self.grad_norm_threshold > 0:
            raise ValueError("RecoveryPolicy.grad_norm_threshold must be > 0 or None")
        if not 0 < self.lr_scale <= 1:
            raise ValueError(f"RecoveryPolicy.lr_scale must be in (0, 1], got {self.lr_scale}")

    @classmethod
    def from_value(cls, value: bool | RecoveryPolicy | Mapping[str, Any] | None, **overrides: Any) -> RecoveryPolicy | None:
        """``True`` -> defaults, ``False``/``None`` -> off, a policy or a mapping -> those fields;
        ``overrides`` (field names as keyword arguments) are applied on top."""
        known = {f.name for f in fields(cls)}
        unknown = (set(value) if isinstance(value, Mapping) else set()) | set(overrides)
        unknown -= known
        if unknown:
            raise ValueError(f"unknown RecoveryPolicy fields {sorted(unknown)}; expected some of {sorted(known)}")
        if value is None or value is False:
            if overrides:
                raise ValueError(f"recovery options {sorted(overrides)} were given, but recover is off")
            return None
        if value is True:
            return cls(**overrides)
        if isinstance(value, cls):
            return replace(value, **overrides) if overrides else value
        if isinstance(value, Mapping):
            return cls(**{**value, **overrides})
        raise ValueError(f"recover must be a bool, a RecoveryPolicy or a mapping of its fields, got {value!r}")


class RobustLevel:
    """The recent normal values of a signal, and whether a new value is far above them."""

    def __init__(self, history: int, threshold: float, min_increase: float, warmup: int):
        self.values: deque[float] = deque(maxlen=history)
        self.threshold, self.min_increase, self.warmup = threshold, min_increase, warmup
        self.seen = 0

    def limit(self) -> float:
        """The value above which a new observation is abnormal (``inf`` before warm-up)."""
        if self.seen < self.warmup or len(self.values) < 2:
            return math.inf
        values = np.fromiter(self.values, dtype=np.float64)
        median = float(np.median(values))
        sigma = 1.4826 * float(np.median(np.abs(values - median)))
        return max(median + self.threshold * sigma, median + self.min_increase * abs(median))

    def is_abnormal(self, value: float) -> bool:
        return not math.isfinite(value) or value > self.limit()

    def add(self, value: float) -> None:
        self.values.append(value)
        self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])
        self.seen = int(state["seen"])


@dataclass
class RecoveryEvent:
    """One restore: when the spike began and was acted on, the loss, and what was merged."""

    step: int
    onset: int
    loss: float
    reason: str
    steps_merged: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.reason} at step {self.step} (abnormal since step {self.onset}, loss {self.loss:.4g}): "
            f"restored the merge of snapshots {self.steps_merged}"
        )


class SpikeGuard:
    """Watches a training signal and restores a merged stable point when it diverges.

    Args:
        window: the snapshots to restore from.
        policy: thresholds and actions (:class:`RecoveryPolicy`).
        merge, alpha: the merge used for a restore unless ``policy.merge`` names one.
    """

    def __init__(self, window: CheckpointWindow, policy: RecoveryPolicy | None = None, merge: Method = "sma", alpha: float = DEFAULT_ALPHA):
        self.window = window
        self.policy = policy or RecoveryPolicy()
        self.merge: Method = self.policy.merge or merge
        self.alpha = alpha
        p = self.policy
        self.loss_level = RobustLevel(p.history, p.threshold, p.min_increase, p.warmup)
        self.grad_level = RobustLevel(p.history, p.grad_norm_threshold or 1.0, p.min_increase, p.warmup)
        self.onset: int | None = None  # first step of the current abnormal stretch
        self.abnormal_steps = 0
        self.last_loss = math.nan
        self.reason = ""
        self.events: list[RecoveryEvent] = []
        self.lr_scaled_until = -1

    @property
    def healthy(self) -> bool:
        """False while the signal is abnormal: no snapshot should be taken then."""
        return self.onset is None

    def check(self, loss: float, grad_norm: float | None = None) -> str | None:
        """Why ``loss`` (and ``grad_norm``) are abnormal, or ``None``; changes nothing."""
        if not math.isfinite(loss):
            return "non-finite loss"
        if loss > self.loss_level.limit():
            return f"loss spike (limit {self.loss_level.limit():.4g})"
        if grad_norm is not None and self.policy.grad_norm_threshold is not None:
            if not math.isfinite(grad_norm):
                return "non-finite gradient norm"
            if grad_norm > self.grad_level.limit():
                return f"gradient-norm spike (limit {self.grad_level.limit():.4g})"
        return None

    def observe(self, step: int, loss: float, grad_norm: float | None = None, reason: str | None = None) -> bool:
        """Record one optimizer step's loss; return True when a restore is due now.

        In a multi-process run every rank calls this at every step: the ranks agree on the verdict
        (one small all-reduce), so that all of them restore at the same step, also when the loss
        diverged on one rank only. ``reason`` overrides the local verdict."""
        verdict = self.check(loss, grad_norm) if reason is None else (reason or None)
        code = all_ranks_max(0 if verdict is None else (2 if verdict.startswith("non-finite") else 1), self.window.process_group)
        if verdict is None and code:
            verdict = "non-finite loss on another rank" if code == 2 else "loss spike on another rank"
        self.last_loss = loss
        if verdict is None:
            self.onset, self.abnormal_steps = None, 0
            self.loss_level.add(loss)
            if grad_norm is not None and math.isfinite(grad_norm):
                self.grad_level.add(grad_norm)
            return False
        if self.onset is None:
            self.onset = step
        self.abnormal_steps += 1
        self.reason = verdict
        return verdict.startswith("non-finite") or self.abnormal_steps >= self.policy.patience

    def restore(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (), step: int | None = None) -> RecoveryEvent:
        """Load the merge of the snapshots taken before the spike began, reset the optimizers,
        and return what was done. Raises :class:`RecoveryError` when the restore budget is spent
        or no snapshot predates the spike."""
        onset = self.onset if self.onset is not None else (step if step is not None else 0)
        step = onset if step is None else step
        recent = [e for e in self.events if e.step > step - self.policy.restore_span]
        if len(recent) >= self.policy.max_restores:
            raise RecoveryError(
                f"ckptavg: training diverged again at step {step} ({self.reason}, loss {self.last_loss:.4g}) after "
                f"{len(recent)} restores within {self.policy.restore_span} steps (at steps {[e.step for e in recent]}). "
                "Restoring once more would loop. Try a lower learning rate or gradient clipping, a longer warm-up, "
                "RecoveryPolicy(lr_scale=0.5, lr_scale_steps=...), or raise max_restores."
            )
        # The loss of step t is computed with the weights left by step t - 1, so the first abnormal
        # loss (at the onset) condemns the snapshot of step onset - 1 too: it was never vouched for.
        trusted_before = onset - 1
        stable = [s for s in self.window.steps if s < trusted_before]
        if not stable:
            raise RecoveryError(
                f"ckptavg: training diverged at step {step} ({self.reason}, loss {self.last_loss:.4g}), but no snapshot "
                f"predates step {trusted_before} (held: {self.window.steps}). Take snapshots earlier (a lower "
                "start_step or a shorter interval) so that a stable point exists."
            )
        self.window.load_into(model, self.merge, self.alpha, before=trusted_before)
        for optimizer in optimizers:
            if self.policy.reset_optimizer:
                optimizer.state.clear()  # moments built from the diverging steps
            optimizer.zero_grad(set_to_none=True)
        event = RecoveryEvent(step=step, onset=onset, loss=self.last_loss, reason=self.reason, steps_merged=stable)
        self.events.append(event)
        self.onset, self.abnormal_steps = None, 0
        self.lr_scaled_until = step + self.policy.lr_scale_steps
        return event

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier to apply at ``step`` (1.0 outside a post-restore stretch)."""
        return self.policy.lr_scale if step <= self.lr_scaled_until else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_level": self.loss_level.state_dict(),
            "grad_level": self.grad_level.state_dict(),
            "onset": self.onset,
            "abnormal_steps": self.abnormal_steps,
            "events": [asdict(e) for e in self.events],
            "lr_scaled_until": self.lr_scaled_until,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loss_level.load_state_dict(state["loss_level"])
        self.grad_level.load_state_dict(state["grad_level"])
        self.onset = state["onset"]
        self.abnormal_steps = int(state["abnormal_steps"])
        self.events = [RecoveryEvent(**e) for e in state["events"]]
        self.lr_scaled_until = int(state["lr_scaled_until"])
