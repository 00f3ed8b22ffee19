"""Shared helpers for the benchmarks: timing, resident memory, and the table/JSON report."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Where tables (JSON) and figures go; tests point it elsewhere so they never touch the committed results.
RESULTS = Path(os.environ.get("CKPTAVG_BENCH_RESULTS", Path(__file__).parent / "results"))


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (the machine is shared: the median resists outliers)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    repeats: int = 5,
    before_each: Callable[[], object] = lambda: None,
) -> tuple[float, float, float, float]:
    """Time ``baseline`` and ``candidate`` alternately, ``repeats`` times each, each run after an
    untimed ``before_each`` (for example a barrier, so that no rank times another's lag).

    Returns ``(ratio of the minimum times, median of the per-pair ratios, min candidate s, min
    baseline s)``. On a shared machine interference only ever adds time, so the minima are the
    most repeatable estimate of each side's own cost (the advice of Python's ``timeit``); the
    median pair ratio is kept as a cross-check."""
    baseline()
    candidate()
    ratios, times_c, times_b = [], [], []
    for _ in range(repeats):
        before_each()
        start = time.perf_counter()
        baseline()
        t_b = time.perf_counter() - start
        before_each()
        start = time.perf_counter()
        candidate()
        t_c = time.perf_counter() - start
        ratios.append(t_c / t_b)
        times_c.append(t_c)
        times_b.append(t_b)
    return min(times_c) / min(times_b), statistics.median(ratios), min(times_c), min(times_b)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def report(
    name: str, title: str, columns: list[str], rows: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> Path:
    """Print ``rows`` as a Markdown table and write them, with the environment, as JSON."""
    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps({"benchmark": name, "environment": environment(), "rows": rows, **(extra or {})}, indent=1)
    )
    print(f"\nwritten to {path}")
    return path
