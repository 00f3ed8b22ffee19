"""DiLoCo, Streaming DiLoCo and SPARTA against data-parallel training, with real gloo processes.

    python benchmarks/distributed_merges.py                  # 2 and 4 workers, 3 seeds (about 30 min on 2 cores)
    python benchmarks/distributed_merges.py --quick          # 2 workers, 1 seed, 60 steps

Every variant trains the byte-level GPT (benchmarks/models.py) for the same inner steps, with the
same per-worker batch (each worker its own data stream) and AdamW: data-parallel (DDP, a gradient
all-reduce every step), DiLoCo with H = 10, 50 and 100, Streaming DiLoCo (4 fragments, bfloat16,
five steps of overlap), SPARTA (0.5% and 0.1% of the elements every step) and SPARTA + DiLoCo;
``avg-H`` (periodic averaging every H steps: DiLoCo with an outer ``SGD(lr=1)``) on request.
Reported: the final validation loss (mean and spread over seeds, and the ratio to DDP's), and the
bytes each worker handed to the collectives (DDP's counted in a gradient communication hook).

The wide-area simulation: the measured compute time of each run, plus, for every collective, the
time a ring all-reduce of its payload would take on a link of ``--bandwidth`` Mbit/s and
``--latency`` ms: ``2 (n - 1)`` latencies and ``2 (n - 1) / n x payload / bandwidth``. The table
gives the simulated time to reach DDP's final loss + ``--target`` percent.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402

VARIANTS = [
    "ddp",
    "diloco-10",
    "diloco-50",
    "diloco-100",
    "streaming-4",
    "sparta-0.5%",
    "sparta-0.1%",
    "sparta+diloco-100",
]


def worker(out: Path, seed: int, steps: int, evals: int, variants: list[str]) -> None:
    import torch.distributed as dist
    from models import ByteGPT, batch_at, stdlib_bytes, validation_batches
    from torch.nn.parallel import DistributedDataParallel

    from ckptavg.distributed import DiLoCo, Sparta

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train, val, _ = stdlib_bytes()
    context, batch = 64, 16
    val_batches = validation_batches(val, 8, 32, context)
    results = {}
    for variant in variants:
        torch.manual_seed(seed)
        model = ByteGPT(width=64, layers=2, heads=2, context=context)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        comms: list[int] = []  # payload bytes of each collective
        syncers: list[Any] = []
        net: torch.nn.Module = model
        if variant == "ddp":
            net = DistributedDataParallel(model)

            def counting(sizes, bucket):  # type: ignore[no-untyped-def]  # DDP checks the annotations: none here
                sizes.append(bucket.buffer().numel() * bucket.buffer().element_size())
                tensor = bucket.buffer().div_(world)
                return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

            net.register_comm_hook(comms, counting)
        if variant.startswith("diloco") or variant.endswith("diloco-100"):
            syncers.append(DiLoCo(model, optimizer, sync_every=int(variant.rsplit("-", 1)[1])))
        if variant.startswith("avg-"):  # periodic averaging: DiLoCo with outer SGD(lr=1, momentum=0)
            plain = functools.partial(torch.optim.SGD, lr=1.0)
            syncers.append(DiLoCo(model, optimizer, sync_every=int(variant.split("-")[1]), outer_optimizer=plain))
        if variant.startswith("streaming"):
            syncers.append(
                DiLoCo(
                    model, optimizer, sync_every=100, fragments=4, fragment_delay=5, communication_dtype=torch.bfloat16
                )
            )
        if variant.startswith("sparta"):
            fraction = float(variant.split("-")[1].split("%")[0].split("+")[0]) / 100 if "%" in variant else 0.005
            syncers.insert(0, Sparta(model, optimizer, fraction=fraction))
        curve, compute = [], 0.0
        sent_before = 0
        for step in range(1, steps + 1):
            start = time.perf_counter()
            tokens = batch_at(train, step, batch, context, seed=seed * 1000 + rank)
            loss = (
                model.loss(tokens) if variant != "ddp" else net.module.loss(tokens) if False else _ddp_loss(net, tokens)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            compute += time.perf_counter() - start
            sent = sum(s.bytes_sent for s in syncers)
            if sent > sent_before:
                comms.append(sent - sent_before)
                sent_before = sent
            if step % max(steps // evals, 1) == 0 or step == steps:
                for s in syncers:
                    if hasattr(s, "flush"):
                        s.flush()
                with torch.no_grad():
                    v = sum(float(model.loss(b)) for b in val_batches) / len(val_batches)
                curve.append({"step": step, "compute_s": compute, "comms": list(comms), "val": v})
        for s in syncers:
            s.close()
        # Rank 0's model is reported: after a DiLoCo sync step (the last step here) it is the global one.
        results[variant] = {"curve": curve, "bytes": sum(comms), "final": curve[-1]["val"]}
        dist.barrier()
    if rank == 0:
        (out / f"seed{seed}-world{world}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _ddp_loss(net: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = net(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))


def simulated_seconds(point: dict[str, Any], world: int, mbit: float, latency_ms: float) -> float:
    link = mbit * 1e6 / 8
    hops = 2 * (world - 1)
    return point["compute_s"] + sum(hops * latency_ms / 1000 + hops / world * b / link for b in point["comms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=4, metavar=("OUT", "SEED", "STEPS", "EVALS"), help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--evals", type=int, default=8)
    parser.add_argument("--bandwidth", type=float, default=100.0, help="simulated link, Mbit/s")
    parser.add_argument("--latency", type=float, default=50.0, help="simulated link, ms per hop")
    parser.add_argument("--target", type=float, default=2.0, help="percent above DDP's final loss")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="distributed_merges", help="the results file's name")
    parser.add_argument("--from-json", help="rebuild the table from a results file instead of running")
    options = parser.parse_args()
    if options.worker:
        out, seed, steps, evals = options.worker
        worker(Path(out), int(seed), int(steps), int(evals), options.variants.split(","))
        return
    if options.quick:
        options.worlds, options.seeds, options.evals = "2", 1, 2
        options.steps = min(options.steps, 60)
    worlds = [int(w) for w in options.worlds.split(",")]
    variants = options.variants.split(",")
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in worlds}
    if options.from_json:
        saved = json.loads(Path(options.from_json).read_text())
        runs = {int(w): r for w, r in saved["runs"].items()}
        worlds, variants = sorted(runs), list(next(iter(runs.values()))[0])
        options.seeds, options.steps = len(next(iter(runs.values()))), saved["options"]["steps"]
    _run_all(options, worlds, variants, runs)
    _table(options, worlds, variants, runs)


def _run_all(options: Any, worlds: list[int], variants: list[str], runs: dict[int, list[dict[str, Any]]]) -> None:
    if options.from_json:
        return
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])]),
        "OMP_NUM_THREADS": "1",
    }
    with TemporaryDirectory() as tmp:
        for world in worlds:
            for seed in range(options.seeds):
                command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), __file__,
                           "--variants", ",".join(variants), "--worker", tmp, str(seed), str(options.steps), str(options.evals)]  # fmt: skip
                subprocess.run(command, env=env, check=True, capture_output=True)
                runs[world].append(json.loads((Path(tmp) / f"seed{seed}-world{world}.json").read_text()))
                print(
                    f"world {world}, seed {seed}: "
                    + ", ".join(f"{v} {runs[world][-1][v]['final']:.4f}" for v in variants),
                    flush=True,
                )


def _table(options: Any, worlds: list[int], variants: list[str], runs: dict[int, list[dict[str, Any]]]) -> None:
    rows = []
    for world in worlds:
        for variant in variants:
            finals = [r[variant]["final"] for r in runs[world]]
            ratios = (
                [r[variant]["final"] / r["ddp"]["final"] for r in runs[world]] if "ddp" in variants else [math_nan()]
            )
            sent = statistics.mean(r[variant]["bytes"] for r in runs[world])
            ddp_sent = statistics.mean(r["ddp"]["bytes"] for r in runs[world]) if "ddp" in variants else float("nan")
            reach = []
            for r in runs[world]:
                target = r["ddp"]["final"] * (1 + options.target / 100) if "ddp" in variants else -1
                hit = next((p for p in r[variant]["curve"] if p["val"] <= target), None)
                reach.append(simulated_seconds(hit, world, options.bandwidth, options.latency) if hit else float("inf"))
            rows.append({
                "workers": world, "variant": variant,
                "val loss": f"{statistics.mean(finals):.4f} ± {statistics.stdev(finals) if len(finals) > 1 else 0:.4f}",
                "vs DDP": f"{(statistics.mean(ratios) - 1) * 100:+.2f}%",
                "MB sent / worker": round(sent / 2**20, 2),
                "less than DDP": f"{ddp_sent / sent:.0f}x" if sent else "-",
                f"time to DDP+{options.target:g}% (sim. s)": _reached(reach),
            })  # fmt: skip
    report(
        options.name,
        f"{options.steps} inner steps, {options.seeds} seed(s); link {options.bandwidth:g} Mbit/s, {options.latency:g} ms",
        [
            "workers",
            "variant",
            "val loss",
            "vs DDP",
            "MB sent / worker",
            "less than DDP",
            f"time to DDP+{options.target:g}% (sim. s)",
        ],
        rows,
        extra={"runs": {str(w): r for w, r in runs.items()}, "options": vars(options)},
    )


def _reached(seconds: list[float]) -> str:
    """The median simulated time over the seeds that reached the target, and how many did."""
    reached = [s for s in seconds if s != float("inf")]
    if not reached:
        return "not reached"
    return f"{statistics.median(reached):.0f}" + (
        "" if len(reached) == len(seconds) else f" ({len(reached)}/{len(seconds)} seeds)"
    )


def math_nan() -> float:
    return float("nan")


if __name__ == "__main__":
    main()
