"""Lightning ModelParallelStrategy (FSDP2) on CPU with gloo, 2 processes (Lightning relaunches
this script for rank 1).

    python tests/workers/fsdp_lightning.py OUT [resume]
"""

import sys
from pathlib import Path

import lightning as L
import torch
from helpers.lit import Recorder, Regression, data, finish, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from ckptavg import CheckpointAverager
from ckptavg.lightning.testing import InjectDivergence

root = Path()  # set by main() from the command line


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


def fit(name, callbacks, ckpt_path=None, **kwargs):
    L.seed_everything(0)
    model = ShardedRegression()
    train, val = data()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    run = trainer(root / name, callbacks, strategy=strategy, devices=2, val_check_interval=4, **kwargs)
    run.fit(model, train, val, ckpt_path=ckpt_path)
    return run, model


def full(model) -> dict:
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def main() -> None:
    global root
    root = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "resume":
        # cpu tier: each rank's shards go into the checkpoint rank 0 writes, and come back on resume.
        def averager(name):
            return CheckpointAverager(window=4, every_n_steps=2, dirpath=root / name / "out", recover=False)

        whole = averager("a")
        run, model_a = fit("a", [whole], max_epochs=3)
        fit(
            "b",
            [averager("b"), ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
            max_epochs=2,
            enable_checkpointing=True,
        )
        second = averager("b")
        _, model_b = fit("b", [second], ckpt_path=root / "ckpt" / "last.ckpt", max_epochs=3)
        result = {"a": full(model_a), "b": full(model_b), "steps_a": whole.window.steps, "steps_b": second.window.steps}
        torch.save(result, root / f"rank{run.global_rank}.pt")
        finish()

    averager = CheckpointAverager(
        window=4, every_n_steps=2, dirpath=root / "out", storage="disk", recover={"warmup": 4}
    )
    recorder = FullRecorder()
    run, model = fit("", [recorder, averager, InjectDivergence({12}, rank=1)], max_epochs=2)
    merged = run.callback_metrics.get("merged/val_loss")
    torch.save(
        {
            "final": full(model),
            "local_shapes": {e.name: e.shape for e in averager.window.layout},
            "steps": averager.window.steps,
            "states": {s: recorder.states[s] for s in averager.window.steps},
            "merged_val_loss": None if merged is None else float(merged),
            "restores": [(e.step, e.steps_merged) for e in averager.recovery_events],
        },
        root / f"rank{run.global_rank}.pt",
    )
    finish()


if __name__ == "__main__":
    main()
