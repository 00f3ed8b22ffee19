"""Annealing replacement on real tasks: constant LR + a checkpoint merge vs planned decay schedules.

Two tasks, each over several seeds (``--seeds``, mean and spread reported):

- ``gpt``: a byte-level GPT (benchmarks/models.py: ByteGPT) learns the Python standard library's
  own source (a fixed, sorted file list; every 10th file held out, split into a selection half
  and a report half).
- ``digits``: a small convolutional classifier on scikit-learn's 8x8 digits (1197 training
  images, 300 for selection, 300 to report).

Within a seed every variant has the same initialisation, the same data at every step and the
same peak learning rate (AdamW, linear warm-up):

- constant LR, last checkpoint; cosine to 10%; WSD (constant, then the last 20% cooled down
  linearly, or with 1-sqrt, to 0), branched from the constant run; schedule-free AdamW (the
  ``schedulefree`` package, evaluated in its ``eval()`` mode as documented);
- the constant run's merges with **zero cooldown steps**. The run keeps a window of 32 snapshots,
  one every steps/160, guarded by ``SpikeGuard`` with the default ``RecoveryPolicy``, as the
  callback runs. Rows "(default window)" use what ``CheckpointAverager()`` uses: 8 snapshots,
  one every steps/80 (every second stored one). The post-hoc EMA rows and the rows chosen on
  data read all 32 (a fifth of the run); "selected", "greedy soup" and "learned" choose on the
  selection half of the held-out data and are reported on the other half;
- a true power-function EMA (EDM2) tracked at every step, beside its post-hoc reconstruction
  from the window.

Preview check: at three points of the constant run, the preview (SMA of the default window, and
the merge ``select`` picks) is compared with the loss a short cooldown (10% of the steps,
linear to 0) started from that point reaches: errors, and the rank correlation across points.

Results: tables, benchmarks/results/anneal.json, and figures anneal_curves.png (seed 0's curves)
and anneal_coefficients.png (each method's coefficient vector over the window).

    python benchmarks/anneal.py --seeds 3 --jobs 2   # gpt and digits, 1000 steps, about 50 minutes on 2 cores
    python benchmarks/anneal.py --quick              # 300 steps, 1 seed, a few minutes

The same question at three run lengths, against planned decays whose peak learning rates are each
tuned: ``benchmarks/anneal_lengths.py`` (which reuses this file's tasks and training loop).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, report  # noqa: E402
from models import ByteGPT, batch_at, stdlib_bytes, validation_batches  # noqa: E402

from ckptavg import CheckpointWindow, CkptavgWarning, SpikeGuard, evaluator, learn_weights, select  # noqa: E402
from ckptavg.methods import coefficients  # noqa: E402
from ckptavg.methods.posthoc import gamma_of  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


# -- tasks ---------------------------------------------------------------------------------------


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class Task:
    """A model, its data as ``(inputs, targets)`` batches, and its loss."""

    name: str
    make_model: Callable[[], nn.Module]
    train_batch: Callable[[int, int], Batch]  # (step, seed) -> the batch of that step
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    report: list[Batch]  # held-out data the tables report
    select: list[Batch]  # other held-out data, for merges chosen on data
    peak_lr: float
    unit: str
    accuracy: bool = False


def gpt_task(layers: int = 4, context: int = 128, held_out_batches: int = 6) -> Task:
    train, val_bytes, files = stdlib_bytes()
    held_out = [
        (b[:, :-1], b[:, 1:])
        for b in validation_batches(val_bytes, count=held_out_batches, batch_size=32, context=context)
    ]
    return Task(
        name=f"ByteGPT ({layers} layers, context {context}) on the stdlib ({len(files)} files, {train.numel() / 1e6:.1f} MB)",
        make_model=lambda: ByteGPT(layers=layers, context=context),
        train_batch=lambda step, seed: (lambda b: (b[:, :-1], b[:, 1:]))(batch_at(train, step, 16, context, seed)),
        loss_fn=sequence_loss,
        report=held_out[0::2],  # interleaved halves: both span every validation file
        select=held_out[1::2],
        peak_lr=2e-3,
        unit="nats/byte",
    )


class DigitsNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
        )  # fmt: skip


def digits_task() -> Task:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])
    train_x, train_y = x[:1197], y[:1197]

    def train_batch(step: int, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(train_x), (32,), generator=g)
        return train_x[idx], train_y[idx]

    return Task(
        name="a convolutional classifier on scikit-learn's digits (1197 train / 300 select / 300 report)",
        make_model=DigitsNet,
        train_batch=train_batch,
        loss_fn=nn.functional.cross_entropy,
        report=[(x[1497:], y[1497:])],
        select=[(x[1197:1497], y[1197:1497])],
        peak_lr=3e-3,
        unit="nats",
        accuracy=True,
    )


TASKS = {"gpt": gpt_task, "digits": digits_task}


# -- schedules -----------------------------------------------------------------------------------


@dataclass
class Config:
    steps: int
    seed: int = 0
    evals: int = 30
    stored: int = 32
    default_window: int = 8
    check_points: tuple[float, ...] = (0.5, 0.7, 0.9)
    learn_steps: int = 60

    @property
    def warmup(self) -> int:
        return max(10, self.steps // 20)

    @property
    def base_interval(self) -> int:
        return max(1, self.steps // (self.stored * 5))  # 32 stored snapshots span the last 20%

    @property
    def default_every(self) -> int:
        return 2  # the callback's default: steps // (10 x window) = steps/80, every second stored one

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evals)


Schedule = Callable[[int], float]


def constant(cfg: Config, peak: float) -> Schedule:
    return lambda step: peak * min(1.0, step / cfg.warmup)


def cosine(cfg: Config, peak: float) -> Schedule:
    def lr(step: int) -> float:
        if step <= cfg.warmup:
            return peak * step / cfg.warmup
        progress = (step - cfg.warmup) / (cfg.steps - cfg.warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr


def cooldown(peak: float, start: int, length: int, shape: str = "linear") -> Schedule:
    """From the peak at ``start`` to 0 at ``start + length``: linear, or 1-sqrt (Hagele et al.)."""

    def lr(step: int) -> float:
        progress = min(1.0, max(0.0, (step - start) / length))
        return peak * ((1 - progress) if shape == "linear" else (1 - math.sqrt(progress)))

    return lr


# -- training ------------------------------------------------------------------------------------


@dataclass
class Run:
    """A model, its optimizer and its step, trained on the task's step-indexed batches."""

    task: Task
    cfg: Config
    schedule_free: bool = False
    peak_lr: float | None = None  # default: the task's
    model: nn.Module = field(init=False)
    step: int = 0

    def __post_init__(self) -> None:
        self.peak_lr = self.peak_lr or self.task.peak_lr
        torch.manual_seed(self.cfg.seed)
        self.model = self.task.make_model()
        self.optimizer = self._optimizer(self.model)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.schedule_free:
            import schedulefree

            return schedulefree.AdamWScheduleFree(
                model.parameters(),
                lr=self.peak_lr,
                betas=(0.9, 0.95),
                weight_decay=0.1,
                warmup_steps=self.cfg.warmup,
            )
        return torch.optim.AdamW(model.parameters(), lr=self.peak_lr, betas=(0.9, 0.95), weight_decay=0.1)

    def branch(self) -> Run:
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.optimizer = self._optimizer(other.model)
        other.optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        return other

    def advance(self, schedule: Schedule | None, until: int, every: Callable[[Run], None] | None = None) -> None:
        """Train to step ``until``; call ``every(self)`` after each step."""
        self.model.train()
        if self.schedule_free:
            self.optimizer.train()  # type: ignore[attr-defined]
        while self.step < until:
            self.step += 1
            if schedule is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = schedule(self.step)
            self.batch = self.task.train_batch(self.step, self.cfg.seed)
            loss = self.task.loss_fn(self.model(self.batch[0]), self.batch[1])
            self.loss = loss.item()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            if every is not None:
                every(self)

    def evaluate(self, model: nn.Module | None = None, batches: list[Batch] | None = None) -> dict[str, float]:
        """``measure`` on the report half (or ``batches``); schedule-free at its averaged point."""
        model = model or self.model
        was_training = model.training
        model.eval()
        if self.schedule_free and model is self.model:
            self.optimizer.eval()  # type: ignore[attr-defined]  # schedule-free: evaluate at the averaged point
        try:
            return measure(self.task, model, batches)
        finally:
            if self.schedule_free and model is self.model:
                self.optimizer.train()  # type: ignore[attr-defined]
            model.train(was_training)


