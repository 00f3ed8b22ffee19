"""The ckptavg demo: a byte-level GPT learns the Python standard library with Lightning.

Training runs at a constant learning rate (after a short warm-up) with one extra line,
``CheckpointAverager(...)`` in the callbacks. Watch for:

- ``merged/val_loss`` beside ``val_loss`` in the progress bar: the performance preview, "what would
  this run score if I stopped and annealed now?";
- one loss spike injected on purpose (a batch that produces NaN) and recovered automatically;
- at the end: the merged weights against the raw final weights, ``merged.safetensors``, a plot of
  both curves, and a summary table.

    python examples/demo.py [--steps 600] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from models import ByteGPT, batch_at, stdlib_bytes, validation_batches  # noqa: E402

from ckptavg import CheckpointAverager  # noqa: E402
from ckptavg.lightning.testing import InjectDivergence  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
# The comparison run restarts from a mid-epoch checkpoint on purpose, without validation or the
# first run's ModelCheckpoint: Lightning's notes about that are expected here.
warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint.*")
warnings.filterwarnings("ignore", ".*ended before the epoch ended.*")


class StepBatches(Dataset):
    """Item i is the batch of optimizer step i + 1 (the same data as benchmarks/anneal.py)."""

    def __init__(self, data: torch.Tensor, steps: int, batch_size: int, context: int):
        self.data, self.steps, self.batch_size, self.context = data, steps, batch_size, context

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> torch.Tensor:
        return batch_at(self.data, index + 1, self.batch_size, self.context)


class ByteLM(L.LightningModule):
    def __init__(self, peak_lr: float = 2e-3, warmup: int = 30):
        super().__init__()
        torch.manual_seed(0)
        self.model = ByteGPT()
        self.peak_lr, self.warmup = peak_lr, warmup

    def training_step(self, batch, batch_idx):
        loss = self.model.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model.loss(batch), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def read_losses(metrics_csv: Path) -> list[tuple[int, float]]:
    with open(metrics_csv) as f:
        return [(int(row["step"]), float(row["train_loss"])) for row in csv.DictReader(f) if row.get("train_loss")]


def plot(metrics_csv: Path, out: Path, restores: list, spike_at: int, without: list[tuple[int, float]]) -> Path:
    """Left: validation loss of the raw and the merged weights (the preview), on a scale that shows
    their gap. Right: the training loss, with the injected spike and the restore."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw, merged, train = [], [], []
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("val_loss"):
                raw.append((int(row["step"]), float(row["val_loss"])))
            if row.get("merged/val_loss"):
                merged.append((int(row["step"]), float(row["merged/val_loss"])))
            if row.get("train_loss"):
                train.append((int(row["step"]), float(row["train_loss"])))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(*zip(*raw, strict=True), "o-", color="tab:gray", label="val_loss (raw weights)")
    if merged:
        left.plot(
            *zip(*merged, strict=True), "o-", color="tab:blue", label="merged/val_loss (preview, SMA of the window)"
        )
    values = sorted(v for _, v in raw[len(raw) // 3 :] + merged[len(merged) // 3 :] if v == v)
    if values:  # the last two thirds of the run decide the scale: the first steps would flatten the gap
        span = values[-1] - values[0]
        left.set_ylim(values[0] - 0.1 * span, values[-1] + 0.4 * span)
    left.set_xlabel("optimizer step")
    left.set_ylabel("validation loss (nats/byte)")
    left.set_title("performance preview: raw vs merged weights")
    left.legend()
    left.grid(alpha=0.3)
    # Right: the steps around the spike. A NaN loss has no place on a loss axis: the spike is marked
    # at the top edge, the restore on the curve, and the run without recovery shades the steps it lost.
    near = lambda step: spike_at - 60 <= step <= spike_at + 60  # noqa: E731
    finite = [(s, v) for s, v in train if math.isfinite(v) and near(s)]
    if finite:
        right.plot(*zip(*finite, strict=True), color="tab:gray", lw=0.9, label="train_loss, with recovery")
    top = right.get_xaxis_transform()  # x in data, y in axes fraction
    right.plot([spike_at], [0.97], marker="v", color="tab:red", ms=11, transform=top, clip_on=False, ls="none")
    right.annotate(f"step {spike_at}: a poisoned batch,\nloss NaN (off the scale)", xy=(spike_at, 0.97), xycoords=top,
                   xytext=(-12, -4), textcoords="offset points", ha="right", va="top", color="tab:red", fontsize=9)  # fmt: skip
    for event in restores:
        after = next(((s, v) for s, v in finite if s > event.step), None)
        if after is not None:
            right.plot(*after, marker="o", color="tab:green", ms=8, ls="none")
            right.annotate(f"step {event.step}: restored the SMA\nof steps {event.steps_merged[0]}..{event.steps_merged[-1]};\n"
                           "training goes on (the optimizer\nstate starts afresh)", xy=after, xytext=(12, -6),
                           textcoords="offset points", ha="left", va="top", color="tab:green", fontsize=9)  # fmt: skip
    if without:
        lost = [s for s, v in without if not math.isfinite(v)]
        kept = [(s, v) for s, v in without if math.isfinite(v) and near(s)]
        if kept:
            right.plot(*zip(*kept, strict=True), color="tab:orange", lw=1.2, label="train_loss, without recovery")
        if lost:
            right.axvspan(min(lost), max(lost), color="tab:orange", alpha=0.15,
                          label=f"without recovery: NaN at {len(lost)} of the {len(without)} steps from the spike on")  # fmt: skip
    right.set_xlim(spike_at - 60, spike_at + 60)
    if finite:  # room above the curve for the spike's marker
        low, high = min(v for _, v in finite), max(v for _, v in finite)
        right.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low))
    right.set_xlabel("optimizer step")
    right.set_ylabel("training loss (nats/byte)")
    right.set_title(f"crash recovery: the steps around the spike at {spike_at}")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle("ckptavg demo: ByteGPT on the Python standard library, constant learning rate")
    fig.tight_layout()
    path = out / "demo_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for this small model on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # Lightning's own notes go ...
    logging.getLogger("lightning.pytorch.callbacks.ckptavg").setLevel(logging.INFO)  # ... the averager's stay
    started = time.perf_counter()
    out = Path(args.out)
    train, val_bytes, files = stdlib_bytes()
    print(f"data: {len(files)} files of the Python standard library, {train.numel() / 1e6:.1f} MB train, "
          f"{val_bytes.numel() / 1e6:.2f} MB validation (every 10th file)")  # fmt: skip
    steps = args.steps
    interval = max(1, steps // 60)
    spike_at = int(steps * 0.55)
    averager = CheckpointAverager(window=8, every_n_steps=interval, merge="sma")
    logger = L.pytorch.loggers.CSVLogger(out, name="logs")
    before_spike = ModelCheckpoint(dirpath=out / "before_spike", every_n_train_steps=spike_at - 1, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=steps,
        val_check_interval=max(1, steps // 10),
        log_every_n_steps=1,
        callbacks=[averager, InjectDivergence({spike_at}), before_spike],  # a NaN at one step, on purpose
        logger=logger,
        default_root_dir=out,
        accelerator="cpu",
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    print(f"training {steps} steps at a constant LR; a snapshot every {interval} steps, window of 8; "
          f"a NaN batch is injected at step {spike_at}\n")  # fmt: skip
    module = ByteLM()
    val = DataLoader(validation_batches(val_bytes, count=4, batch_size=32, context=128), batch_size=None)
    trainer.fit(module, DataLoader(StepBatches(train, steps, 16, 128), batch_size=None), val)

    events = [e for e in averager.recovery_events if e.action == "restored"]
    restores = [e.step for e in events]
    # The same spike without recovery: 40 steps from the checkpoint taken just before it.
    print(f"\nthe same spike without recovery: 40 steps from the checkpoint of step {spike_at - 1}")
    plain_logger = L.pytorch.loggers.CSVLogger(out, name="without_recovery")
    # The same averager with recovery off: it puts back the raw weights the checkpoint carries
    # beside its merged state_dict, so this run continues exactly where the first one was.
    # (storage="cpu": this short run needs no window of its own on disk.)
    unprotected = CheckpointAverager(
        window=8, every_n_steps=interval, storage="cpu", recover=False, preview=False, merge_at_end=False
    )
    L.Trainer(
        max_steps=spike_at + 39, log_every_n_steps=1, callbacks=[unprotected, InjectDivergence({spike_at})], logger=plain_logger,
        default_root_dir=out, accelerator="cpu", enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, enable_progress_bar=False,
    ).fit(ByteLM(), DataLoader(StepBatches(train, steps, 16, 128), batch_size=None), ckpt_path=next((out / "before_spike").glob("*.ckpt")))  # fmt: skip
    without = read_losses(Path(plain_logger.log_dir) / "metrics.csv")
    figure = plot(Path(logger.log_dir) / "metrics.csv", out, events, spike_at, without)
    final = averager.final_metrics
    raw, merged = final["raw"]["val_loss"], final["merged"]["val_loss"]
    merged_file = averager.merged_path
    rows = [
        ("final val_loss, raw weights", f"{raw:.4f}"),
        ("final val_loss, SMA of the window", f"{merged:.4f}"),
        ("change from merging", f"{(merged - raw) / raw * 100:+.2f}%"),
        ("snapshots merged (steps)", f"{averager.window.steps[0]}..{averager.window.steps[-1]}"),
        ("loss spikes recovered (at steps)", str(restores)),
        ("without recovery: NaN losses", f"{sum(not math.isfinite(v) for _, v in without)} of {len(without)} steps"),
        ("merged model", str(merged_file)),
        ("plot", str(figure)),
        ("wall time", f"{time.perf_counter() - started:.0f} s"),
    ]
    print("\n" + "=" * 72 + "\nckptavg demo summary\n" + "-" * 72)
    for name, value in rows:
        print(f"{name:<36}{value}")
    print("=" * 72)
    if not restores:
        raise SystemExit("the injected spike was not recovered")


if __name__ == "__main__":
    main()
