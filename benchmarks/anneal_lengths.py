"""The claim at length: does a zero-cooldown merge keep up with a planned decay as runs get longer?

For each task (``anneal.py``'s two, the GPT at 2 layers and context 64 so that the longest run
fits on 2 cores) and each of three run lengths (1x, 2x and 4x the task's base length), every
schedule gets its own peak learning rate: a sweep over ``LR_GRID`` (4 peaks a factor 2 apart;
doubled for schedule-free) on seed 0, the best kept by the
final model's loss on the **validation** half of the held-out data. Seeds 1 and 2 then run each
schedule at its best peak. Every number reported is the loss on the **test** half, which nothing
chose on.

Schedules (AdamW, linear warm-up over 5% of the run): constant; WSD (constant, the last 20%
linear to 0, branched from the constant run at its own best peak); D2Z (linear decay to zero over
the whole run, "Straight to Zero", arXiv 2502.15938); cosine to 10%; schedule-free AdamW.

Merges, all of the constant run at the constant schedule's best peak, with zero cooldown steps:

- **the callback with no arguments**: a plain loop driving ``TrainingSession(AveragerConfig())``,
  the engine both adapters run (its cadence, its recovery, its SMA);
- SMA over the last 5%, 10%, 20% and 40% of the run with 8 snapshots each, and with all the
  snapshots stored in the last 20% / 40% (one every steps/160): span against count (WSM, arXiv
  2507.17634, finds the span matters more);
- post-hoc EMA (sigma_rel 0.05, 0.10) and ``select`` (chosen on the validation half), over the 64
  stored snapshots.

Results: one table per task (test loss as a ratio to WSD and to D2Z, mean and sample std over
seeds, by length), ``benchmarks/results/anneal_lengths.json`` and ``anneal_lengths.png``.

    python benchmarks/anneal_lengths.py --jobs 2            # about an hour on 2 cores
    python benchmarks/anneal_lengths.py --quick             # 1 seed, short runs, 2 LRs: minutes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from anneal import Config, Run, Schedule, Task, constant, cooldown, cosine, digits_task, gpt_task, measure  # noqa: E402
from common import RESULTS, report  # noqa: E402

from ckptavg import CheckpointWindow, CkptavgWarning, evaluator, select  # noqa: E402
from ckptavg.methods import coefficients  # noqa: E402
from ckptavg.training import AveragerConfig, TrainingSession  # noqa: E402

TASKS: dict[str, Callable[[], Task]] = {
    "gpt": lambda: gpt_task(layers=2, context=64, held_out_batches=12),
    "digits": digits_task,
}
BASE_STEPS = {"gpt": 500, "digits": 1000}
LENGTHS = (1, 2, 4)
LR_GRID = {"gpt": (7.5e-4, 1.5e-3, 3e-3, 6e-3), "digits": (1.5e-3, 3e-3, 6e-3, 1.2e-2)}  # AdamW's peaks
SCHEDULE_FREE_FACTOR = 2.0  # schedule-free's grid: the same, doubled (its authors advise a higher LR)
SCHEDULES = ("constant", "D2Z", "cosine", "schedule-free")  # WSD branches from the constant run
STORED = 64  # one snapshot every steps/160: the last 40% of the run
SPANS = (0.05, 0.10, 0.20, 0.40)
MERGED_ROWS = "merges of the constant run"


def d2z(cfg: Config, peak: float) -> Schedule:
    """Warm-up, then linear from the peak to zero at the last step."""

    def lr(step: int) -> float:
        if step <= cfg.warmup:
            return peak * step / cfg.warmup
        return peak * (cfg.steps - step) / (cfg.steps - cfg.warmup)

    return lr


def sma_over_span(window: CheckpointWindow, steps: int, span: float, count: int | None) -> list[float]:
    """SMA of ``count`` snapshots evenly spaced over the last ``span`` of the run (all stored ones
    in that span when ``count`` is None); zeros elsewhere."""
    inside = [i for i, s in enumerate(window.steps) if s > steps * (1 - span)]
    stride = max(1, len(inside) // count) if count else 1
    chosen = inside[::-1][::stride][: count or None]
    weights = [0.0] * len(window)
    for index, w in zip(chosen, coefficients("sma", [window.steps[i] for i in chosen]), strict=True):
        weights[index] = w
    return weights


def train(task_name: str, steps: int, schedule: str, peak: float, seed: int, merges: bool) -> dict[str, Any]:
    """One run; returns ``{variant: {"val": loss, "test": loss}}`` (the constant run adds WSD, and
    with ``merges`` the zero-cooldown merges)."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", CkptavgWarning)  # post-hoc EMA's truncation warning
    task = TASKS[task_name]()
    cfg = Config(steps=steps, seed=seed)
    started = time.perf_counter()

    def scored(run: Run) -> dict[str, float]:
        return {"test": run.evaluate()["loss"], "val": run.evaluate(batches=task.select)["loss"]}

    results: dict[str, dict[str, float]] = {}
    if schedule == "schedule-free":
        run = Run(task, cfg, schedule_free=True, peak_lr=peak)
        run.advance(None, steps)
        results[schedule] = scored(run)
    elif schedule in ("D2Z", "cosine"):
        run = Run(task, cfg, peak_lr=peak)
        run.advance((d2z if schedule == "D2Z" else cosine)(cfg, peak), steps)
        results[schedule] = scored(run)
    else:
        results.update(_constant_run(task, cfg, peak, merges, scored))
    return {
        "task": task_name,
        "steps": steps,
        "schedule": schedule,
        "peak": peak,
        "seed": seed,
        "results": results,
        "seconds": time.perf_counter() - started,
    }


