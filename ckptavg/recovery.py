"""Divergence detection, and restoring a merged stable point instead of crashing.

PMA (arXiv 2505.12082) rescued a run after an irrecoverable loss spike by restarting from the
average of the checkpoints before the collapse. :class:`SpikeGuard` does that inside the running
job: it watches the training loss, and when training diverges it loads the merge of the snapshots
taken *before the trouble began* into the model, resets the optimizer state, and lets training
continue. Framework-free; the Lightning callback drives it from hooks.

What counts as a divergence was designed from the losses of healthy runs, where one noisy batch
means nothing: a classifier whose per-batch loss is near zero has heavy-tailed outliers hundreds
of times its median, small batches are noisy, and a change of data makes the loss jump and then
come back. So the guard judges a *smoothed* level (the median of the last few losses, which one
bad batch cannot move) against a margin measured in the loss's own units: a share of the
progress the run has made since it started, which does not collapse as the loss goes to zero. It
acts only when that level stays up, and it checks that restoring helped. See
:class:`RecoveryPolicy` for the rule.

A plain loop::

    window = CheckpointWindow(window=8)
    guard = SpikeGuard(window)
    for step, batch in enumerate(loader, start=1):
        loss = train_step(model, optimizer, batch)
        if guard.observe(step, loss.item(), model=model):   # True: training diverged, restore now
            print(guard.restore(model, [optimizer], step))
        elif step % 50 == 0 and guard.healthy:              # never snapshot an abnormal state
            window.snapshot(model, step=step)
"""

from __future__ import annotations

import bisect
import math
import statistics
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import nn

from .errors import check_int
from .files import CkptavgWarning
from .kernels import all_finite
from .layout import local_tensor, state_tensors
from .methods import DEFAULT_ALPHA, Method, coefficients
from .sharding import all_ranks_max, all_ranks_mean, distributed_rank
from .window import CheckpointWindow

GUARD_STATE_VERSION = 2
EVIDENCE = 24  # losses kept in an event as its evidence


class RecoveryError(RuntimeError):
    """Training kept diverging (with ``on_exhausted="raise"``), or there is no stable snapshot to
    restore; the message says what happened and what to try."""


