"""Plain PyTorch DDP on CPU with gloo, 2 processes: a spread window next to a full one.

    python -m torch.distributed.run --nproc_per_node 2 tests/workers/ddp_window.py OUT

Each rank saves what it saw to OUT/rank<r>.pt; the test compares.
"""

import io
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from helpers.loop import train_step
from torch import nn

from ckptavg import CheckpointWindow, consolidate


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    # fp32 weights, BatchNorm's fp32 statistics and int64 counter, a bf16 buffer; odd sizes, so the
    # slices cut through tensors.
    net = nn.Sequential(nn.Linear(7, 33), nn.BatchNorm1d(33), nn.ReLU(), nn.Linear(33, 5))
    net.register_buffer("scale", torch.linspace(0, 1, 11, dtype=torch.bfloat16))
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    spread = CheckpointWindow(window=3)  # spread by default: the snapshots come from a DDP module
    full = CheckpointWindow(window=3, spread=False)
    disk = CheckpointWindow(window=3, storage="disk", dirpath=out / "window")  # the same dirpath on both ranks
    generator = torch.Generator().manual_seed(rank)
    for step in range(1, 6):
        train_step(model, optimizer, torch.randn(16, 7, generator=generator))
        with torch.no_grad():
            net.scale.add_(0.125)
        for window in (spread, full, disk):
            assert window.snapshot(model, step=step)

    # Every storable dtype spreads and gathers (as bytes: gloo and NCCL refuse int16 tensors).
    odd = {"w": CheckpointWindow(window=2, spread=True), "ref": CheckpointWindow(window=2, spread=False)}
    for step in range(3):
        state = {
            "i16": torch.arange(7, dtype=torch.int16) * step, "flag": torch.tensor([step % 2 == 0] * 3),
            "f16": torch.linspace(-1, 1, 9, dtype=torch.float16) * step, "f64": torch.arange(3, dtype=torch.float64) / (step + 1),
            "u8": torch.tensor([step], dtype=torch.uint8), "scalar": torch.tensor(float(step)),
        }  # fmt: skip
        for window in odd.values():
            assert window.snapshot(state, step=step)
    odd_dtypes = (odd["w"].merge("wma"), odd["ref"].merge("wma"))

    results: dict = {
        "odd_dtypes": odd_dtypes,
        "stored_numel": {name: sum(e.numel for e in w.layout) for name, w in (("spread", spread), ("full", full))},
        "sharding_kind": spread.sharding["kind"],
    }
    for method in ("sma", "wma", "ema"):
        results[f"{method}_spread"] = spread.merge(method)
        results[f"{method}_full"] = full.merge(method)
    results["before_spread"] = spread.merge("sma", before=5)
    results["before_full"] = full.merge("sma", before=5)
    results["disk"] = disk.merge("wma")

    # A NaN on rank 1's half only: the snapshot is a plain copy; the next merge finds it on rank 1
    # and both ranks drop it, so their windows stay aligned (and get step 3 back: its row is intact).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            saved = net[3].bias.clone()
            if rank == 1:
                net[3].bias.fill_(float("nan"))
            results["nan_accepted"] = spread.snapshot(model, step=6)
            net[3].bias.copy_(saved)
        results["steps_with_nan"] = spread.steps
        results["after_nan"] = spread.merge("ema")
    results["nan_warning"] = [str(w.message) for w in caught]
    results["steps_after_nan"] = spread.steps

    # The window's state round-trips through torch.save / torch.load(weights_only=True).
    buffer = io.BytesIO()
    torch.save(spread.state_dict(), buffer)
    buffer.seek(0)
    resumed = CheckpointWindow(window=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    results["resumed"] = resumed.merge("ema")
    results["state"] = spread.state_dict()  # the test loads it in a single process

    # Whole windows join a spread run: every rank's states combined, or rank 0's full window.
    states: list = [None, None]
    dist.all_gather_object(states, results["state"])
    respread = CheckpointWindow(window=3, spread=True)
    respread.load_state_dict(CheckpointWindow.combine_states(states))
    results["respread_combined"] = respread.merge("ema")
    whole = [full.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(whole, src=0)
    respread.load_state_dict(whole[0])
    results["respread_full"] = respread.merge("ema")
    results["respread_stored"] = sum(e.numel for e in respread.layout)

    # load_into gathers the merge into every replica; swapped gives the raw weights back.
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with spread.swapped(model, "sma"):
        results["swapped"] = {k: v.clone() for k, v in net.state_dict().items()}
    results["after_swap_equal"] = all(torch.equal(raw[k], v) for k, v in net.state_dict().items())
    spread.load_into(model, "ema")
    results["loaded"] = {k: v.clone() for k, v in net.state_dict().items()}

    disk.close()
    with CheckpointWindow.open(out / "window") as reopened:  # as after a crash: each rank its own folder
        results["reopened"] = reopened.merge("wma")  # still spread: merged on the slices and gathered
    dist.barrier()
    if rank == 0:
        results["consolidated"] = consolidate(out / "window", "wma")
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
