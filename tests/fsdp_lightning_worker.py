"""Lightning ModelParallelStrategy (FSDP2) on CPU with gloo, 2 processes (Lightning relaunches
this script for rank 1).

    python fsdp_lightning_worker.py OUT
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from ckptavg import CheckpointAverager
from ckptavg.testing import InjectDivergence
from lit_helpers import Recorder, Regression, data, trainer

root = Path(sys.argv[1])


class ShardedRegression(Regression):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class FullRecorder(Recorder):
    """Records the gathered full weights after every optimizer step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states[trainer.global_step] = {k: v.full_tensor().clone() for k, v in pl_module.state_dict().items()}


L.seed_everything(0)
averager = CheckpointAverager(window=4, every_n_steps=2, dirpath=root / "out", storage="disk", recover={"warmup": 4})
recorder = FullRecorder()
model = ShardedRegression()
train, val = data()
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
run = trainer(root, [recorder, averager, InjectDivergence({12}, rank=1)], max_epochs=2, strategy=strategy, devices=2,
              val_check_interval=4)  # fmt: skip
run.fit(model, train, val)
merged = run.callback_metrics.get("merged/val_loss")
torch.save(
    {
        "final": {k: v.full_tensor().clone() for k, v in model.state_dict().items()},
        "local_shapes": {e.name: e.shape for e in averager.window.layout},
        "steps": averager.window.steps,
        "states": {s: recorder.states[s] for s in averager.window.steps},
        "merged_val_loss": None if merged is None else float(merged),
        "restores": [(e.step, e.steps_merged) for e in averager.recovery_events],
    },
    root / f"rank{run.global_rank}.pt",
)