@dataclass
class RecoveryPolicy:
    """What counts as a divergence, and what a restore does. Every field is a plain value.

    **The rule.** Every optimizer step's loss is recorded. The judged *level* is the median of the
    last ``smoothing`` losses (one bad batch cannot move it). The *baseline* is the median of the
    last ``history`` normal losses, at its lowest so far (so a loss creeping up cannot drag its
    limit along); their *spread* is how far their 95th percentile lies above that median (heavy
    tails count, so it does not collapse as the loss goes to zero); the *start* is the median of
    the run's first ``warmup`` losses. The level is abnormal when it
    exceeds the baseline by the largest of:

    - ``rise x (start - baseline)``: with the default 1.0, the loss is back where it was during the
      warm-up (a margin in the loss's own units, whatever its scale);
    - ``threshold x spread``: far outside the run's own batch-to-batch noise;
    - ``min_increase x |baseline|``: with the default 1.0, the loss has doubled.

    Nothing is judged during the first ``warmup`` losses, and no snapshot is taken while the level
    is abnormal. If the level comes back below the limit within ``patience`` steps, the run healed
    by itself (a hard stretch of data) and those losses join the baseline. After ``patience``
    abnormal steps in a row a restore is due, and it is checked first when the caller can
    evaluate the current batch (``observe(..., evaluate=...)``; the Lightning callback does):
    the stable point must do better on the data the run sees *now* than the current weights, by at
    least the margin above. If it does not, the data changed, not the weights (a new data mix, a
    new task); the guard waits, and an abnormal level that lasts ``accept_after`` steps without
    a restore helping becomes the new normal. Without ``evaluate``, a restore after which the
    level never came back below the limit is taken to mean the same. A non-finite loss restores at
    once when the weights themselves are no longer finite (otherwise, say a step skipped by AMP's
    loss scaler, it is just a very high loss).

    ``grad_norm_threshold`` (off by default) adds a second rule: the median of the last
    ``smoothing`` gradient norms above this many times their baseline median.

    **The action.** Load the merge (``merge`` with ``merge_options``, any registered method;
    default: the caller's) of the snapshots taken
    before the trouble began, reset the optimizer state (``reset_optimizer``), and scale the
    learning rate by ``lr_scale`` for ``lr_scale_steps`` steps. At most ``max_restores`` restores
    within ``restore_span`` steps: past that, ``on_exhausted="warn"`` gives up with a warning,
    accepts the current level as the new normal and takes no action until the budget has room
    again; ``"raise"`` raises :class:`RecoveryError`.
    """

    warmup: int = 50
    history: int = 200
    smoothing: int = 7
    rise: float = 1.0
    threshold: float = 3.0
    min_increase: float = 1.0
    patience: int = 10
    accept_after: int = 200
    grad_norm_threshold: float | None = None
    reset_optimizer: bool = True
    lr_scale: float = 1.0
    lr_scale_steps: int = 0
    max_restores: int = 3
    restore_span: int = 1000
    on_exhausted: Literal["warn", "raise"] = "warn"
    merge: str | None = None
    merge_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        positive = {
            "history": self.history, "smoothing": self.smoothing, "patience": self.patience, "accept_after": self.accept_after,
            "max_restores": self.max_restores, "restore_span": self.restore_span,
        }  # fmt: skip
        for name, value in positive.items():
            check_int(value, f"RecoveryPolicy.{name}", minimum=1)
        for name in ("warmup", "lr_scale_steps"):
            check_int(getattr(self, name), f"RecoveryPolicy.{name}")
        for name in ("rise", "threshold", "min_increase"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"RecoveryPolicy.{name} must be a finite number >= 0, got {value!r}")
        if not (self.rise > 0 or self.threshold > 0 or self.min_increase > 0):
            raise ValueError("RecoveryPolicy: at least one of rise, threshold and min_increase must be > 0")
        if self.grad_norm_threshold is not None and not self.grad_norm_threshold > 1:
            raise ValueError(
                f"RecoveryPolicy.grad_norm_threshold must be > 1 (a ratio to the baseline) or None, got {self.grad_norm_threshold!r}"
            )
        if not 0 < self.lr_scale <= 1:
            raise ValueError(f"RecoveryPolicy.lr_scale must be in (0, 1], got {self.lr_scale}")
        if self.on_exhausted not in ("warn", "raise"):
            raise ValueError(f"RecoveryPolicy.on_exhausted must be 'warn' or 'raise', got {self.on_exhausted!r}")
        if self.merge_options is not None and self.merge is None:
            raise ValueError(
                "RecoveryPolicy.merge_options needs RecoveryPolicy.merge (the caller's merge brings its own options)"
            )
        if self.merge is not None:
            try:
                coefficients(self.merge, 1, **(self.merge_options or {}))
            except ValueError as err:
                raise ValueError(f"RecoveryPolicy.merge: {err}") from None

    @classmethod
    def from_value(
        cls, value: bool | RecoveryPolicy | Mapping[str, Any] | None, **overrides: Any
    ) -> RecoveryPolicy | None:
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


class RollingQuantiles:
    """The last ``size`` values, kept sorted too, so that quantiles cost a lookup (the guard reads
    them at every optimizer step)."""

    def __init__(self, size: int):
        self.order: deque[float] = deque(maxlen=size)
        self.sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[float]:
        return iter(self.order)

    def __contains__(self, value: object) -> bool:
        return value in self.order

    def append(self, value: float) -> None:
        if len(self.order) == self.order.maxlen:
            del self.sorted[bisect.bisect_left(self.sorted, self.order[0])]
        self.order.append(value)
        bisect.insort(self.sorted, value)

    def clear(self) -> None:
        self.order.clear()
        self.sorted.clear()

    def quantile(self, q: float) -> float:
        """Linear interpolation between the closest ranks (numpy's default)."""
        position = q * (len(self.sorted) - 1)
        low = int(position)
        high = min(low + 1, len(self.sorted) - 1)
        return self.sorted[low] + (self.sorted[high] - self.sorted[low]) * (position - low)


