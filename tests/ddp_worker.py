"""Lightning DDP on CPU with 2 processes (Lightning relaunches this script for rank 1).

    python ddp_worker.py OUT [spike-on-rank-1]
"""

import sys
from pathlib import Path

import lightning as L
import torch

from ckptavg import CheckpointAverager
from lit_helpers import Regression, data, trainer

root = Path(sys.argv[1])
spike = len(sys.argv) > 2 and sys.argv[2] == "spike-on-rank-1"
L.seed_everything(0)
averager = CheckpointAverager(window=4, every_n_steps=2, dirpath=root / "out", recover={"warmup": 4})
callbacks = [averager]
if spike:
    from ckptavg.testing import InjectDivergence

    callbacks.append(InjectDivergence({12}, rank=1))
model = Regression()
train, val = data()
run = trainer(root, callbacks, max_epochs=2, strategy="ddp", devices=2, val_check_interval=4)
run.fit(model, train, val)
merged = run.callback_metrics.get("merged/val_loss")
torch.save(
    {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "steps": averager.window.steps,
        "merged_val_loss": None if merged is None else float(merged),
        "restores": [e.step for e in averager.recovery_events],
    },
    root / f"rank{run.global_rank}.pt",
)
