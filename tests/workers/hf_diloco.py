"""DiLoCo under the Hugging Face Trainer, 2 gloo processes on CPU.

python -m torch.distributed.run --nproc_per_node 2 tests/workers/hf_diloco.py OUT
"""

import sys
from pathlib import Path

import torch
from helpers.hf import trainer
from transformers import TrainerCallback

from ckptavg.hf import CheckpointAveragerCallback, DiLoCoCallback


def main() -> None:
    out = Path(sys.argv[1])
    seen = {}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    diloco = DiLoCoCallback(sync_every=5)
    averager = CheckpointAveragerCallback(window=2, every_n_steps=5, storage="cpu", recover=False)
    run = trainer(out / "run", [diloco, averager, Watch()], max_steps=20, eval_steps=20, ddp_backend="gloo")
    run.train()
    rank = torch.distributed.get_rank()
    torch.save(
        {
            "seen": seen,
            "bytes": diloco.diloco.bytes_sent,
            "wrapped": type(run.model_wrapped).__name__,
            "final": torch.cat([p.detach().reshape(-1) for p in run.model.parameters()]).clone(),
            "steps": averager.window.steps,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