class SmoothedLevel:
    """One training signal: its recent values, its normal history, and the limit of its smoothed
    level (see :class:`RecoveryPolicy`)."""

    def __init__(self, policy: RecoveryPolicy):
        self.policy = policy
        self.recent: deque[tuple[int, float]] = deque(maxlen=policy.smoothing)  # every value; non-finite as inf
        self.normal = RollingQuantiles(policy.history)
        self.held: deque[tuple[int, float]] = deque()  # high values not yet known to be harmless
        self.first: list[float] = []  # the first values, until the start level is known
        self.start: float | None = None
        self.best: tuple[float, float] | None = None  # the lowest baseline so far, and its spread
        self.seen = 0

    @property
    def armed(self) -> bool:
        return self.seen >= self.policy.warmup and len(self.normal) >= 2 and len(self.recent) == self.recent.maxlen

    def level(self) -> float:
        """The median of the recent values (``inf`` counts as high)."""
        return float(statistics.median(v for _, v in self.recent)) if self.recent else math.nan

    def baseline(self) -> tuple[float, float]:
        """The median of the normal history, and how far its 95th percentile lies above it."""
        median = self.normal.quantile(0.5)
        return median, self.normal.quantile(0.95) - median

    def reference(self) -> float:
        """The baseline the limit is measured from (``nan`` before any normal value)."""
        if self.best is not None:
            return self.best[0]
        return self.baseline()[0] if self.normal else math.nan

    def loss_limit(self) -> float:
        """The level above which the loss is abnormal (``inf`` while not armed). The baseline is
        the lowest one seen (with its spread): a loss that creeps up slowly would otherwise pull
        its own limit up with it."""
        if not self.armed:
            return math.inf
        p = self.policy
        now = self.baseline()
        if self.best is None or now[0] < self.best[0]:
            self.best = now
        base, spread = self.best
        start = self.start if self.start is not None else base
        return base + max(p.rise * max(start - base, 0.0), p.threshold * spread, p.min_increase * abs(base))

    def ratio_limit(self, ratio: float) -> float:
        """For positive signals (gradient norms): ``ratio`` x the baseline median."""
        return ratio * self.baseline()[0] if self.armed else math.inf

    def push(self, step: int, value: float) -> None:
        self.recent.append((step, value if math.isfinite(value) else math.inf))
        self.seen += 1

    def offer(self, step: int, value: float, limit: float) -> None:
        """A value whose level was normal joins the baseline; one above ``limit`` itself waits
        ``smoothing`` steps first, in case it is the start of trouble (then it is dropped)."""
        if value <= limit:
            self.accept([value])
        else:
            self.held.append((step, value))
        while self.held and step - self.held[0][0] >= self.policy.smoothing:
            self.accept([self.held.popleft()[1]])

    def accept(self, values: Iterable[float]) -> None:
        """Count ``values`` as normal: the baseline follows them."""
        for value in values:
            if not math.isfinite(value):
                continue
            self.normal.append(value)
            if self.start is None:
                self.first.append(value)
                if len(self.first) >= max(self.policy.warmup, self.policy.smoothing):
                    self.start, self.first = float(statistics.median(self.first)), []

    def rebase(self, values: Iterable[float]) -> None:
        """Make ``values`` the whole normal history (a new normal level)."""
        self.normal.clear()
        self.held.clear()
        self.best = None
        self.accept(values)

    def start_stretch(self, step: int, limit: float) -> tuple[int, list[float]]:
        """An abnormal stretch opens at ``step``: it began with the first recent value above
        ``limit`` (not when the level crossed it). Returns that onset and the values since, before
        ``step``; the held high values were its start, so they never join the baseline."""
        first = next((s for s, v in self.recent if v > limit), None)
        onset = step if first is None else min(first, step)
        self.held.clear()
        return onset, [v for s, v in self.recent if onset <= s < step]

    def forget_recent(self) -> None:
        """After a restore: the level is judged on the restored weights' losses only."""
        self.recent.clear()
        self.held.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "recent": [list(r) for r in self.recent], "held": [list(h) for h in self.held], "normal": list(self.normal),
            "first": list(self.first), "start": self.start, "best": None if self.best is None else list(self.best), "seen": self.seen,
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend((int(s), float(v)) for s, v in state["recent"])
        self.held.clear()
        self.held.extend((int(s), float(v)) for s, v in state["held"])
        self.normal.clear()
        for value in state["normal"]:
            self.normal.append(float(value))
        self.first = [float(v) for v in state["first"]]
        self.start = None if state["start"] is None else float(state["start"])
        self.best = None if state["best"] is None else (float(state["best"][0]), float(state["best"][1]))
        self.seen = int(state["seen"])