def _constant_run(
    task: Task, cfg: Config, peak: float, merges: bool, scored: Callable[[Run], dict[str, float]]
) -> dict[str, dict[str, float]]:
    steps = cfg.steps
    run = Run(task, cfg, peak_lr=peak)
    session = TrainingSession(AveragerConfig(storage="cpu"), info=lambda m: None, warn=lambda m: None)
    session.plan(steps, None, 0)
    session.begin(run.model, 0)
    stored = CheckpointWindow(window=STORED)
    interval = max(1, steps // 160)  # STORED snapshots over the last 40%
    branch: list[Run] = []

    def after_step(r: Run) -> None:
        session.add_loss(torch.tensor(r.loss))
        batch = r.batch
        session.end_step(r.step, r.model, [r.optimizer], lambda: float(task.loss_fn(r.model(batch[0]), batch[1])))
        if session.snapshot_due(r.step):
            session.snapshot(r.model, r.step, overlap=False)
        if r.step % interval == 0 and r.step > 0.6 * steps and (session.guard is None or session.guard.healthy):
            stored.snapshot(r.model, step=r.step)
        if r.step == int(0.8 * steps):
            branch.append(r.branch())

    run.advance(constant(cfg, peak), steps, after_step)
    results = {"constant": scored(run)}
    wsd = branch[0]
    wsd.advance(cooldown(peak, wsd.step, steps - wsd.step), steps)
    results["WSD"] = scored(wsd)
    if not merges:
        return results
    scratch = task.make_model().eval()
    merged: dict[str, list[float] | dict[str, torch.Tensor]] = {
        "callback, no arguments": session.window.merge(session.main.weights(session.window)),
    }
    for span in SPANS:
        merged[f"SMA last {span:.0%} (8)"] = sma_over_span(stored, steps, span, 8)
    for span in (0.20, 0.40):
        merged[f"SMA last {span:.0%} (all)"] = sma_over_span(stored, steps, span, None)
    for sigma in (0.05, 0.10):
        merged[f"post-hoc EMA {sigma:.2f}"] = stored.weights("posthoc", sigma_rel=sigma)
    picked, _ = select(stored, evaluator(scratch, task.loss_fn, task.select))
    merged["select (validation)"] = picked
    for name, merge in merged.items():
        state = merge if isinstance(merge, dict) else stored.merge(merge)
        scratch.load_state_dict(state)
        results[name] = {"test": measure(task, scratch)["loss"], "val": measure(task, scratch, task.select)["loss"]}
    results["callback, no arguments"]["restores"] = float(len(session.recovery_events))
    session.close()
    return results


# -- the study -----------------------------------------------------------------------------------


def sweep_jobs(tasks: list[str], lengths: tuple[int, ...], grid: dict[str, tuple[float, ...]]) -> list[tuple]:
    return [
        (task, BASE_STEPS[task] * k, schedule, lr, 0, schedule == "constant")
        for task in tasks
        for k in lengths
        for schedule in SCHEDULES
        for lr in grid[task]
        for lr in [lr * SCHEDULE_FREE_FACTOR if schedule == "schedule-free" else lr]
    ]


def best_peaks(sweep: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (task, steps): each schedule's best peak by the final validation loss (WSD its own)."""
    best: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    for run in sweep:
        key = (run["task"], run["steps"])
        for variant in (run["schedule"], "WSD") if run["schedule"] == "constant" else (run["schedule"],):
            loss = run["results"][variant]["val"]
            if variant not in best.setdefault(key, {}) or loss < best[key][variant][1]:
                best[key][variant] = (run["peak"], loss)
    return {key: {v: peak for v, (peak, _) in chosen.items()} for key, chosen in best.items()}


def seed_jobs(peaks: dict[tuple[str, int], dict[str, float]], seeds: int) -> list[tuple]:
    jobs = []
    for (task, steps), chosen in peaks.items():
        for seed in range(1, seeds):
            jobs.append((task, steps, "constant", chosen["constant"], seed, True))
            if chosen["WSD"] != chosen["constant"]:
                jobs.append((task, steps, "constant", chosen["WSD"], seed, False))
            jobs += [(task, steps, s, chosen[s], seed, False) for s in SCHEDULES if s != "constant"]
    return jobs


def collect(runs: list[dict[str, Any]], peaks: dict[tuple[str, int], dict[str, float]]) -> dict[tuple, dict]:
    """``{(task, steps): {seed: {variant: test loss}}}``: each schedule at its best peak, the
    merges of the constant run at the constant schedule's best peak."""
    table: dict[tuple, dict] = {}
    for run in runs:
        key = (run["task"], run["steps"])
        row = table.setdefault(key, {}).setdefault(run["seed"], {})
        for variant, scores in run["results"].items():
            schedule = variant if variant in (*SCHEDULES, "WSD") else "constant"
            if run["peak"] == peaks[key][schedule]:
                row[variant] = scores["test"]
    return table


def summarize(table: dict[tuple, dict], tasks: list[str]) -> list[dict[str, Any]]:
    """One row per task and variant: at each length (1x, 2x, 4x), the test loss as a % over WSD
    and over D2Z, mean and sample std over seeds, and in how many seeds it is below."""
    rows = []
    for task in tasks:
        lengths = {f"{k}x": BASE_STEPS[task] * k for k in LENGTHS}
        per_length = {label: list(table[(task, steps)].values()) for label, steps in lengths.items()}
        variants = dict.fromkeys(v for seeds in per_length.values() for seed in seeds for v in seed)
        for variant in variants:
            row: dict[str, Any] = {"task": task, "variant": variant}
            for label, seeds in per_length.items():
                seeds = [s for s in seeds if variant in s]
                row[f"{label} test loss"] = statistics.fmean(s[variant] for s in seeds)
                for baseline in ("WSD", "D2Z"):
                    ratios = [(s[variant] / s[baseline] - 1) * 100 for s in seeds]
                    row[f"{label} vs {baseline} %"] = statistics.fmean(ratios)
                    row[f"{label} vs {baseline} std"] = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
                    row[f"{label} below {baseline}"] = f"{sum(r < 0 for r in ratios)}/{len(ratios)}"
            rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], tasks: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("constant", "WSD", "D2Z", "cosine", "schedule-free", "callback, no arguments", "SMA last 20% (8)",
             "SMA last 40% (8)", "post-hoc EMA 0.05", "select (validation)")  # fmt: skip
    colors = dict(zip(shown, plt.get_cmap("tab10").colors, strict=True))  # one color per variant, every panel
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for task, pair in zip(tasks, axes, strict=True):
        task_lengths = [BASE_STEPS[task] * k for k in LENGTHS]
        for ax, baseline in zip(pair, ("WSD", "D2Z"), strict=True):
            for row in rows:
                if row["task"] != task or row["variant"] not in shown or row["variant"] == baseline:
                    continue
                means = [row[f"{k}x vs {baseline} %"] for k in LENGTHS]
                stds = [row[f"{k}x vs {baseline} std"] for k in LENGTHS]
                merge = row["variant"] not in (*SCHEDULES, "WSD")
                ax.errorbar(task_lengths, means, yerr=stds, marker="o", capsize=3, lw=1.4, color=colors[row["variant"]],
                            ls="-" if merge else "--", label=row["variant"])  # fmt: skip
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(task_lengths, [str(s) for s in task_lengths])
            ax.set(
                xlabel="run length (optimizer steps)",
                ylabel=f"test loss vs {baseline} (%)",
                title=f"{task}: vs {baseline}",
            )
            if task == "gpt":
                ax.set_ylim(-12, 12)
            else:  # losses near zero: ratios of hundreds of percent, on a symmetric log scale
                ax.set_yscale("symlog", linthresh=10)
            ax.grid(alpha=0.3)
        pair[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = RESULTS / "anneal_lengths.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_all(jobs: list[tuple], workers: int) -> list[dict[str, Any]]:
    jobs = sorted(jobs, key=lambda j: -j[1])  # the longest first: the pool ends together
    if workers <= 1:
        return [train(*job) for job in jobs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train, *job) for job in jobs]
        done = []
        for future in futures:
            done.append(future.result())
            r = done[-1]
            print(f"  {r['task']} {r['steps']} {r['schedule']} lr {r['peak']:g} seed {r['seed']}: "
                  f"{ {k: round(v['test'], 4) for k, v in list(r['results'].items())[:3]} } ({r['seconds']:.0f} s)", flush=True)  # fmt: skip
        return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="gpt,digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (one torch thread each)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every task's base length")
    parser.add_argument("--quick", action="store_true", help="1 seed, lengths scaled by 0.2, the grid's ends only")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from results/anneal_lengths.json")
    args = parser.parse_args()
    if args.plot_only:
        import json

        saved = json.loads((RESULTS / "anneal_lengths.json").read_text())
        for task, lengths in saved["lengths"].items():
            BASE_STEPS[task] = lengths["1x"]
        print(f"figure: {plot(saved['rows'], list(saved['lengths']))}")
        return
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    scale, seeds = (0.2, 1) if args.quick else (args.scale, args.seeds)
    for task in tasks:
        BASE_STEPS[task] = max(50, int(BASE_STEPS[task] * scale))
    grid = {t: (LR_GRID[t][0], LR_GRID[t][-1]) if args.quick else LR_GRID[t] for t in tasks}
    started = time.perf_counter()
    sweep = run_all(sweep_jobs(tasks, LENGTHS, grid), args.jobs)
    peaks = best_peaks(sweep)
    print("best peaks:", {f"{t} {s}": p for (t, s), p in peaks.items()}, flush=True)
    runs = sweep + run_all(seed_jobs(peaks, seeds), args.jobs)
    table = collect(runs, peaks)
    rows = summarize(table, tasks)
    columns = ["task", "variant"] + [f"{k}x vs {b} {c}" for k in LENGTHS for b in ("WSD", "D2Z") for c in ("%", "std")]
    extra = {
        "lengths": {task: {f"{k}x": BASE_STEPS[task] * k for k in LENGTHS} for task in tasks},
        "peaks": {f"{t} {s}": p for (t, s), p in peaks.items()},
        "grid": grid,
        "seeds": seeds,
        "per_seed_test_loss": {f"{t} {s}": v for (t, s), v in table.items()},
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    lengths = ", ".join(f"{t} {'/'.join(str(BASE_STEPS[t] * k) for k in LENGTHS)}" for t in tasks)
    report("anneal_lengths", f"Test loss vs WSD and vs D2Z (%, mean and std over {seeds} seeds), each schedule at "
           f"its best peak LR; lengths 1x/2x/4x = {lengths} steps", columns, rows, extra)  # fmt: skip
    print(f"figure: {plot(rows, tasks)}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
