"""A Hugging Face Trainer run under DDP on CPU (gloo, 2 processes) with the averager.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/hf_ddp.py OUT

Each rank saves what it saw to OUT/rank<r>.pt; the test compares.
"""

import sys
from pathlib import Path

import torch
from helpers.hf import trainer

from ckptavg.hf import CheckpointAveragerCallback


def main() -> None:
    out = Path(sys.argv[1])
    averager = CheckpointAveragerCallback(window=4, every_n_steps=5, storage="cpu")
    run = trainer(out / "run", [averager], max_steps=20, eval_steps=10, ddp_backend="gloo")
    run.train()
    rank = torch.distributed.get_rank()
    torch.save(
        {
            "world": torch.distributed.get_world_size(),
            "state": {k: v.clone() for k, v in run.model.state_dict().items()},
            "sharding": (averager.window.sharding or {}).get("kind"),
            "stored": averager.window.stored_nbytes,
            "model_bytes": sum(t.numel() * t.element_size() for t in run.model.state_dict().values()),
            "merged_losses": [e["eval_merged_loss"] for e in run.state.log_history if "eval_merged_loss" in e],
            "steps": averager.window.steps,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