@dataclass
class RecoveryEvent:
    """One decision of the guard, with its evidence.

    ``action`` is ``"restored"`` (the merge of ``steps_merged`` was loaded), ``"gave up"`` (the
    restore budget was spent; the current level became the new normal) or ``"accepted"`` (a
    restore did not bring the loss back, so the level is taken as the new normal). ``level`` is
    the smoothed loss, ``limit`` the level it crossed, ``baseline`` the normal level, and
    ``losses`` the last per-step losses (rank means) before the decision."""

    step: int
    onset: int
    loss: float
    reason: str
    steps_merged: list[int] = field(default_factory=list)
    action: str = "restored"
    level: float = math.nan
    limit: float = math.nan
    baseline: float = math.nan
    losses: list[float] = field(default_factory=list)
    batch_loss: float = math.nan  # the current weights on the batch of the decision
    stable_loss: float = math.nan  # the stable point (the restore's merge) on the same batch

    @property
    def steps_lost(self) -> int:
        """Training steps discarded: from the newest merged snapshot to the restore."""
        return self.step - max(self.steps_merged) if self.action == "restored" and self.steps_merged else 0

    def __str__(self) -> str:
        evidence = ", ".join(f"{v:.4g}" for v in self.losses[-8:])
        checked = (
            ""
            if math.isnan(self.batch_loss)
            else f"; on this batch {self.batch_loss:.4g} vs {self.stable_loss:.4g} for the stable point"
        )
        trouble = (
            f"{self.reason} at step {self.step} (abnormal since step {self.onset}; smoothed loss {self.level:.4g}, "
            f"limit {self.limit:.4g}, baseline {self.baseline:.4g}; last losses [{evidence}]{checked})"
        )
        if self.action == "restored":
            return f"{trouble}: restored the merge of snapshots {self.steps_merged} ({self.steps_lost} steps of training lost)"
        if self.action == "gave up":
            return f"{trouble}: the restore budget is spent, so recovery gives up; the current loss level is taken as the new normal"
        return f"{trouble}: restoring does not help (the data or the objective changed, not the weights); this level is taken as the new normal"


