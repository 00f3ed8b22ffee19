"""Snapshot and merge costs of CheckpointWindow for a ~25M-parameter model, one thread, as ratios.

Every ratio divides by a baseline timed alternately with it in the same run on the same bytes.
The reported ratio is of the minimum times (interference on a shared machine only adds time); the
median of the per-pair ratios is printed beside it:

- cpu snapshot (a copy: merges check for NaN/Inf) / a plain ``copy_`` of the model's tensors
  (target <= 1.10); beside it, a per-step EMA update as timm's ModelEmaV3 and AveragedModel do it
  (``_foreach_lerp_``)
- SMA merge of a window of 8 into a reused output / the read floor, summing each stored
  snapshot once (target <= 1.2); and / the physical limit (8 models read, 1 written, at copy_ speed);
  and / the same merge without its NaN/Inf check of each output block (the check's cost)
- a preview, ``swapped(model)`` in and out / merging into a reused output plus the two copies of
  the model it needs: the preview pays no fresh-output cost (target <= 1.1); beside it, a merge
  into a fresh output / into a reused one (the page faults a fresh result costs)
- disk snapshot, time the caller is blocked / ``copy_``                 (target <= 1.5)
- disk merge of windows of 8 and 16: peak extra resident memory / model (target <= 1.5),
  measured in a fresh process that opens the window and merges it

    python benchmarks/window.py                            # ~25M parameters, fp32 and bf16, one thread
    python benchmarks/window.py --params 5e6 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, peak_rss_bytes, report, reset_peak_rss, rss_bytes  # noqa: E402

from ckptavg import CheckpointWindow  # noqa: E402


def transformer_state(params: float, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A GPT-like state dict with about ``params`` parameters: an embedding, per-layer attention and
    MLP matrices, biases and norms (many small tensors beside a few large ones), and a step counter."""
    width = 1024 if params >= 20e6 else 128
    vocab = max(1000, int(params * 0.25 / width))
    per_layer = 12 * width * width + 13 * width
    layers = max(1, round((params - vocab * width) / per_layer))
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    state = {"embed.weight": tensor(vocab, width)}
    for i in range(layers):
        p = f"layers.{i}."
        state |= {
            p + "norm1.weight": tensor(width), p + "norm1.bias": tensor(width),
            p + "attn.qkv.weight": tensor(3 * width, width), p + "attn.qkv.bias": tensor(3 * width),
            p + "attn.out.weight": tensor(width, width), p + "attn.out.bias": tensor(width),
            p + "norm2.weight": tensor(width), p + "norm2.bias": tensor(width),
            p + "mlp.up.weight": tensor(4 * width, width), p + "mlp.up.bias": tensor(4 * width),
            p + "mlp.down.weight": tensor(width, 4 * width), p + "mlp.down.bias": tensor(width),
        }  # fmt: skip
    state["norm.weight"] = tensor(width)
    state["step"] = torch.tensor(0, dtype=torch.int64)
    return state


def row(dtype: str, measure: str, timing: tuple[float, float, float, float] | float, target: str) -> dict:
    """A table row from :func:`interleaved`'s result (or a plain ratio)."""
    if isinstance(timing, tuple):
        ratio, median_ratio, t_c, t_b = timing
        return {"dtype": dtype, "measure": measure, "ratio": ratio, "median pair ratio": median_ratio, "target": target,
                "ms": t_c * 1e3, "baseline ms": t_b * 1e3}  # fmt: skip
    return {"dtype": dtype, "measure": measure, "ratio": timing, "median pair ratio": float("nan"), "target": target,
            "ms": float("nan"), "baseline ms": float("nan")}  # fmt: skip


def measure_disk_merge(dirpath: str) -> None:
    """Child process: open a disk window, merge it, print the peak extra RSS as JSON."""
    win = CheckpointWindow.open(dirpath)
    gc.collect()
    baseline = rss_bytes()
    reset_peak_rss()
    merged = win.merge("sma")
    peak = peak_rss_bytes() - baseline
    model_bytes = sum(t.numel() * t.element_size() for t in merged.values())
    print(json.dumps({"peak_extra": peak, "model_bytes": model_bytes}))


