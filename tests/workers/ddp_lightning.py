"""Lightning DDP on CPU with 2 processes (Lightning relaunches this script for rank 1).

python tests/workers/ddp_lightning.py OUT [spike-on-rank-1 | resume-cpu | resume-disk | resize]
"""

import sys
from pathlib import Path

import lightning as L
import torch
from helpers.lit import Recorder, Regression, data, finish, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ckptavg import CheckpointAverager

root = Path()  # set by main() from the command line


def fit(name: str, callbacks: list, ckpt_path=None, **kwargs):
    L.seed_everything(0)
    model = Regression()
    train, val = data()
    run = trainer(root / name, callbacks, strategy="ddp", devices=2, val_check_interval=4, **kwargs)
    run.fit(model, train, val, ckpt_path=ckpt_path)
    return run, model


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def main() -> None:
    global root
    root = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    if mode.startswith("resume-"):
        # Stop after 2 epochs and resume to 3 with a new Trainer and a new callback: the spread window
        # comes back from the checkpoint, and the run ends exactly as an uninterrupted one.
        storage = mode.removeprefix("resume-")

        def averager(name: str) -> CheckpointAverager:
            return CheckpointAverager(
                window=4, every_n_steps=2, storage=storage, dirpath=root / name / "out", recover=False
            )

        whole = averager("a")
        run, model_a = fit("a", [whole], max_epochs=3)
        first = averager("b")
        saver = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        fit("b", [first, saver], max_epochs=2, enable_checkpointing=True)
        second = averager("b")
        _, model_b = fit("b", [second, ModelCheckpoint(dirpath=root / "ckpt2")], ckpt_path=root / "ckpt" / "last.ckpt",
                         max_epochs=3, enable_checkpointing=True)  # fmt: skip
        result = {
            "weights_a": weights(model_a), "weights_b": weights(model_b),
            "steps_a": whole.window.steps, "steps_b": second.window.steps,
            "stored_numel": sum(e.numel for e in second.window.layout),
            "full_numel": sum(e.numel for e in second.window.full_layout),
            "merge_a": whole.window.merge("wma"), "merge_b": second.window.merge("wma"),  # collective
        }  # fmt: skip
        torch.save(result, root / f"rank{run.global_rank}.pt")
        finish()

    if mode == "resize":
        # 2 epochs on 2 processes, checkpointed; the test resumes the run in a single process.
        # storage="cpu": a cpu window re-spreads over another number of processes (a disk one does not)
        recorder, first = (
            Recorder(),
            CheckpointAverager(window=4, every_n_steps=2, storage="cpu", dirpath=root / "out", recover=False),
        )
        run, _ = fit("b", [recorder, first, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)], max_epochs=2,
                     enable_checkpointing=True)  # fmt: skip
        torch.save({"states": recorder.states, "steps": first.window.steps}, root / f"rank{run.global_rank}.pt")
        finish()

    averager = CheckpointAverager(window=4, every_n_steps=2, dirpath=root / "out", recover={"warmup": 4})
    callbacks = [averager]
    if mode == "spike-on-rank-1":
        from ckptavg.lightning.testing import InjectDivergence

        callbacks.append(InjectDivergence({12}, rank=1))
    run, model = fit("", callbacks, max_epochs=2)
    merged = run.callback_metrics.get("merged/val_loss")
    torch.save(
        {
            "weights": weights(model),
            "steps": averager.window.steps,
            "merged_val_loss": None if merged is None else float(merged),
            "restores": [e.step for e in averager.recovery_events],
        },
        root / f"rank{run.global_rank}.pt",
    )
    finish()


if __name__ == "__main__":
    main()