@torch.no_grad()
def measure(task: Task, model: nn.Module, batches: list[Batch] | None = None) -> dict[str, float]:
    batches = task.report if batches is None else batches
    losses, correct, total = [], 0, 0
    for inputs, targets in batches:
        output = model(inputs)
        losses.append(float(task.loss_fn(output, targets)))
        if task.accuracy:
            correct += int((output.argmax(-1) == targets).sum())
            total += targets.numel()
    result = {"loss": math.fsum(losses) / len(losses)}
    if task.accuracy:
        result["accuracy"] = correct / total
    return result


class PowerEma:
    """EDM2's power-function EMA, updated at every step: beta_t = (1 - 1/t)^(gamma + 1)."""

    def __init__(self, model: nn.Module, gamma: float) -> None:
        self.gamma = gamma
        self.params = [p.detach().clone() for p in model.parameters()]

    def update(self, model: nn.Module, step: int) -> None:
        beta = (1 - 1 / step) ** (self.gamma + 1)
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - beta)

    def model(self, like: nn.Module) -> nn.Module:
        twin = copy.deepcopy(like)
        with torch.no_grad():
            for p, value in zip(twin.parameters(), self.params, strict=True):
                p.copy_(value)
        return twin


# -- one seed ------------------------------------------------------------------------------------


