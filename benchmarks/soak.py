"""A window that runs for a month: tens of thousands of snapshots, with merges, previews, restores
and reopen/resume cycles, on the cpu and the disk tier. What must stay flat does: resident memory,
open file descriptors, threads, the folder's size and its files (sampled along the way; the table
gives each one's slope over the second half of the run). Every ``--check-every``-th merge is
compared with a float64 reference of the snapshots the window holds, and every 997th snapshot
holds a NaN, which the next merge must drop.

    python benchmarks/soak.py                       # 30000 snapshots per tier
    python benchmarks/soak.py --snapshots 2000      # a few minutes
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import report, rss_bytes  # noqa: E402

from ckptavg import CheckpointWindow, CkptavgWarning  # noqa: E402

WINDOW = 8
NAN_EVERY = 997  # a prime: the poisoned snapshots fall at every phase of the other cycles
MERGE_EVERY, PREVIEW_EVERY, RESTORE_EVERY, REOPEN_EVERY = 10, 25, 100, 500


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 64))


def folder_stats(path: Path | None) -> tuple[int, int]:
    if path is None or not path.exists():
        return 0, 0
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of the second half, per 1000 snapshots."""
    half = points[len(points) // 2 :]
    if len(half) < 2:
        return 0.0
    xs, ys = [p[0] for p in half], [p[1] for p in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def soak(storage: str, snapshots: int, check_every: int, root: Path) -> dict[str, Any]:
    net = model()
    dirpath = root / f"window-{storage}" if storage == "disk" else None
    window = CheckpointWindow(window=WINDOW, storage=storage, dirpath=dirpath)  # type: ignore[arg-type]
    held: dict[int, dict[str, torch.Tensor]] = {}  # what each held step's snapshot was, for the reference
    samples: dict[str, list[tuple[int, float]]] = {k: [] for k in ("rss MiB", "fds", "threads", "files", "folder MiB")}
    merges = checked = restores = reopens = 0
    worst = 0.0
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(1)
    caught = warnings.catch_warnings(record=True)
    drops = caught.__enter__()  # every merge, preview and restore may be the one that finds a NaN snapshot
    warnings.simplefilter("always", CkptavgWarning)
    for step in range(1, snapshots + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
            poisoned = step % NAN_EVERY == 0
            if poisoned:
                saved = net[0].weight[0, 0].item()
                net[0].weight[0, 0] = math.nan
            window.snapshot(net, step=step)
            held[step] = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if poisoned:
                net[0].weight[0, 0] = saved
        for old in [s for s in held if s < step - 4 * WINDOW]:
            del held[old]  # a cpu window may take back the snapshot a NaN one evicted: keep a few more
        if step % MERGE_EVERY == 0:
            merged = window.merge("ema")
            merges += 1
            assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point()), step
            if merges % check_every == 0:
                weights = window.weights("ema")
                for name, tensor in merged.items():
                    if not tensor.is_floating_point():
                        continue
                    reference = sum(w * held[s][name].double() for s, w in zip(window.steps, weights, strict=True))
                    worst = max(worst, float((tensor.double() - reference).abs().max()))
                checked += 1
        if step % PREVIEW_EVERY == 0:
            with window.swapped(net, "sma"):
                net(torch.ones(2, 64))
        if step % RESTORE_EVERY == 0 and len(window) > 1:
            window.load_into(net, "sma", before=window.steps[-1])
            restores += 1
        if step % REOPEN_EVERY == 0:
            if storage == "disk":
                window.close()
                window = CheckpointWindow.open(dirpath)  # type: ignore[arg-type]
            else:
                state = window.state_dict()
                window = CheckpointWindow(window=WINDOW)
                window.load_state_dict(state)
            reopens += 1
        if step % max(1, snapshots // 100) == 0:
            files, size = folder_stats(dirpath)
            values = {
                "rss MiB": rss_bytes() / 2**20,
                "fds": open_fds(),
                "threads": threading.active_count(),
                "files": files,
                "folder MiB": size / 2**20,
            }
            for key, value in values.items():
                samples[key].append((step, float(value)))
    window.close()
    caught.__exit__(None, None, None)
    dropped = sum("NaN or Inf" in str(w.message) for w in drops)
    seconds = time.perf_counter() - started
    row: dict[str, Any] = {
        "storage": storage,
        "snapshots": snapshots,
        "merges": merges,
        "checked vs float64": checked,
        "max abs error": worst,
        "NaN snapshots dropped": dropped,
        "restores": restores,
        "reopens": reopens,
        "seconds": round(seconds, 1),
    }
    for key, points in samples.items():
        row[f"{key} first"] = points[0][1]
        row[f"{key} last"] = points[-1][1]
        row[f"{key} slope/1k"] = slope(points)
    row["samples"] = samples
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=int, default=30000, help="per tier")
    parser.add_argument("--check-every", type=int, default=20, help="merges between float64 checks")
    parser.add_argument("--tiers", default="cpu,disk")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for storage in args.tiers.split(","):
            rows.append(soak(storage, args.snapshots, args.check_every, Path(tmp)))
            print({k: v for k, v in rows[-1].items() if k != "samples"}, flush=True)
    columns = [
        "storage", "snapshots", "merges", "checked vs float64", "max abs error", "NaN snapshots dropped",
        "restores", "reopens", "rss MiB last", "rss MiB slope/1k", "fds last", "fds slope/1k",
        "threads last", "threads slope/1k", "files last", "files slope/1k", "folder MiB last",
        "folder MiB slope/1k", "seconds",
    ]  # fmt: skip
    report(
        "soak",
        f"Soak: {args.snapshots} snapshots per tier (slopes over the second half, per 1000 snapshots)",
        columns,
        rows,
    )


if __name__ == "__main__":
    main()
