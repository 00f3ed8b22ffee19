"""Training-step overhead of CheckpointAverager against Lightning's own weight averaging.

A small transformer language model is trained with Lightning on the CPU for a fixed number of
steps, once per configuration, in interleaved rounds (every round runs every configuration).
Two measures, both against the no-callback baseline of the same run:

- end to end: each configuration's fastest round / the fastest no-callback round (interference
  only adds time; on this shared 2-core machine round-to-round noise is several percent);
- hook time: 1 + (time spent inside the callback's own hooks per step / the baseline step time),
  measured by wrapping the callback's hooks: precise, and what the callback itself costs.

- no callback (baseline)
- CheckpointAverager(window=8, every_n_steps=50), previews off     (target <= 1.02)
- Lightning EMAWeightAveraging (an update every step)
- Lightning WeightAveraging (SWA, an update every step)

The cost of one performance preview is reported separately, as a ratio to the raw validation run
it follows (the preview evaluates the same data once more, plus a swap in and out).

    python benchmarks/overhead.py                  # 300 steps x 5 rounds
    python benchmarks/overhead.py --steps 100 --rounds 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, WeightAveraging
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402
from models import TinyGPT, token_data  # noqa: E402

from ckptavg import CheckpointAverager  # noqa: E402

warnings.filterwarnings("ignore")


class StepTimer(Callback):
    """Wall time per optimizer step (including any callback work done at the step's end), and
    the duration of each raw validation run and of each preview."""

    def __init__(self, warmup: int = 20):
        self.warmup = warmup
        self.ends: list[float] = []
        self.validation: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())

    def on_validation_start(self, trainer, pl_module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validation.append(time.perf_counter() - self._val_start)

    def step_time(self) -> float:
        ends = self.ends[self.warmup :]
        return (ends[-1] - ends[0]) / (len(ends) - 1)  # the mean: periodic snapshots are counted


_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_optimizer_step", "on_after_backward",
          "on_before_zero_grad", "on_train_epoch_end")  # fmt: skip


def timed_hooks(callback: Callback) -> Callback:
    """Wrap the callback's training-time hooks to accumulate the time spent in them."""
    callback.hook_seconds = 0.0

    def wrap(method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                callback.hook_seconds += time.perf_counter() - start

        return timed

    for name in _HOOKS:
        setattr(callback, name, wrap(getattr(callback, name)))
    return callback


class TimedAverager(CheckpointAverager):
    """CheckpointAverager that times its preview (the work done in on_validation_end)."""

    previews: list[float]

    def on_validation_end(self, trainer, pl_module):
        start = time.perf_counter()
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking and len(self.window) >= 2:
            self.previews.append(time.perf_counter() - start)


def fit(callbacks: list[Callback], steps: int, val_every: int | None = None) -> StepTimer:
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[timer, *callbacks],  # first: its validation time excludes the preview
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=None if val_every else 0,
        val_check_interval=val_every,
        num_sanity_val_steps=0,
    )
    train = DataLoader(token_data(4096), batch_size=16, shuffle=True)
    val = DataLoader(token_data(256, seed=1), batch_size=32)
    trainer.fit(TinyGPT(), train, val if val_every else None)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    configs = {
        "no callback": lambda: [],
        "CheckpointAverager(window=8, every_n_steps=50), previews off": lambda: [
            CheckpointAverager(window=8, every_n_steps=50, preview=False, merge_at_end=False)
        ],
        "  the same with recover=False": lambda: [
            CheckpointAverager(window=8, every_n_steps=50, preview=False, merge_at_end=False, recover=False)
        ],
        "Lightning EMAWeightAveraging (every step)": lambda: [EMAWeightAveraging()],
        "Lightning WeightAveraging (SWA, every step)": lambda: [WeightAveraging()],
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    hook_times: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, make in configs.items():
            callbacks = [timed_hooks(c) for c in make()]
            timer = fit(callbacks, args.steps)
            times[name].append(timer.step_time())
            hook_times[name].append(sum(c.hook_seconds for c in callbacks) / args.steps)
            print(
                f"round {round_ + 1}: {name}: {times[name][-1] * 1e3:.2f} ms/step, hooks {hook_times[name][-1] * 1e3:.3f} ms/step",
                flush=True,
            )
    params = sum(p.numel() for p in TinyGPT().parameters())
    base = min(times["no callback"])
    rows = [
        {"configuration": name, "ms/step": min(times[name]) * 1e3, "end-to-end ratio": min(times[name]) / base,
         "hook ms/step": statistics.median(hook_times[name]) * 1e3, "hook-time ratio": 1 + statistics.median(hook_times[name]) / base,
         "target": "<= 1.02" if name.startswith("CheckpointAverager") else ""}
        for name in configs
    ]  # fmt: skip

    # One preview against the raw validation run it follows.
    averager = TimedAverager(window=8, every_n_steps=50, merge_at_end=False)
    averager.previews = []
    timer = fit([averager], args.steps, val_every=100)
    preview_ratio = statistics.median(
        p / v for p, v in zip(averager.previews, timer.validation[-len(averager.previews) :], strict=True)
    )
    rows.append({"configuration": "one preview / the raw validation run it follows", "ms/step": statistics.median(averager.previews) * 1e3,
                 "end-to-end ratio": preview_ratio, "hook ms/step": float("nan"), "hook-time ratio": float("nan"),
                 "target": "info (ms: one preview)"})  # fmt: skip
    report(
        "overhead",
        f"Step-time overhead, TinyGPT ({params / 1e6:.2f}M parameters), {args.steps} steps x {args.rounds} interleaved rounds "
        "(fastest rounds; hook time: median over rounds)",
        ["configuration", "ms/step", "end-to-end ratio", "hook ms/step", "hook-time ratio", "target"],
        rows,
        {"steps": args.steps, "rounds": args.rounds, "params": params},
    )
    assert all(math.isfinite(r["end-to-end ratio"]) for r in rows)


if __name__ == "__main__":
    main()