class SpikeGuard:
    """Watches the training loss and restores a merged stable point when training diverges.

    Args:
        window: the snapshots to restore from.
        policy: the rule and the action (:class:`RecoveryPolicy`).
        merge, alpha, merge_options: the merge used for a restore unless ``policy.merge`` names
            one (then with ``policy.merge_options``).

    Each decision is kept in :attr:`events` (a :class:`RecoveryEvent`, with the losses that
    triggered it) and warned about once (rank 0 of a multi-process run).
    """

    def __init__(
        self,
        window: CheckpointWindow,
        policy: RecoveryPolicy | None = None,
        merge: Method = "sma",
        alpha: float = DEFAULT_ALPHA,
        merge_options: Mapping[str, Any] | None = None,
    ):
        self.window = window
        self.policy = policy or RecoveryPolicy()
        self.merge: Method = self.policy.merge or merge
        self.alpha = alpha
        self.merge_options = (
            dict(merge_options or {}) if self.policy.merge is None else dict(self.policy.merge_options or {})
        )
        self.loss_level = SmoothedLevel(self.policy)
        self.grad_level = SmoothedLevel(self.policy)
        self.onset: int | None = None  # first step of the current abnormal stretch
        self.abnormal_steps = 0
        self.stretch: list[float] = []  # the losses of the current abnormal stretch
        self.recovered_since_restore = True  # a normal level has been seen since the last restore
        self.last_loss = math.nan
        self.last_loss_finite = True  # none observed yet; a NaN loss is never healthy, also after giving up
        self.reason = ""
        self.limit = math.inf
        self.events: list[RecoveryEvent] = []
        self.lr_scaled_until = -1
        self.checked = (math.nan, math.nan)  # the last check: (current weights, stable point) on one batch
        self.paused_until = -1  # after giving up: no action until the restore budget has room again

    @property
    def healthy(self) -> bool:
        """False while the loss is abnormal (its level, or the last loss alone): no snapshot should
        be taken then."""
        return self.onset is None and self.last_loss_finite and not self.last_loss > self.limit

    @property
    def restores(self) -> list[RecoveryEvent]:
        """The events that restored weights."""
        return [e for e in self.events if e.action == "restored"]

    def observe(
        self,
        step: int,
        loss: float,
        grad_norm: float | None = None,
        *,
        model: nn.Module | None = None,
        evaluate: Callable[[], float] | None = None,
    ) -> bool:
        """Record one optimizer step's loss; return True when a restore is due now.

        ``model`` (after the step) lets a non-finite loss be told apart from non-finite weights:
        without it, a non-finite loss is taken to have poisoned the weights. ``evaluate`` (with
        ``model``) returns the loss of ``model``'s current weights on the current batch, without
        gradients; it is called only when a restore is due (twice: on the current weights and on
        the stable point swapped in), to check that restoring helps. In a multi-process run
        every rank calls this at every step and the ranks judge the mean of their losses (one small
        all-reduce), so all of them act at the same step, also when the loss diverged on one rank."""
        group = self.window.process_group
        loss, grad = all_ranks_mean([loss, math.nan if grad_norm is None else grad_norm], group)
        grad_norm = None if grad_norm is None else grad
        self.last_loss, self.last_loss_finite = loss, math.isfinite(loss)
        if step <= self.paused_until:
            self.limit = math.inf
            self.loss_level.push(step, loss)
            self.loss_level.accept([loss])
            return False
        if not math.isfinite(loss) and (model is None or all_ranks_max(int(not _weights_finite(model)), group)):
            self.limit = self.loss_level.loss_limit()
            self.loss_level.push(step, loss)
            self._open_stretch(step, "non-finite loss" if model is None else "non-finite loss and weights", loss)
            return True  # nothing can come back from non-finite weights

        level, armed = self.loss_level, self.loss_level.armed
        self.limit = level.loss_limit()
        level.push(step, loss)
        if grad_norm is not None and self.policy.grad_norm_threshold is not None:
            self.grad_level.push(step, grad_norm)
        reason = self._verdict()
        if reason is None:
            if self.onset is not None:
                level.accept(self.stretch)  # it came back by itself: those losses were part of a healthy run
                self.onset, self.abnormal_steps, self.stretch = None, 0, []
            if armed or level.seen <= self.policy.warmup:  # during warm-up every loss builds the baseline
                level.offer(step, loss, self.limit)
                if grad_norm is not None and math.isfinite(grad_norm):
                    self.grad_level.accept([grad_norm])
            self.recovered_since_restore = self.recovered_since_restore or armed
            return False
        self._open_stretch(step, reason, loss)
        if self.abnormal_steps < self.policy.patience:
            return False
        if model is not None and evaluate is not None:
            if self._restoring_helps(model, evaluate):
                return True
            if len(self.stretch) >= self.policy.accept_after:
                self._new_normal(step, "accepted")
            else:
                self.abnormal_steps = 0  # look again after another `patience` steps
            return False
        if not self.recovered_since_restore:
            self._new_normal(step, "accepted")
            return False
        return True

    def _restoring_helps(self, model: nn.Module, evaluate: Callable[[], float]) -> bool:
        """Whether the stable point beats the current weights on the current batch by at least the
        alarm margin (the ranks agree on the mean)."""
        trusted_before, snapshots = self._stable_snapshots(self.onset if self.onset is not None else 0)
        if not snapshots:
            return True  # nothing to compare: restore() says so
        with torch.no_grad():
            current = evaluate()
            with self.window.swapped(model, self.merge, self.alpha, before=trusted_before, **self.merge_options):
                stable = evaluate()
        current, stable = all_ranks_mean([current, stable], self.window.process_group)
        self.checked = (current, stable)
        return stable < current - (self.limit - self.loss_level.reference()) or (
            math.isfinite(stable) and not math.isfinite(current)
        )

    def _verdict(self) -> str | None:
        level = self.loss_level
        if self.limit < math.inf and level.level() > self.limit:
            return "loss spike" if math.isfinite(level.level()) else "non-finite losses"
        ratio = self.policy.grad_norm_threshold
        if ratio is not None and self.grad_level.level() > self.grad_level.ratio_limit(ratio):
            return "gradient-norm spike"
        return None

    def _open_stretch(self, step: int, reason: str, loss: float) -> None:
        if self.onset is None:
            self.onset, self.stretch = self.loss_level.start_stretch(step, self.limit)
        self.stretch.append(loss)
        self.abnormal_steps += 1
        self.reason = reason

    def _event(self, step: int, action: str, steps_merged: list[int] | None = None) -> RecoveryEvent:
        base = self.loss_level.reference()
        losses = [v for _, v in self.loss_level.recent] if self.loss_level.recent else [self.last_loss]
        event = RecoveryEvent(
            step=step, onset=self.onset if self.onset is not None else step, loss=self.last_loss, reason=self.reason,
            steps_merged=steps_merged or [], action=action, level=self.loss_level.level() if self.loss_level.recent else self.last_loss,
            limit=self.limit, baseline=base, losses=(self.stretch or losses)[-EVIDENCE:],
            batch_loss=self.checked[0], stable_loss=self.checked[1],
        )  # fmt: skip
        self.checked = (math.nan, math.nan)
        self.events.append(event)
        if distributed_rank(self.window.process_group)[0] == 0:
            warnings.warn(f"ckptavg: {event}", CkptavgWarning, stacklevel=3)
        return event

    def _new_normal(self, step: int, action: str) -> RecoveryEvent:
        """Stop treating the current level as trouble: it becomes the baseline."""
        event = self._event(step, action)
        recent = [v for _, v in self.loss_level.recent]
        self.loss_level.rebase(self.stretch + recent)
        self.onset, self.abnormal_steps, self.stretch = None, 0, []
        self.recovered_since_restore = True
        return event

    def restore(
        self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (), step: int | None = None
    ) -> RecoveryEvent:
        """Load the merge of the snapshots taken before the trouble began, reset the optimizers,
        and return what was done.

        When the restore budget is spent, gives up instead (``action="gave up"``; the current level
        becomes the new normal), or raises :class:`RecoveryError` with ``on_exhausted="raise"``.
        Raises :class:`RecoveryError` when no snapshot predates the trouble."""
        onset = self.onset if self.onset is not None else (step if step is not None else 0)
        step = onset if step is None else step
        self.onset = onset
        recent = [e for e in self.restores if e.step > step - self.policy.restore_span]
        if len(recent) >= self.policy.max_restores:
            if self.policy.on_exhausted == "raise":
                raise RecoveryError(
                    f"ckptavg: training diverged again at step {step} ({self.reason}, loss {self.last_loss:.4g}) after "
                    f"{len(recent)} restores within {self.policy.restore_span} steps (at steps {[e.step for e in recent]}). "
                    "Restoring once more would loop. Try a lower learning rate or gradient clipping, a longer warm-up, "
                    "RecoveryPolicy(lr_scale=0.5, lr_scale_steps=...), or raise max_restores."
                )
            self.paused_until = recent[0].step + self.policy.restore_span
            return self._new_normal(step, "gave up")
        trusted_before, stable = self._stable_snapshots(onset)
        if not stable and self.policy.on_exhausted == "warn":
            self.reason += f"; no snapshot predates step {trusted_before}, so there is nothing to restore"
            return self._new_normal(step, "gave up")
        if not stable:
            raise RecoveryError(
                f"ckptavg: training diverged at step {step} ({self.reason}, loss {self.last_loss:.4g}), but no snapshot "
                f"predates step {trusted_before} (held: {self.window.steps}). Take snapshots earlier (a lower "
                "start_step or a shorter interval) so that a stable point exists."
            )
        self.window.load_into(model, self.merge, self.alpha, before=trusted_before, **self.merge_options)
        self.window.discard_from(trusted_before)  # taken after the trouble began: never merge them
        for optimizer in optimizers:
            if self.policy.reset_optimizer:
                optimizer.state.clear()  # moments built from the diverging steps
            optimizer.zero_grad(set_to_none=True)
        event = self._event(step, "restored", stable)
        self.onset, self.abnormal_steps, self.stretch = None, 0, []
        self.loss_level.forget_recent()
        self.grad_level.forget_recent()
        self.recovered_since_restore = False
        self.lr_scaled_until = step + self.policy.lr_scale_steps
        return event

    def _stable_snapshots(self, onset: int) -> tuple[int, list[int]]:
        """The step before which snapshots are trusted, and the held steps before it. The loss of
        step t is computed with the weights left by step t - 1, so the first abnormal loss (at the
        onset) condemns the snapshot of step onset - 1 too: it was never vouched for."""
        trusted_before = onset - 1
        return trusted_before, [s for s in self.window.steps if s < trusted_before]

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier to apply at ``step`` (1.0 outside a post-restore stretch)."""
        return self.policy.lr_scale if step <= self.lr_scaled_until else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": GUARD_STATE_VERSION,
            "loss_level": self.loss_level.state_dict(),
            "grad_level": self.grad_level.state_dict(),
            "onset": self.onset,
            "abnormal_steps": self.abnormal_steps,
            "stretch": list(self.stretch),
            "recovered_since_restore": self.recovered_since_restore,
            "last_loss": self.last_loss,
            "limit": self.limit,
            "events": [asdict(e) for e in self.events],
            "lr_scaled_until": self.lr_scaled_until,
            "paused_until": self.paused_until,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.events = [RecoveryEvent(**e) for e in state["events"]]
        self.lr_scaled_until = int(state["lr_scaled_until"])
        if state.get("version") != GUARD_STATE_VERSION:
            return  # an older detector's history means something else: this one warms up afresh
        self.loss_level.load_state_dict(state["loss_level"])
        self.grad_level.load_state_dict(state["grad_level"])
        self.onset = state["onset"]
        self.abnormal_steps = int(state["abnormal_steps"])
        self.stretch = [float(v) for v in state["stretch"]]
        self.recovered_since_restore = bool(state["recovered_since_restore"])
        self.last_loss, self.limit = float(state["last_loss"]), float(state["limit"])
        self.paused_until = int(state["paused_until"])


def _weights_finite(model: nn.Module) -> bool:
    """Whether every floating tensor this process holds of ``model`` is finite."""
    tensors = [local_tensor(t).detach() for t in state_tensors(model).values() if t.is_floating_point()]
    return all(all_finite(t) for t in tensors)
