"""Memory per rank and snapshot stall of a window in a 2-process run, and the GPU copy path.

Part 1 (CPU, torch.distributed with gloo, 2 processes; each mode in fresh processes): a replicated
(DDP-like) model of ``--params`` parameters, window of 8, kept in full on every rank
(``spread=False``) or spread over the ranks (the default under DDP). Per rank:

- bytes stored by the window / model bytes (target: 8 / world = 4 with spreading)
- resident memory added by filling the window
- snapshot time / a plain ``copy_`` of the model's tensors into buffers (interleaved, minimum
  times); spread snapshots also take rank 0's buffers and agree on the NaN check
- ``load_into`` (merge, and for a spread window the gather) / the full window's

Part 2 (when a CUDA device is present): a training-step stand-in (matmuls that do not touch the
weights, then an in-place update of every weight) with and without an overlapped snapshot. The
stall is the step time added by the snapshot, against the time of a plain blocking copy of the
weights to host memory (target: under 10% of it).

    python benchmarks/distributed.py                          # about 19M parameters (72 MiB)
    python benchmarks/distributed.py --params 2e6 --repeats 2 # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, report, rss_bytes  # noqa: E402
from window import transformer_state  # noqa: E402

from ckptavg import CheckpointWindow  # noqa: E402

WINDOW = 8
WORLD = 2


class StateModule(nn.Module):
    """A module holding a given state dict: floating tensors as parameters, the rest as buffers."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in state.items():
            key = name.replace(".", "_")
            if tensor.is_floating_point():
                self.register_parameter(key, nn.Parameter(tensor))
            else:
                self.register_buffer(key, tensor)


def model_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def rank_main(rank: int, port: int, mode: str, params: float, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    module = StateModule(transformer_state(params, torch.float32))
    tensors = [t.detach() for t in module.state_dict().values()]
    buffers = [torch.empty_like(t) for t in tensors]
    gc.collect()
    before = rss_bytes()
    window = CheckpointWindow(window=WINDOW, spread=(mode == "spread"))
    steps = iter(range(10**9))
    for _ in range(WINDOW):
        window.snapshot(module, step=next(steps))
    added = rss_bytes() - before
    assert window.layout is not None
    stored = window.stored_nbytes

    def snapshot() -> None:
        window.snapshot(module, step=next(steps))

    def plain_copy() -> None:
        torch._foreach_copy_(buffers, tensors)

    ratio, pair, t_snapshot, t_copy = interleaved(snapshot, plain_copy, repeats, before_each=dist.barrier)
    dist.barrier()
    restore_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        window.load_into(module, "sma")
        restore_times.append(time.perf_counter() - start)
    result = {
        "rank": rank,
        "stored_bytes": stored,
        "model_bytes": model_bytes(module),
        "added_rss": added,
        "snapshot_s": t_snapshot,
        "copy_s": t_copy,
        "snapshot_ratio": ratio,
        "snapshot_pair_ratio": pair,
        "load_into_s": min(restore_times),
    }
    Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_part(params: float, repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        results = {}
        for mode in ("full", "spread"):
            mp.spawn(rank_main, args=(free_port(), mode, params, repeats, out), nprocs=WORLD, join=True)
            results[mode] = [json.loads(Path(out, f"{mode}-rank{r}.json").read_text()) for r in range(WORLD)]
    for mode, ranks in results.items():
        model = ranks[0]["model_bytes"]
        rows.append(
            {
                "window": f"{WINDOW}, {'spread over 2 ranks' if mode == 'spread' else 'full copy per rank'}",
                "stored / model, per rank": max(r["stored_bytes"] for r in ranks) / model,
                "added RSS per rank (MB)": max(r["added_rss"] for r in ranks) / 2**20,
                "snapshot (ms)": statistics.mean(r["snapshot_s"] for r in ranks) * 1e3,
                "snapshot / plain copy": max(r["snapshot_ratio"] for r in ranks),
                "median pair ratio": max(r["snapshot_pair_ratio"] for r in ranks),
                "load_into (ms)": max(r["load_into_s"] for r in ranks) * 1e3,
            }
        )
    rows[1]["load_into / full window's"] = rows[1]["load_into (ms)"] / rows[0]["load_into (ms)"]
    for row, ranks in zip(rows, results.values(), strict=True):
        row["model (MiB)"] = ranks[0]["model_bytes"] / 2**20
    return rows


def gpu_part(params: float, repeats: int) -> dict:
    device = torch.device("cuda")
    module = StateModule(transformer_state(params, torch.float32)).to(device)
    weights = [p for p in module.parameters()]
    host = [torch.empty_like(w, device="cpu", pin_memory=True) for w in weights]
    work_a = torch.randn(4096, 4096, device=device)
    work_b = torch.randn(4096, 4096, device=device)

    def plain_copy() -> None:
        for h, w in zip(host, weights, strict=True):
            h.copy_(w)  # blocking: what a naive snapshot costs the training loop
        torch.cuda.synchronize()

    def step(window: CheckpointWindow | None, n: int) -> None:
        if window is not None:
            window.snapshot(module, step=n, overlap=True)
        x = work_a
        for _ in range(24):  # forward/backward stand-in: never touches the weights
            x = torch.mm(x, work_b).tanh_()
        if window is not None:
            window.before_update()
        with torch.no_grad():
            torch._foreach_add_(weights, 1e-7)  # the optimizer step: in place
        torch.cuda.synchronize()

    window = CheckpointWindow(window=WINDOW)
    counter = iter(range(10**9))
    for _ in range(3):
        step(window, next(counter))
        step(None, 0)
        plain_copy()
    with_snapshot, without, copies = [], [], []
    for _ in range(max(repeats, 5)):
        for fn, times in (
            (lambda: step(None, 0), without),
            (lambda: step(window, next(counter)), with_snapshot),
            (plain_copy, copies),
        ):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    stall = min(with_snapshot) - min(without)
    return {
        "device": torch.cuda.get_device_name(device),
        "model (MB)": model_bytes(module) / 2**20,
        "step without snapshot (ms)": min(without) * 1e3,
        "step with snapshot (ms)": min(with_snapshot) * 1e3,
        "plain blocking copy (ms)": min(copies) * 1e3,
        "stall / plain copy": stall / min(copies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--gpu-params", type=float, default=100e6)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = cpu_part(args.params, args.repeats)
    gpu = (
        gpu_part(args.gpu_params, args.repeats)
        if torch.cuda.is_available()
        else {"note": "no CUDA device: not measured"}
    )
    columns = [c for c in rows[0] if c != "model (MiB)"] + ["load_into / full window's"]
    report(
        "distributed",
        f"Window of {WINDOW} in a 2-process gloo run, a model of {rows[0]['model (MiB)']:.0f} MiB fp32 "
        "(targets: stored/model 4 when spread; GPU stall < 0.1 of a plain copy)",
        columns,
        rows,
        extra={"params": args.params, "gpu": gpu},
    )
    print("\nGPU copy path:", json.dumps(gpu, indent=1))


if __name__ == "__main__":
    main()
