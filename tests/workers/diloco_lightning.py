"""Lightning with DiLoCoStrategy on CPU, 2 processes (Lightning relaunches this script for rank 1).

python tests/workers/diloco_lightning.py OUT
"""

import sys
from pathlib import Path

import lightning as L
import torch
from helpers.lit import Regression, data, finish, trainer

from ckptavg import CheckpointAverager
from ckptavg.lightning import DiLoCoStrategy


def main() -> None:
    root = Path(sys.argv[1])
    L.seed_everything(0)
    model = Regression()
    train, val = data()
    strategy = DiLoCoStrategy(sync_every=4, process_group_backend="gloo")
    globals_seen = {}

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % 4 == 0:
                globals_seen[trainer.global_step] = {k: v.clone() for k, v in trainer.strategy.global_state().items()}

    averager = CheckpointAverager(window=3, every_n_steps=4, recover=False, storage="cpu")
    run = trainer(root, [Watch(), averager], strategy=strategy, devices=2, max_steps=24, val_check_interval=8)
    run.fit(model, train, val)
    rank = run.global_rank
    steps = averager.window.steps
    torch.save(
        {
            "wrapped": type(run.strategy.model).__name__,
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "steps": steps,
            "globals": {s: globals_seen[s] for s in steps},
            "bytes": run.strategy.bytes_sent,
            "logged": sorted(run.callback_metrics),
        },
        root / f"rank{rank}.pt",
    )
    finish()


if __name__ == "__main__":
    main()
