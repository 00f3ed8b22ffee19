"""Annealing replacement on a real task: constant LR + a checkpoint merge vs decay schedules.

A byte-level GPT (benchmarks/models.py: ByteGPT) learns the Python standard library's own source
(a fixed, sorted file list; every 10th file held out for validation). Every variant uses the same
model initialisation, the same data at every step (batches depend only on the step), the same
number of steps and the same peak learning rate (AdamW, linear warm-up):

1. constant LR after warm-up, last checkpoint;
2. the same run merged at the end by ckptavg's window: SMA, WMA, EMA of the default window
   (8 snapshots, one every steps/60), and a sweep of window lengths (snapshots x interval), all
   read from one window of 32 snapshots as coefficient vectors with zeros;
3. cosine decay to 10% of the peak;
4. warmup-stable-decay: the constant run branched at 80% of the steps into a linear cooldown to 0.

Performance preview check: at five points of the constant run, the preview (SMA of the default
window at that point) is compared with the loss a short cooldown (10% of the steps, linear to 0)
started from that point reaches: errors, and the rank correlation across points.

Results: a table and benchmarks/results/anneal.json, and two figures,
benchmarks/results/anneal_curves.png and benchmarks/results/anneal_sweep.png.

    python benchmarks/anneal.py            # 2500 steps, about 17 minutes alone on 2 cores
    python benchmarks/anneal.py --quick    # 500 steps, about 3 minutes
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, report  # noqa: E402
from models import ByteGPT, batch_at, stdlib_bytes, validation_batches  # noqa: E402

from ckptavg import CheckpointWindow, SpikeGuard  # noqa: E402


@dataclass
class Config:
    steps: int
    warmup: int
    peak_lr: float = 2e-3
    batch_size: int = 16
    context: int = 128
    seed: int = 0
    evals: int = 30  # evaluation points along each curve
    stored: int = 32  # snapshots held (the sweep reads subsets of them)
    default_window: int = 8
    check_points: tuple[float, ...] = (0.3, 0.45, 0.6, 0.75, 0.9)

    @property
    def base_interval(self) -> int:
        return max(1, self.steps // 120)

    @property
    def default_interval(self) -> int:
        return 2 * self.base_interval

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evals)


def lr_constant(cfg: Config, step: int) -> float:
    return cfg.peak_lr * min(1.0, step / cfg.warmup)


def lr_cosine(cfg: Config, step: int) -> float:
    if step <= cfg.warmup:
        return lr_constant(cfg, step)
    progress = (step - cfg.warmup) / (cfg.steps - cfg.warmup)
    return cfg.peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_cooldown(cfg: Config, start: int, length: int):
    """Linear from the peak at ``start`` to 0 at ``start + length``."""
    return lambda c, step: cfg.peak_lr * max(0.0, (start + length - step) / length)


@dataclass
class Trainer:
    """A model, its optimizer and its step, trained on the step-indexed batches."""

    cfg: Config
    train: torch.Tensor
    val: list[torch.Tensor]
    model: ByteGPT = field(init=False)
    step: int = 0

    def __post_init__(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.model = ByteGPT(context=self.cfg.context)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.peak_lr, betas=(0.9, 0.95), weight_decay=0.1)

    def branch(self) -> Trainer:
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.optimizer = torch.optim.AdamW(other.model.parameters(), lr=self.cfg.peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
        other.optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        return other

    def advance(self, schedule, until: int, every=None) -> None:
        """Train to step ``until``; call ``every(self)`` after each step."""
        self.model.train()
        while self.step < until:
            self.step += 1
            for group in self.optimizer.param_groups:
                group["lr"] = schedule(self.cfg, self.step)
            self.batch = batch_at(self.train, self.step, self.cfg.batch_size, self.cfg.context, self.cfg.seed)
            loss = self.model.loss(self.batch)
            self.loss = loss.item()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            if every is not None:
                every(self)

    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        model = model or self.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = float(torch.stack([model.loss(b) for b in self.val]).mean())
        model.train(was_training)
        return loss


def subset_weights(window: CheckpointWindow, count: int, every: int, method: str = "sma", alpha: float = 0.2) -> list[float]:
    """A coefficient vector over the stored snapshots selecting the newest ``count`` of those
    ``every`` apart: a narrower or sparser window, read from the same stored snapshots."""
    held = len(window)
    chosen = [held - 1 - every * i for i in range(count)][::-1]
    if chosen[0] < 0:
        raise ValueError(f"{count} x every {every} needs more than the {held} stored snapshots")
    from ckptavg import coefficients

    weights = [0.0] * held
    for index, w in zip(chosen, coefficients(method, count, alpha)):
        weights[index] = w
    return weights


def merged_loss(trainer: Trainer, window: CheckpointWindow, weights: list[float], scratch: ByteGPT) -> float:
    window.load_into(scratch, weights)
    return trainer.evaluate(scratch)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 steps (about 3 minutes)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--evals", type=int, default=None, help="evaluation points along each curve (default 30; 15 with --quick)")
    args = parser.parse_args()
    steps = args.steps or (500 if args.quick else 2500)
    cfg = Config(steps=steps, warmup=max(10, steps // 20), evals=args.evals or (15 if args.quick else 30))
    started = time.perf_counter()
    train, val_bytes, files = stdlib_bytes()
    val = validation_batches(val_bytes, count=4, batch_size=32, context=cfg.context)
    print(f"{len(files)} stdlib files: {train.numel() / 1e6:.1f} MB train, {val_bytes.numel() / 1e6:.2f} MB validation; "
          f"{steps} steps, snapshot every {cfg.base_interval}", flush=True)  # fmt: skip

    # -- 1 and 2: the constant-LR run, with its window, previews and cooldown branches -------------
    constant = Trainer(cfg, train, val)
    scratch = ByteGPT(context=cfg.context)
    window = CheckpointWindow(window=cfg.stored)
    guard = SpikeGuard(window)  # recovery on, with the default policy, as a user would run it
    curves: dict[str, list[tuple[int, float]]] = {"constant (raw)": [], "preview (SMA of the window)": []}
    checks: list[dict] = []
    check_steps = {int(round(f * steps / cfg.base_interval)) * cfg.base_interval: f for f in cfg.check_points}
    wsd_start = int(0.8 * steps)
    branches: dict[str, Trainer] = {}

    def default_weights() -> list[float] | None:
        try:
            return subset_weights(window, cfg.default_window, cfg.default_interval // cfg.base_interval)
        except ValueError:
            return None

    def batch_loss(t: Trainer) -> float:
        with torch.no_grad():
            return float(t.model.loss(t.batch))

    def after_step(t: Trainer) -> None:
        if guard.observe(t.step, t.loss, model=t.model, evaluate=lambda: batch_loss(t)):
            print(f"  {guard.restore(t.model, [t.optimizer], t.step)}", flush=True)
        if t.step % cfg.base_interval == 0 and guard.healthy:
            window.snapshot(t.model, step=t.step)
        if t.step % cfg.eval_every == 0 or t.step == steps:
            curves["constant (raw)"].append((t.step, t.evaluate()))
            weights = default_weights()
            if weights is not None:
                curves["preview (SMA of the window)"].append((t.step, merged_loss(t, window, weights, scratch)))
        if t.step in check_steps and default_weights() is not None:
            preview = merged_loss(t, window, default_weights(), scratch)
            cooldown = t.branch()
            length = steps // 10
            cooldown.advance(lr_cooldown(cfg, t.step, length), t.step + length)
            checks.append({"step": t.step, "preview": preview, "cooldown": cooldown.evaluate()})
            print(f"  step {t.step}: preview {preview:.4f}, after a {length}-step cooldown {checks[-1]['cooldown']:.4f}", flush=True)
        if t.step == wsd_start:
            branches["wsd"] = t.branch()

    constant.advance(lr_constant, steps, after_step)
    raw_final = constant.evaluate()
    print(f"constant: {raw_final:.4f} ({time.perf_counter() - started:.0f} s); recovery decisions: {len(guard.events)}", flush=True)

    # -- 4: WSD, branched at 80% -------------------------------------------------------------------
    wsd = branches["wsd"]
    curves["WSD (20% linear cooldown)"] = [(wsd.step, next(v for s, v in curves["constant (raw)"] if s >= wsd.step))]
    wsd.advance(lr_cooldown(cfg, wsd_start, steps - wsd_start), steps,
                lambda t: curves["WSD (20% linear cooldown)"].append((t.step, t.evaluate())) if t.step % cfg.eval_every == 0 else None)  # fmt: skip
    wsd_final = wsd.evaluate()
    print(f"WSD: {wsd_final:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)

    # -- 3: cosine ---------------------------------------------------------------------------------
    cosine = Trainer(cfg, train, val)
    curves["cosine to 10%"] = []
    cosine.advance(lr_cosine, steps,
                   lambda t: curves["cosine to 10%"].append((t.step, t.evaluate())) if t.step % cfg.eval_every == 0 else None)  # fmt: skip
    cosine_final = cosine.evaluate()
    print(f"cosine: {cosine_final:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)

    # -- the table ---------------------------------------------------------------------------------
    every = cfg.default_interval // cfg.base_interval
    span = cfg.default_window * cfg.default_interval
    rows = [
        {"variant": "constant LR, last checkpoint", "val loss": raw_final},
        {"variant": "cosine decay to 10%", "val loss": cosine_final},
        {"variant": "WSD, 20% linear cooldown", "val loss": wsd_final},
    ]
    merges = {}
    for method in ("sma", "wma", "ema"):
        merges[method] = merged_loss(constant, window, subset_weights(window, cfg.default_window, every, method), scratch)
        rows.append({"variant": f"constant + {method.upper()} of {cfg.default_window} x {cfg.default_interval} steps (default)", "val loss": merges[method]})
    for row in rows:
        row["vs cosine"] = row["val loss"] / cosine_final - 1
        row["vs WSD"] = row["val loss"] / wsd_final - 1
    sweep = []
    for count in (4, 8, 16, 32):
        for k in (1, 2, 4):
            if count * k <= cfg.stored or (count - 1) * k < len(window):
                try:
                    loss = merged_loss(constant, window, subset_weights(window, count, k), scratch)
                except ValueError:
                    continue
                sweep.append({"snapshots": count, "interval": k * cfg.base_interval, "span steps": count * k * cfg.base_interval, "val loss": loss})
    best = min(merges.values())
    verdict = {
        "every default merge beats cosine": all(v < cosine_final for v in merges.values()),
        "best merge vs WSD": best / wsd_final - 1,
        "best merge within 0.5% of WSD": best <= wsd_final * 1.005,
    }
    errors = [c["preview"] - c["cooldown"] for c in checks]
    preview_check = {
        "points": checks,
        "mean abs error": float(np.mean(np.abs(errors))) if errors else math.nan,
        "mean error": float(np.mean(errors)) if errors else math.nan,
        "rank correlation": spearman([c["preview"] for c in checks], [c["cooldown"] for c in checks]) if len(checks) > 1 else math.nan,
    }
    for row in sweep:
        row["vs WSD"] = row["val loss"] / wsd_final - 1
    report(
        "anneal",
        f"Annealing replacement: ByteGPT on the stdlib, {steps} steps (default window {cfg.default_window} x {cfg.default_interval} = {span} steps)",
        ["variant", "val loss", "vs cosine", "vs WSD"],
        rows,
        {"config": cfg.__dict__ | {"check_points": list(cfg.check_points)}, "sweep": sweep, "verdict": verdict,
         "preview_check": preview_check, "curves": curves, "files": len(files),
         "recovery": {"policy": "RecoveryPolicy() (the default)", "decisions": [str(e) for e in guard.events]}},  # fmt: skip
    )
    print("\nwindow sweep (SMA):")
    for row in sweep:
        print(f"  {row['snapshots']:>2} x {row['interval']:>4} = {row['span steps']:>5} steps: {row['val loss']:.4f} ({row['vs WSD'] * 100:+.2f}% vs WSD)")
    print("\npreview vs the loss after a short cooldown from the same point:")
    for c in checks:
        print(f"  step {c['step']:>5}: preview {c['preview']:.4f}  cooldown {c['cooldown']:.4f}  error {c['preview'] - c['cooldown']:+.4f}")
    print(f"  mean abs error {preview_check['mean abs error']:.4f}, rank correlation {preview_check['rank correlation']:.2f}")
    print("\n" + ", ".join(f"{k}: {v if not isinstance(v, float) else f'{v * 100:+.2f}%'}" for k, v in verdict.items()))
    plot(curves, sweep, cosine_final, wsd_final, merges, steps)
    print(f"total {time.perf_counter() - started:.0f} s")


def finish(fig, ax, xlabel: str, ylabel: str, title: str, filename: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / filename, dpi=110)


def plot(curves, sweep, cosine_final, wsd_final, merges, steps) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"constant (raw)": ("tab:gray", "-"), "preview (SMA of the window)": ("tab:blue", "-"),
              "cosine to 10%": ("tab:orange", "--"), "WSD (20% linear cooldown)": ("tab:green", "--")}  # fmt: skip
    for name, points in curves.items():
        if points:
            color, line = styles.get(name, (None, "-"))
            ax.plot(*zip(*points), line, color=color, label=name)
    for method, value in merges.items():
        ax.scatter([steps], [value], marker="o", zorder=5, label=f"final {method.upper()} merge: {value:.3f}")
    low = min(min(v for _, v in pts) for pts in curves.values() if pts)
    ax.set_ylim(low - 0.05, low + 0.6)
    finish(fig, ax, "optimizer step", "validation loss (nats/byte)", "Constant LR + checkpoint merge vs decay schedules (ByteGPT, stdlib)", "anneal_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for interval in sorted({r["interval"] for r in sweep}):
        pts = sorted((r["span steps"], r["val loss"]) for r in sweep if r["interval"] == interval)
        ax.plot(*zip(*pts), "o-", label=f"one snapshot every {interval} steps")
    ax.axhline(cosine_final, color="tab:orange", ls="--", label="cosine to 10%")
    ax.axhline(wsd_final, color="tab:green", ls="--", label="WSD")
    ax.set_xscale("log", base=2)
    finish(fig, ax, "window length in steps (snapshots x interval)", "validation loss of the SMA merge", "Window-length sweep", "anneal_sweep.png")
    plt.close("all")
    print(f"figures: {RESULTS / 'anneal_curves.png'}, {RESULTS / 'anneal_sweep.png'}")


if __name__ == "__main__":
    main()
