"""FSDP2 (fully_shard) on CPU with gloo, 2 processes: each rank keeps a window of its own shards.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/fsdp.py OUT

A plain training loop with a SpikeGuard; rank 1 alone sees a NaN loss at step 9. Each rank saves
what it saw to OUT/rank<r>.pt; the test compares.
"""

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.loop import train_step
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptavg import CheckpointWindow, RecoveryPolicy, SpikeGuard, consolidate


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    # 5 output rows: an uneven split (3 + 2) of the last layer.
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    windows = {
        "cpu": CheckpointWindow(window=3),
        "disk": CheckpointWindow(window=3, storage="disk", dirpath=out / "window"),  # one dirpath for all ranks
    }
    guard = SpikeGuard(windows["cpu"], RecoveryPolicy(warmup=3))

    def full_state() -> dict[str, torch.Tensor]:
        return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}

    full_states = {}  # what a single process would have seen: the gathered, full tensors, by step
    restored = {}
    generator = torch.Generator().manual_seed(rank)
    for step in range(1, 12):
        loss = train_step(model, optimizer, torch.randn(4, 8, generator=generator))
        value = math.nan if (rank == 1 and step == 9) else float(loss)
        if guard.observe(step, value):  # the ranks agree: both restore at step 9
            event = guard.restore(model, [optimizer], step)  # the guard's (cpu) window drops the untrusted step 8
            windows["disk"].discard_from(event.onset - 1)  # the mirror window does the same
            restored = {"step": event.step, "steps_merged": event.steps_merged, "weights": full_state()}
            continue
        for window in windows.values():
            assert window.snapshot(model, step=step)  # local shards only: no communication
        full_states[step] = full_state()

    windows["disk"].close()
    windows["disk"] = CheckpointWindow.open(out / "window")  # as after a crash: this rank's folder
    steps = windows["cpu"].steps
    results = {
        "local_shapes": {e.name: e.shape for e in windows["cpu"].layout},
        "sharding": windows["disk"].sharding,
        "steps": steps,
        "full_states": [full_states[s] for s in steps],
        "restored": restored,
        "pre_spike_states": [full_states[s] for s in restored["steps_merged"]],
    }
    for name, window in windows.items():
        results[name + "_local"] = window.merge("ema")
        window.load_into(model, "ema")  # the end-of-run merge: each rank writes its own shards
        results[name] = full_state()
    windows["disk"].close()
    dist.barrier()
    if rank == 0:
        results["consolidated"] = consolidate(out / "window", "ema")
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
