"""FSDP2 (fully_shard) on CPU with gloo, 2 processes: each rank keeps a window of its own shards.

    python -m torch.distributed.run --nproc_per_node 2 fsdp_worker.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptavg import CheckpointWindow

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (2,))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
for layer in model:
    if isinstance(layer, torch.nn.Linear):
        fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
windows = {
    "cpu": CheckpointWindow(window=3),
    "disk": CheckpointWindow(window=3, storage="disk", dirpath=out / f"window-rank{rank}"),
}
full_states = []  # what a single process would have seen: the gathered, full tensors
generator = torch.Generator().manual_seed(rank)
for step in range(1, 6):
    loss = model(torch.randn(4, 8, generator=generator)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for window in windows.values():
        assert window.snapshot(model, step=step)  # local shards only: no communication
    full_states.append({k: v.full_tensor().clone() for k, v in model.state_dict().items()})
windows["disk"].close()
windows["disk"] = CheckpointWindow.open(out / f"window-rank{rank}")  # as after a crash
results = {"local_shapes": {e.name: e.shape for e in windows["cpu"].layout}, "full_states": full_states[-3:]}
for name, window in windows.items():
    merged_local = window.merge("ema")
    window.load_into(model, "ema")  # writes each rank's own shards
    results[name] = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    results[name + "_local"] = merged_local
torch.save(results, out / f"rank{rank}.pt")
dist.destroy_process_group()
