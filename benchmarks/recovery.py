"""Divergence detection: false alarms on healthy runs, and real trouble caught, with the defaults.

Every run is a plain PyTorch loop driven by ``SpikeGuard(window, RecoveryPolicy())`` exactly as a
user would write it (``observe(..., model=model)`` every step; a snapshot every ``every`` steps
when the guard says the run is healthy), on data that ships with installed packages:

Healthy runs (3 seeds each; any alarm is a false alarm):

- ``digits-b8``, ``digits-b32``, ``digits-b128``: an MLP on scikit-learn's 8x8 digits, AdamW at a
  constant 1e-2; the per-batch loss goes to about zero, with heavy-tailed outliers;
- ``digits-b32-clip``: the same with gradient clipping (norm 1);
- ``digits-shift``: classes 0-4 for the first half, then all ten (a data-mix change: the loss jumps);
- ``regression``: a student MLP learns a teacher MLP (MSE goes to about 1e-4), SGD with momentum;
- ``contrastive``: InfoNCE between two noisy views of each digit (loss about ln(2 x batch));
- ``lm``, ``lm-clip``: a byte-level GPT on this interpreter's standard library (AdamW 2e-3; with
  and without clipping);
- ``lm-shift``: the same model switching to C++ headers shipped with torch half-way.

Trouble, injected half-way into ``digits-b32`` and ``lm`` (2 seeds each), with the default
recovery and without it:

- ``lr-blast``: 1000x the learning rate for 3 steps;
- ``nan-batches``: 3 batches that make the loss (and, through the step, the weights) NaN;
- ``corrupt-stream``: 40 corrupted batches in a row (digits: inputs x 50; LM: random bytes);
- ``slow-divergence``: the learning rate grows geometrically to 400x over 300 steps, then returns;
- ``optimizer-blowup``: AdamW's second moments scaled by 1e-12 (the next update explodes).

Reported: alarms per healthy task and the closest call (peak smoothed level as a share of the
way from the baseline to the limit: under 1 means no alarm); for each kind of trouble, whether it
was caught, the detection delay, restores, steps lost per restore, and the validation loss of the
end-of-run merge with recovery, without it, and of the clean run.

    python benchmarks/recovery.py            # 30 healthy runs, 20 with trouble (+10 without recovery)
    python benchmarks/recovery.py --quick    # fewer steps, one seed
    python benchmarks/recovery.py --quick --tasks digits-b32   # the test suite's smoke run
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402
from models import ByteGPT  # noqa: E402

from ckptavg import CheckpointWindow, RecoveryPolicy, SpikeGuard  # noqa: E402

warnings.filterwarnings("ignore")


# -- tasks -----------------------------------------------------------------------------------------


@dataclass
class Task:
    """A training run: its model and optimizer, its batch at each step, its loss and evaluation."""

    name: str
    steps: int
    every: int  # snapshot interval
    build: Callable[[int], tuple[nn.Module, torch.optim.Optimizer]]
    batch: Callable[[int, int], Any]  # (step, seed) -> batch; depends on nothing else
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    clip: float | None = None
    corrupt: Callable[[Any, int], Any] | None = None  # a corrupted version of a batch (seeded)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def digits_task(name: str, batch_size: int, steps: int, clip: float | None = None, shift: bool = False) -> Task:
    x, y = _digits()
    train_x, train_y, val_x, val_y = x[:1437], y[:1437], x[1437:], y[1437:]
    first_half = torch.nonzero(train_y < 5).squeeze(1)

    def build(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def batch(step: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pool = first_half if shift and step <= steps // 2 else None
        index = torch.randint(0, len(pool) if pool is not None else len(train_x), (batch_size,), generator=g)
        index = pool[index] if pool is not None else index
        return train_x[index], train_y[index]

    def corrupt(b, step: int):
        return b[0] * 50, b[1]

    return Task(
        name, steps, 25, build, batch,
        loss=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        evaluate=lambda m: float(nn.functional.cross_entropy(m(val_x), val_y)),
        clip=clip, corrupt=corrupt,
    )  # fmt: skip


def regression_task(steps: int) -> Task:
    g = torch.Generator().manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    val_x = torch.randn(512, 16, generator=g)
    with torch.no_grad():
        val_y = teacher(val_x)

    def build(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def batch(step: int, seed: int):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        with torch.no_grad():
            return x, teacher(x)

    return Task(
        "regression", steps, 25, build, batch,
        loss=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
        evaluate=lambda m: float(nn.functional.mse_loss(m(val_x), val_y)),
    )  # fmt: skip


def contrastive_task(steps: int) -> Task:
    x, _ = _digits()
    train_x, val_x = x[:1437], x[1437:]

    def views(images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        def noisy() -> torch.Tensor:
            return (images + 0.3 * torch.randn(images.shape, generator=g)) * (
                torch.rand(images.shape, generator=g) > 0.2
            )

        return noisy(), noisy()

    def info_nce(model: nn.Module, pair) -> torch.Tensor:
        a, b = (nn.functional.normalize(model(v), dim=1) for v in pair)
        logits = a @ b.t() / 0.2
        target = torch.arange(len(a))
        return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.t(), target)) / 2

    def build(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        return model, torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(step: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return views(train_x[torch.randint(0, len(train_x), (64,), generator=g)], g)

    val_pair = views(val_x[:256], torch.Generator().manual_seed(7))
    return Task("contrastive", steps, 25, build, batch, loss=info_nce, evaluate=lambda m: float(info_nce(m, val_pair)))


def _text(paths: list[Path]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"\n".join(p.read_bytes() for p in paths)), dtype=torch.uint8).long()


def lm_task(name: str, steps: int, clip: float | None = None, shift: bool = False) -> Task:
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.is_file())
    train, val = _text([p for i, p in enumerate(files) if i % 10 != 9]), _text(files[9::10])
    headers = _text(sorted((Path(torch.__file__).parent / "include" / "ATen").glob("*.h"))[:150]) if shift else train
    context, batch_size = 64, 16
    starts = torch.linspace(0, val.numel() - context - 2, 8 * 32).long()
    val_batches = torch.stack([val[s : s + context + 1] for s in starts.tolist()]).split(32)

    def build(seed: int):
        torch.manual_seed(seed)
        model = ByteGPT(width=64, layers=2, heads=4, context=context)
        return model, torch.optim.AdamW(model.parameters(), lr=2e-3)

    def batch(step: int, seed: int):
        data = headers if shift and step > steps // 2 else train
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        at = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=g)
        return torch.stack([data[s : s + context + 1] for s in at.tolist()])

    def corrupt(tokens: torch.Tensor, step: int) -> torch.Tensor:
        return torch.randint(0, 256, tokens.shape, generator=torch.Generator().manual_seed(step))

    return Task(
        name, steps, 20, build, batch,
        loss=lambda m, b: m.loss(b),
        evaluate=lambda m: float(torch.stack([m.loss(b) for b in val_batches]).mean()),
        clip=clip, corrupt=corrupt,
    )  # fmt: skip


# -- trouble ---------------------------------------------------------------------------------------


@dataclass
class Trouble:
    """What goes wrong, from step ``at``."""

    name: str
    length: int  # steps affected

    def lr_factor(self, k: int) -> float:
        """Learning-rate multiplier ``k`` steps into the trouble."""
        if self.name == "lr-blast":
            return 1000.0
        if self.name == "slow-divergence":
            return 400.0 ** (k / self.length)  # a growth compounding over the whole stretch
        return 1.0


TROUBLES = [
    Trouble("lr-blast", 3),
    Trouble("nan-batches", 3),
    Trouble("corrupt-stream", 40),
    Trouble("slow-divergence", 300),
    Trouble("optimizer-blowup", 1),
]


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    events: list = field(default_factory=list)
    first_held: int | None = None  # first step the guard judged abnormal (snapshots held)
    closest: float = 0.0  # peak of (level - baseline) / (limit - baseline)
    merged: float = math.nan
    raw: float = math.nan
    skipped_snapshots: int = 0
    wall: float = 0.0


def _no_grad(loss: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, batch: Any) -> float:
    with torch.no_grad():
        return float(loss(model, batch))


def train(task: Task, seed: int, trouble: Trouble | None = None, at: int = 0, recover: bool = True) -> Run:
    model, optimizer = task.build(seed)
    window = CheckpointWindow(window=8)
    guard = SpikeGuard(window, RecoveryPolicy())
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    result = Run()
    start = time.perf_counter()
    for step in range(1, task.steps + 1):
        k = step - at
        active = trouble is not None and 0 <= k < trouble.length
        batch = task.batch(step, seed)
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * (trouble.lr_factor(k) if active else 1.0)
        if active and trouble.name == "corrupt-stream":
            batch = task.corrupt(batch, step)
        if active and trouble.name == "optimizer-blowup":
            for state in optimizer.state.values():
                state["exp_avg_sq"].mul_(1e-12)
        poison = active and trouble.name == "nan-batches"
        if poison:
            first = next(iter(model.parameters()))
            saved = first.detach().view(-1)[0].item()
            with torch.no_grad():
                first.view(-1)[0] = math.nan  # like a batch whose features are NaN: loss, gradients, then weights
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if poison:
            with torch.no_grad():
                first.view(-1)[0] = saved
        if task.clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), task.clip)
        optimizer.step()
        value = loss.item()
        if recover:
            evaluate = functools.partial(_no_grad, task.loss, model, batch)  # the current batch, as the callback does
            if guard.observe(step, value, model=model, evaluate=evaluate):
                guard.restore(model, [optimizer], step)
            if guard.onset is not None and result.first_held is None and step >= at:
                result.first_held = step
            if guard.limit < math.inf and not guard.events:
                base = guard.loss_level.reference()
                result.closest = max(result.closest, (guard.loss_level.level() - base) / max(guard.limit - base, 1e-12))
        if step % task.every == 0:
            if guard.healthy if recover else math.isfinite(value):  # as the session does without recovery
                window.snapshot(model, step=step)
            else:
                result.skipped_snapshots += 1
    result.wall = time.perf_counter() - start
    result.events = list(guard.events) if recover else []
    decided = [e.onset for e in result.events if e.onset >= at]
    if decided and (result.first_held is None or min(decided) < result.first_held):
        result.first_held = min(decided)  # an immediate restore (non-finite weights) never leaves the stretch open
    with torch.no_grad():
        result.raw = task.evaluate(model)
        if len(window):
            window.load_into(model, "sma")
            result.merged = task.evaluate(model)
    return result


# -- the tables ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, one seed (a smoke test)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per healthy task")
    parser.add_argument("--trouble-seeds", type=int, default=2, help="seeds per kind of trouble and task")
    parser.add_argument("--tasks", help="comma-separated task names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 0.25 if args.quick else 1.0
    seeds = 1 if args.quick else args.seeds
    trouble_seeds = 1 if args.quick else args.trouble_seeds
    n = lambda steps: max(200, int(steps * scale))  # noqa: E731
    healthy = [
        digits_task("digits-b8", 8, n(2000)),
        digits_task("digits-b32", 32, n(1500)),
        digits_task("digits-b128", 128, n(800)),
        digits_task("digits-b32-clip", 32, n(1500), clip=1.0),
        digits_task("digits-shift", 32, n(1500), shift=True),
        regression_task(n(1500)),
        contrastive_task(n(800)),
        lm_task("lm", n(800)),
        lm_task("lm-clip", n(800), clip=1.0),
        lm_task("lm-shift", n(800), shift=True),
    ]
    if args.tasks:
        healthy = [t for t in healthy if t.name in args.tasks.split(",")]
    rows, clean = [], {}
    for task in healthy:
        runs = [train(task, seed) for seed in range(seeds)]
        for seed, r in enumerate(runs):
            clean[task.name, seed] = r.merged
        alarms = sum(len(r.events) for r in runs)
        row = {
            "healthy task": task.name, "runs": len(runs), "steps": task.steps, "false alarms": alarms,
            "closest call": max(r.closest for r in runs), "snapshots skipped": sum(r.skipped_snapshots for r in runs),
            "merged val loss": float(np.mean([r.merged for r in runs])), "wall s": sum(r.wall for r in runs),
        }  # fmt: skip
        print(f"{task.name}: {alarms} alarms over {len(runs)} runs, closest call {row['closest call']:.2f}", flush=True)
        rows.append(row)

    trouble_rows = []
    for task in (t for t in healthy if t.name in ("digits-b32", "lm")):
        at = task.steps // 2
        for trouble in TROUBLES:
            if trouble.name == "slow-divergence":
                trouble = Trouble(trouble.name, min(trouble.length, task.steps - at - 50))
            protected = [train(task, seed, trouble, at) for seed in range(trouble_seeds)]
            unprotected = train(task, 0, trouble, at, recover=False)
            restores = [e for r in protected for e in r.events if e.action == "restored"]
            caught = sum(r.first_held is not None and r.first_held >= at for r in protected)
            first = [r.first_held - at for r in protected if r.first_held is not None]
            row = {
                "task": task.name, "trouble": trouble.name, "runs": len(protected), "detected": f"{caught}/{len(protected)}",
                "detected after (steps)": ", ".join(map(str, first)) or "-",
                "restores": len(restores), "other decisions": ", ".join(e.action for r in protected for e in r.events if e.action != "restored") or "-",
                "steps lost per restore": float(np.mean([e.steps_lost for e in restores])) if restores else math.nan,
                "merged val loss, recovery": float(np.mean([r.merged for r in protected])),
                "merged val loss, no recovery": unprotected.merged,
                "raw val loss, no recovery": unprotected.raw,
                "clean merged val loss": float(np.mean([clean[task.name, s] for s in range(len(protected))])),
            }  # fmt: skip
            print(
                f"{task.name} / {trouble.name}: detected {row['detected']}, {[str(e) for r in protected for e in r.events][:1]}",
                flush=True,
            )
            trouble_rows.append(row)

    total = sum(r["false alarms"] for r in rows)
    report(
        "recovery",
        f"Healthy runs with the default RecoveryPolicy: {total} false alarms over {sum(r['runs'] for r in rows)} runs",
        [
            "healthy task",
            "runs",
            "steps",
            "false alarms",
            "closest call",
            "snapshots skipped",
            "merged val loss",
            "wall s",
        ],
        rows,
        {"quick": args.quick, "policy": RecoveryPolicy().__dict__, "trouble": trouble_rows},
    )
    report(
        "recovery_trouble",
        "Injected trouble, half-way through the run: default recovery vs none",
        ["task", "trouble", "runs", "detected", "detected after (steps)", "restores", "other decisions", "steps lost per restore",
         "merged val loss, recovery", "merged val loss, no recovery", "raw val loss, no recovery", "clean merged val loss"],
        trouble_rows,
        {"quick": args.quick},
    )  # fmt: skip


if __name__ == "__main__":
    main()