def bench_dtype(dtype: torch.dtype, params: float, repeats: int, workdir: Path) -> list[dict]:
    state = transformer_state(params, dtype)
    numel = sum(t.numel() for t in state.values())
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    name = str(dtype).replace("torch.", "")
    print(f"{name}: {len(state)} tensors, {numel / 1e6:.1f}M elements, {model_bytes / 2**20:.0f} MiB", flush=True)
    flat_src = torch.empty(numel, dtype=dtype).normal_()
    flat_dst = torch.empty_like(flat_src)
    buffers = {k: torch.empty_like(v) for k, v in state.items()}

    def copy() -> None:
        """The plain copy_ of the same bytes: each of the model's tensors into a preallocated buffer."""
        for k, v in state.items():
            buffers[k].copy_(v)

    def flat_copy() -> None:
        """A single memcpy-speed copy_ of one contiguous buffer of the model's size."""
        flat_dst.copy_(flat_src)

    rows = []

    # cpu snapshot in steady state: window full, every ring row already touched.
    win = CheckpointWindow(window=8)
    for step in range(10):
        win.snapshot(state, step=step)
    steps = iter(range(10, 1_000_000))
    rows.append(
        row(
            name,
            "cpu snapshot / copy_ of the tensors",
            interleaved(lambda: win.snapshot(state, step=next(steps)), copy, repeats),
            "<= 1.10",
        )
    )
    rows.append(
        row(
            name,
            "cpu snapshot / one flat copy_",
            interleaved(lambda: win.snapshot(state, step=next(steps)), flat_copy, repeats),
            "info",
        )
    )
    floating = [v for v in state.values() if v.is_floating_point()]
    ema = [v.clone() for v in floating]
    rows.append(row(name, "per-step EMA update (_foreach_lerp_, timm / AveragedModel) / copy_",
                    interleaved(lambda: torch._foreach_lerp_(ema, floating, 0.001), copy, repeats), "info (peers)"))  # fmt: skip
    ema.clear()

    # SMA merge of 8 against the read floor: each stored snapshot's bytes read once (summed).
    stored = [torch.empty_like(flat_src).normal_() for _ in range(8)]

    def read_floor() -> None:
        for snapshot in stored:
            snapshot.sum()

    out = win.merge("sma")
    merge_timing = interleaved(lambda: win.merge("sma", out=out), read_floor, repeats)
    rows.append(row(name, "sma merge(8) into a reused output / read floor", merge_timing, "<= 1.2"))
    t_merge = merge_timing[2]
    t_flat = interleaved(flat_copy, flat_copy, repeats)[2]
    t_limit = t_flat * (8 + 1) / 2  # 8 models read and 1 written; a copy_ reads 1 and writes 1
    rows.append(
        row(
            name,
            "sma merge(8) / physical limit (9 model transfers at copy_ speed)",
            (t_merge / t_limit, float("nan"), t_merge, t_limit),
            "info",
        )
    )
    import ckptavg.kernels as kernels

    def merge_unchecked() -> None:
        check, kernels.is_finite_block = kernels.is_finite_block, lambda values: True
        try:
            win.merge("sma", out=out)
        finally:
            kernels.is_finite_block = check

    rows.append(
        row(
            name,
            "sma merge(8) / the same merge without its NaN/Inf check (the check's cost)",
            interleaved(lambda: win.merge("sma", out=out), merge_unchecked, repeats),
            "info",
        )
    )
    rows.append(
        row(
            name,
            "sma merge(8), fresh output / reused output",
            interleaved(lambda: win.merge("sma"), lambda: win.merge("sma", out=out), max(2, repeats // 2)),
            "info",
        )
    )

    # A preview: merged weights swapped into a model and its own weights put back.
    model = {k: v.clone() for k, v in state.items()}
    holder = torch.nn.Module()
    for k, v in model.items():
        holder.register_buffer(k.replace(".", "_"), v)
    named = {k: getattr(holder, k.replace(".", "_")) for k in model}
    backup = {k: torch.empty_like(v) for k, v in model.items()}

    class Wrapped(torch.nn.Module):
        def state_dict(self, *args, **kwargs):  # the window reads and writes these tensors by name
            return dict(named)

    target = Wrapped()

    def preview() -> None:
        with win.swapped(target, "sma"):
            pass

    def preview_floor() -> None:
        for k, v in named.items():
            backup[k].copy_(v)
        win.merge("sma", out=out)
        for k, v in named.items():
            v.copy_(backup[k])
        for k, v in named.items():
            v.copy_(out[k])

    rows.append(
        row(
            name,
            "preview: swapped() in and out / reused-output merge + 2 model copies",
            interleaved(preview, preview_floor, repeats),
            "<= 1.1",
        )
    )
    release = [win, out, stored, model, backup]  # the next stage measures memory: free these first
    release.clear()
    gc.collect()

    # disk tier: blocking time of snapshot(), and merge memory in a fresh process.
    for window in (8, 16):
        dirpath = workdir / f"{name}-{window}"
        disk = CheckpointWindow(window=window, storage="disk", dirpath=dirpath)
        for step in range(window):
            disk.snapshot(state, step=step)
        if window == 8:
            ratios, times, bases = [], [], []
            for step in range(window, window + repeats + 1):
                disk.flush()  # the previous write finishes first: only snapshot()'s own hold counts
                start = time.perf_counter()
                copy()
                bases.append(time.perf_counter() - start)
                start = time.perf_counter()
                disk.snapshot(state, step=step)
                times.append(time.perf_counter() - start)
                ratios.append(times[-1] / bases[-1])
            timing = (min(times[1:]) / min(bases[1:]), statistics.median(ratios[1:]), min(times[1:]), min(bases[1:]))
            rows.append(row(name, "disk snapshot blocking / copy_ of the tensors", timing, "<= 1.5"))
        disk.close()
        child = subprocess.run(
            [sys.executable, __file__, "--measure-disk-merge", str(dirpath)], capture_output=True, text=True, check=True
        )
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(
            row(
                name,
                f"disk merge({window}) peak extra RSS / model",
                measured["peak_extra"] / measured["model_bytes"],
                "<= 1.5",
            )
        )
        shutil.rmtree(dirpath)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=25e6, help="model size in parameters (default 25M)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workdir", default=None, help="folder for the disk tier (default: a temporary one)")
    parser.add_argument("--measure-disk-merge", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_disk_merge:
        measure_disk_merge(args.measure_disk_merge)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckptavg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for dtype_name in args.dtypes.split(","):
            rows += bench_dtype(getattr(torch, dtype_name), args.params, args.repeats, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(
        "window",
        f"CheckpointWindow costs, ~{args.params / 1e6:.0f}M parameters, {torch.get_num_threads()} threads "
        f"(ratio of minimum times over {args.repeats} interleaved pairs; ms are minima)",
        ["dtype", "measure", "ratio", "median pair ratio", "target", "ms", "baseline ms"],
        rows,
        {"params": args.params, "repeats": args.repeats},
    )


if __name__ == "__main__":
    main()