def default_subset(window: CheckpointWindow, cfg: Config) -> list[int]:
    """Indices of the default window: the newest of the stored snapshots, every ``default_every``."""
    held = len(window)
    picked = [held - 1 - cfg.default_every * i for i in range(cfg.default_window)]
    return [i for i in picked if i >= 0][::-1]


def spread_over(window: CheckpointWindow, subset: list[int], method: str, **options: Any) -> list[float]:
    """A method's coefficient vector over a subset of the stored snapshots, zeros elsewhere."""
    steps = window.steps
    weights = [0.0] * len(steps)
    chosen = coefficients(method, [steps[i] for i in subset], **options)
    for index, w in zip(subset, chosen, strict=True):
        weights[index] = w
    return weights


def run_seed(task_name: str, steps: int, seed: int, evals: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", CkptavgWarning)  # post-hoc EMA's truncation warning: reported in the table instead
    task = TASKS[task_name]()
    cfg = Config(steps=steps, seed=seed, evals=evals)
    peak = task.peak_lr
    started = time.perf_counter()
    log = lambda text: print(f"[{task_name} seed {seed} {time.perf_counter() - started:5.0f}s] {text}", flush=True)  # noqa: E731

    base = Run(task, cfg)
    scratch = task.make_model()
    window = CheckpointWindow(window=cfg.stored)
    guard = SpikeGuard(window)  # recovery on, with the default policy, as a user would run it
    select_on = evaluator(scratch, task.loss_fn, task.select)
    power = {
        sigma: PowerEma(base.model, gamma_of(sigma)) for sigma in (0.05, 0.10)
    }  # the widths the post-hoc rows reconstruct
    curves: dict[str, list[tuple[int, float]]] = {"constant (raw)": [], "preview (SMA, default window)": []}
    checks: list[dict[str, Any]] = []
    check_steps = {int(round(f * steps / cfg.base_interval)) * cfg.base_interval for f in cfg.check_points}
    wsd_start = int(0.8 * steps)
    branches: dict[str, Run] = {}

    def merged_loss(weights: list[float]) -> dict[str, float]:
        window.load_into(scratch, weights)
        return measure(task, scratch)

    def after_step(run: Run) -> None:
        batch_loss = lambda: float(task.loss_fn(run.model(run.batch[0]), run.batch[1]))  # noqa: E731
        if guard.observe(run.step, run.loss, model=run.model, evaluate=batch_loss):
            log(guard.restore(run.model, [run.optimizer], run.step))
        for ema in power.values():
            ema.update(run.model, run.step)
        if run.step % cfg.base_interval == 0 and guard.healthy:
            window.snapshot(run.model, step=run.step)
        if run.step % cfg.eval_every == 0 or run.step == steps:
            curves["constant (raw)"].append((run.step, run.evaluate()["loss"]))
            if len(window) >= 2:
                curves["preview (SMA, default window)"].append(
                    (run.step, merged_loss(spread_over(window, default_subset(window, cfg), "sma"))["loss"])
                )
        if run.step in check_steps and len(window) >= 2:
            preview = merged_loss(spread_over(window, default_subset(window, cfg), "sma"))["loss"]
            picked, _ = select(window, select_on)
            selected = merged_loss(picked)["loss"]
            cooled = run.branch()
            cooled.advance(cooldown(peak, run.step, steps // 10), run.step + steps // 10)
            checks.append(
                {"step": run.step, "preview": preview, "selected": selected, "cooldown": cooled.evaluate()["loss"]}
            )
            log(
                f"step {run.step}: preview {preview:.4f}, selected {selected:.4f}, after a cooldown {checks[-1]['cooldown']:.4f}"
            )
        if run.step == wsd_start:
            branches["linear"], branches["1-sqrt"] = run.branch(), run.branch()

    base.advance(constant(cfg, peak), steps, after_step)
    results: dict[str, dict[str, float]] = {"constant LR, last checkpoint": base.evaluate()}
    log(f"constant: {results['constant LR, last checkpoint']['loss']:.4f}; recovery decisions: {len(guard.events)}")

    def track(name: str) -> Callable[[Run], None]:
        curves[name] = []
        return lambda run: (
            curves[name].append((run.step, run.evaluate()["loss"])) if run.step % cfg.eval_every == 0 else None
        )

    for shape, label in (("linear", "WSD, 20% linear cooldown"), ("1-sqrt", "WSD, 20% 1-sqrt cooldown")):
        branches[shape].advance(cooldown(peak, wsd_start, steps - wsd_start, shape), steps, track(label))
        results[label] = branches[shape].evaluate()
    cos = Run(task, cfg)
    cos.advance(cosine(cfg, peak), steps, track("cosine to 10%"))
    results["cosine to 10%"] = cos.evaluate()
    free = Run(task, cfg, schedule_free=True)
    free.advance(None, steps, track("schedule-free AdamW"))
    results["schedule-free AdamW"] = free.evaluate()
    log("schedules done")

    # -- the merges, zero cooldown steps -----------------------------------------------------------
    subset = default_subset(window, cfg)
    everything = list(range(len(window)))
    vectors: dict[str, list[float]] = {
        "SMA (default window)": spread_over(window, subset, "sma"),
        "WMA (default window)": spread_over(window, subset, "wma"),
        "EMA alpha=0.2 (default window)": spread_over(window, subset, "ema"),
        "decay cosine (default window)": spread_over(window, subset, "decay", shape="cosine"),
        "decay 1-sqrt (default window)": spread_over(window, subset, "decay", shape="1-sqrt"),
        "post-hoc EMA sigma_rel=0.05 (32)": spread_over(window, everything, "posthoc", sigma_rel=0.05),
        "post-hoc EMA sigma_rel=0.10 (32)": spread_over(window, everything, "posthoc", sigma_rel=0.10),
    }
    vectors["greedy soup (32, selection data)"] = window.weights("greedy_soup", evaluate=select_on)
    picked, table = select(window, select_on)
    chosen_name = min(table, key=lambda row: row["score"])["name"]
    vectors[f"selected (32, selection data): {chosen_name}"] = picked
    vectors["learned (32, selection data)"] = learn_weights(
        window, scratch, task.loss_fn, task.select, steps=cfg.learn_steps, lr=0.05
    )
    for name, weights in vectors.items():
        results[name] = merged_loss(weights)
    for sigma, ema in power.items():
        results[f"true power EMA sigma_rel={sigma:.2f} (every step)"] = measure(task, ema.model(base.model).eval())
    # the profile's mass before the window, as posthoc.py drops it (window.steps[-1] == steps)
    lost = {
        sigma: ((window.steps[0] - cfg.base_interval / 2) / steps) ** (ema.gamma + 1) for sigma, ema in power.items()
    }
    log("merges done")
    return {
        "seed": seed,
        "results": results,
        "vectors": vectors,
        "selected": chosen_name,
        "select_table": [{"name": r["name"], "score": r["score"]} for r in table],
        "checks": checks,
        "curves": curves,
        "steps_stored": window.steps,
        "posthoc_profile_lost": lost,
        "recovery_decisions": [str(e) for e in guard.events],
        "seconds": time.perf_counter() - started,
    }


# -- the tables ----------------------------------------------------------------------------------


SCHEDULES = [
    "constant LR, last checkpoint",
    "cosine to 10%",
    "WSD, 20% linear cooldown",
    "WSD, 20% 1-sqrt cooldown",
    "schedule-free AdamW",
]


def canonical(name: str) -> str:
    return name.split(": ")[0]  # "selected (...): sma-newest-9" -> one row over seeds


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(dict.fromkeys(canonical(n) for run in runs for n in run["results"]))
    rows = []
    for name in names:
        per_seed = [next(v for n, v in run["results"].items() if canonical(n) == name) for run in runs]
        losses = [r["loss"] for r in per_seed]
        vs_wsd = [
            r["loss"] / run["results"]["WSD, 20% linear cooldown"]["loss"] - 1
            for r, run in zip(per_seed, runs, strict=True)
        ]
        vs_free = [
            r["loss"] / run["results"]["schedule-free AdamW"]["loss"] - 1 for r, run in zip(per_seed, runs, strict=True)
        ]
        row = {
            "variant": name,
            "cooldown steps": "20%" if name.startswith("WSD") else ("-" if name in SCHEDULES else "0"),
            "val loss": statistics.fmean(losses),
            "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "vs WSD": statistics.fmean(vs_wsd),
            "vs WSD std": statistics.stdev(vs_wsd) if len(vs_wsd) > 1 else 0.0,
            "vs schedule-free": statistics.fmean(vs_free),
            "per seed": losses,
        }
        if "accuracy" in per_seed[0]:
            row["accuracy"] = statistics.fmean(r["accuracy"] for r in per_seed)
        if name.startswith("selected"):
            row["picked"] = [next(n for n in run["results"] if canonical(n) == name).split(": ")[1] for run in runs]
        rows.append(row)
    merges = [r for r in rows if r["cooldown steps"] == "0" and not r["variant"].startswith("true power")]
    best = min(merges, key=lambda r: r["val loss"])
    errors = {
        kind: [c[kind] - c["cooldown"] for run in runs for c in run["checks"]] for kind in ("preview", "selected")
    }
    ranks = {
        kind: [
            spearman([c[kind] for c in run["checks"]], [c["cooldown"] for c in run["checks"]])
            for run in runs
            if len(run["checks"]) > 1
        ]
        for kind in ("preview", "selected")
    }
    return {
        "rows": rows,
        "best merge": best["variant"],
        "best merge vs WSD": best["vs WSD"],
        "best merge vs schedule-free": best["vs schedule-free"],
        "best merge beats WSD in seeds": sum(
            loss < run["results"]["WSD, 20% linear cooldown"]["loss"]
            for loss, run in zip(best["per seed"], runs, strict=True)
        ),
        "preview check": {
            kind: {
                "mean abs error": float(np.mean(np.abs(e))) if e else math.nan,
                "mean error": float(np.mean(e)) if e else math.nan,
                "rank correlation (mean over seeds)": float(np.mean(ranks[kind])) if ranks[kind] else math.nan,
            }
            for kind, e in errors.items()
        },  # fmt: skip
    }


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def print_summary(task_name: str, summary: dict[str, Any], seeds: int) -> None:
    print(f"\n{task_name}: best zero-cooldown merge {summary['best merge']}: {summary['best merge vs WSD'] * 100:+.2f}% vs WSD "
          f"(below WSD in {summary['best merge beats WSD in seeds']} of {seeds} seeds), "
          f"{summary['best merge vs schedule-free'] * 100:+.2f}% vs schedule-free AdamW")  # fmt: skip
    for kind, check in summary["preview check"].items():
        print(f"  {kind} vs the loss after a 10% cooldown from the same point: mean error {check['mean error']:+.4f}, "
              f"mean abs {check['mean abs error']:.4f}, rank correlation {check['rank correlation (mean over seeds)']:.2f}")  # fmt: skip


# -- figures -------------------------------------------------------------------------------------


def plot(runs_by_task: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(runs_by_task.values()))[0]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in first["curves"].items():
        if points:
            ax.plot(*zip(*points, strict=True), label=name, lw=1.2)
    low = min(min(v for _, v in pts) for pts in first["curves"].values() if pts)
    ax.set_ylim(low - 0.05, low + 0.6)
    ax.set(xlabel="optimizer step", ylabel="validation loss", title=f"{next(iter(runs_by_task))}, seed {first['seed']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "anneal_curves.png", dpi=110)

    vectors = first["vectors"]
    steps = first["steps_stored"]
    fig, axes = plt.subplots(2, (len(vectors) + 1) // 2, figsize=(15, 5.5), sharex=True, sharey=True)
    for ax, (name, weights) in zip(axes.flat, vectors.items(), strict=False):  # the grid may have a spare cell
        ax.bar(steps, weights, width=(steps[1] - steps[0]) * 0.8 if len(steps) > 1 else 1, color="tab:blue")
        ax.set_title(name.replace(" (", "\n("), fontsize=8)
        ax.axhline(0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(vectors) :]:
        ax.axis("off")
    fig.supxlabel("snapshot step (the 32 stored snapshots; the default window is every second of the newest 16)")
    fig.supylabel("coefficient")
    fig.suptitle(f"Coefficient vectors over the window ({next(iter(runs_by_task))}, seed {first['seed']})")
    fig.tight_layout()
    fig.savefig(RESULTS / "anneal_coefficients.png", dpi=100)
    plt.close("all")
    print(f"figures: {RESULTS / 'anneal_curves.png'}, {RESULTS / 'anneal_coefficients.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="gpt,digits", help="comma-separated: gpt, digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (one torch thread each)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps of every run (default 1000; 300 with --quick)"
    )
    parser.add_argument("--evals", type=int, default=30, help="evaluation points along each curve")
    parser.add_argument("--quick", action="store_true", help="300 steps, 1 seed")
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 1000)
    seeds = 1 if args.quick else args.seeds
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    started = time.perf_counter()
    jobs = [(task, steps, seed, args.evals) for task in tasks for seed in range(seeds)]
    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_seed, *zip(*jobs, strict=True)))
    else:
        done = [run_seed(*job) for job in jobs]
    runs_by_task = {task: [r for r, job in zip(done, jobs, strict=True) if job[0] == task] for task in tasks}
    summaries = {task: summarize(runs) for task, runs in runs_by_task.items()}
    extra = {
        "tasks": {task: {"summary": summaries[task], "runs": runs_by_task[task]} for task in tasks},
        "config": {
            "steps": steps,
            "seeds": seeds,
            "stored": Config(steps).stored,
            "interval": Config(steps).base_interval,
        },
        "seconds": time.perf_counter() - started,
    }
    columns = [
        "task",
        "variant",
        "cooldown steps",
        "val loss",
        "std",
        "vs WSD",
        "vs WSD std",
        "vs schedule-free",
        "accuracy",
    ]
    table = [{"task": task, **row} for task in tasks for row in summaries[task]["rows"]]
    report("anneal", f"Annealing replacement: {steps} steps, {seeds} seeds (mean, sample std)", columns, table, extra)
    for task in tasks:
        print_summary(task, summaries[task], seeds)
    plot(runs_by_task)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
