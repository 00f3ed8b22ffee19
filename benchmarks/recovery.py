"""Crash recovery: a run with an injected divergence, with and without ckptavg's recovery.

TinyGPT is trained with Lightning on the CPU at a constant learning rate with
``CheckpointAverager(window=8, every_n_steps=25)``. In one run, configurations:

- clean (no injection; must raise no alarm);
- a divergence injected (3 steps at 1000x the learning rate), with recovery, and without;
- a NaN batch injected (the loss and then the weights turn NaN), with recovery, and without.

Reported per run: restores, steps lost (training progress discarded by restores: the steps between
the newest snapshot merged and the restore, overlapping spans counted once), the final validation loss of the raw weights and of the
end-of-run merge, the merged loss as a ratio to the clean run's (target <= 1.02 with recovery),
and wall time.

    python benchmarks/recovery.py                 # 600 steps, spike at step 300
    python benchmarks/recovery.py --steps 200 --spike-at 120
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402
from models import TinyGPT, token_data  # noqa: E402

from ckptavg import CheckpointAverager  # noqa: E402
from ckptavg.testing import InjectDivergence  # noqa: E402

warnings.filterwarnings("ignore")


def evaluate(model: TinyGPT, val: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.stack([model.loss(batch) for batch in val]).mean())


def run(name: str, steps: int, inject: InjectDivergence | None, recover: bool) -> dict:
    L.seed_everything(0, verbose=False)
    model = TinyGPT()
    averager = CheckpointAverager(window=8, every_n_steps=25, recover=recover, preview=False, merge_at_end=False)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[averager] + ([inject] if inject else []),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    train = DataLoader(token_data(16 * steps), batch_size=16, shuffle=True)
    val = DataLoader(token_data(512, seed=1), batch_size=64)
    start = time.perf_counter()
    trainer.fit(model, train)
    wall = time.perf_counter() - start
    raw = evaluate(model, val)
    merged = math.nan
    if len(averager.window):
        averager.window.load_into(model, "sma")
        merged = evaluate(model, val)
    events = averager.recovery_events
    lost = len(set().union(*(range(max(e.steps_merged) + 1, e.step + 1) for e in events)))
    print(f"{name}: restores at {[e.step for e in events]}, raw {raw:.4f}, merged {merged:.4f}, {wall:.1f} s", flush=True)
    return {"run": name, "restores": len(events), "steps lost": lost, "raw val loss": raw, "merged val loss": merged, "wall s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--spike-at", type=int, default=300)
    args = parser.parse_args()
    spike = set(range(args.spike_at, args.spike_at + 3))
    rows = [run("clean", args.steps, None, recover=True)]
    for mode, label in (("lr", "1000x LR for 3 steps"), ("nan", "NaN batch")):
        rows.append(run(f"{label}, with recovery", args.steps, InjectDivergence(spike, mode, lr_factor=1000), recover=True))
        rows.append(run(f"{label}, without recovery", args.steps, InjectDivergence(spike, mode, lr_factor=1000), recover=False))
    clean = rows[0]["merged val loss"]
    for row in rows:
        row["merged / clean"] = row["merged val loss"] / clean
        row["target"] = "<= 1.02" if "with recovery" in row["run"] else ("0 restores" if row["run"] == "clean" else "")
    report(
        "recovery",
        f"Crash recovery, TinyGPT, {args.steps} steps, divergence injected at steps {sorted(spike)}",
        ["run", "restores", "steps lost", "raw val loss", "merged val loss", "merged / clean", "target", "wall s"],
        rows,
        {"steps": args.steps, "spike_steps": sorted(spike)},
    )


if __name__ == "__main__":
    main()
