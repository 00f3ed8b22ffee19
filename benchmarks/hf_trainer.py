"""The Hugging Face Trainer with ``CheckpointAveragerCallback``: quality against the Trainer's own
schedules, and the callback's overhead.

    python benchmarks/hf_trainer.py                # 3 seeds, 800 steps; about 10 minutes on 2 cores
    python benchmarks/hf_trainer.py --quick        # 1 seed, 120 steps (the test suite runs this)

A byte-level GPT-2 (built from a config) learns the Python standard library's source (every 10th
file held out), AdamW, the same warm-up for every variant. Per seed, three runs with the same
initialisation and data order: a constant learning rate with the callback (its defaults: a window
of 8 over the last tenth of the run, SMA, recovery on), ``warmup_stable_decay`` with a 20% linear
cooldown, and ``cosine``. Reported: the final validation loss (the Trainer's ``eval_loss``), mean
and sample std over seeds, and each variant against WSD per seed; the callback's restores (a
healthy run must have none). Then the Trainer's training time at the default cadence: no
callback, the callback without previews, and with previews, as ratios against no callback,
interleaved.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402
from models import stdlib_bytes  # noqa: E402

CONTEXT = 128


class Windows(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor, count: int):
        starts = torch.linspace(0, data.numel() - CONTEXT - 1, count).long().tolist()
        self.ids = torch.stack([data[s : s + CONTEXT] for s in starts])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(
    variant: str, seed: int, steps: int, folder: Path, data: tuple[Windows, Windows], **extra: Any
) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ckptavg.hf import CheckpointAveragerCallback

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256, n_positions=CONTEXT, n_embd=96, n_layer=3, n_head=3,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    warmup = max(steps // 20, 1)
    schedules: dict[str, dict[str, Any]] = {
        "constant": {"lr_scheduler_type": "constant_with_warmup"},
        "wsd": {
            "lr_scheduler_type": "warmup_stable_decay",
            "lr_scheduler_kwargs": {"num_decay_steps": steps // 5, "decay_type": "linear"},
        },
        "cosine": {"lr_scheduler_type": "cosine"},
    }
    averager = extra.pop("averager", None)
    args = TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=2e-3, warmup_steps=warmup, weight_decay=0.01, eval_strategy="steps",
        eval_steps=extra.pop("eval_steps", steps // 4), save_strategy="no", logging_steps=max(steps // 10, 1),
        report_to=[], use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
        **schedules[variant], **extra,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data[0],
        eval_dataset=data[1],
        callbacks=[averager] if averager is not None else [],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": seconds, "raw": trainer.evaluate()["eval_loss"]}
    if isinstance(averager, CheckpointAveragerCallback) and averager.final_metrics:
        result["raw"] = averager.final_metrics["raw"]["eval_loss"]
        result["merged"] = averager.final_metrics["merged"]["eval_loss"]
        result["restores"] = sum(e.action == "restored" for e in averager.recovery_events)
    return result


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the overhead runs")
    parser.add_argument("--quick", action="store_true", help="1 seed, at most 120 steps, 1 overhead round")
    options = parser.parse_args()
    if options.quick:
        options.seeds, options.repeats, options.steps = 1, 1, min(options.steps, 120)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from ckptavg.hf import CheckpointAveragerCallback

    train_bytes, val_bytes, _ = stdlib_bytes()
    data = (Windows(train_bytes, 4096), Windows(val_bytes, 256))
    per_seed: dict[str, list[float]] = {
        "constant, last checkpoint": [],
        "constant + callback (merged)": [],
        "wsd": [],
        "cosine": [],
    }
    restores = 0
    with TemporaryDirectory() as tmp:
        for seed in range(options.seeds):
            merged = run(
                "constant", seed, options.steps, Path(tmp) / f"c{seed}", data, averager=CheckpointAveragerCallback()
            )
            per_seed["constant, last checkpoint"].append(merged["raw"])
            per_seed["constant + callback (merged)"].append(merged["merged"])
            restores += merged["restores"]
            per_seed["wsd"].append(run("wsd", seed, options.steps, Path(tmp) / f"w{seed}", data)["raw"])
            per_seed["cosine"].append(run("cosine", seed, options.steps, Path(tmp) / f"k{seed}", data)["raw"])
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in per_seed.items()), flush=True)
        wsd = per_seed["wsd"]
        rows = [
            {
                "variant": name,
                "cooldown steps": "20%" if name == "wsd" else ("0" if "callback" in name else "-"),
                "val loss": mean_std(values),
                "vs WSD": mean_std([(v / w - 1) * 100 for v, w in zip(values, wsd, strict=True)]) + " %",
            }
            for name, values in per_seed.items()
        ]

        overhead_steps = options.steps if options.quick else max(options.steps // 2, 60)
        configurations = {
            "no callback": lambda: None,
            "callback, previews off": lambda: CheckpointAveragerCallback(preview=False),
            "callback, previews on": lambda: CheckpointAveragerCallback(),
        }
        times: dict[str, list[float]] = {name: [] for name in configurations}
        for round_ in range(options.repeats):
            for name, make in configurations.items():
                folder = Path(tmp) / f"o{round_}{len(times[name])}{name[:2]}"
                times[name].append(
                    run("constant", 0, overhead_steps, folder, data, averager=make(), eval_steps=overhead_steps // 4)[
                        "seconds"
                    ]
                )
        base = min(times["no callback"])
        overhead = [
            {"configuration": name, "train() s (min)": min(t), "ratio": min(t) / base} for name, t in times.items()
        ]
    report(
        "hf_trainer",
        f"Trainer runs, {options.seeds} seed(s), {options.steps} steps: final validation loss (restores in healthy runs: {restores})",
        ["variant", "cooldown steps", "val loss", "vs WSD"],
        rows,
        extra={"per_seed": per_seed, "restores": restores, "overhead": overhead, "steps": options.steps},
    )
    report(
        "hf_trainer_overhead",
        f"Trainer overhead, {overhead_steps} steps, evaluation every {overhead_steps // 4}, {options.repeats} interleaved round(s)",
        ["configuration", "train() s (min)", "ratio"],
        overhead,
    )


if __name__ == "__main__":
    main()
