"""Aggregating models: merge, NP Merge, prediction ensemble or distilled student?

Two cases on scikit-learn's digits (1100 training images, 300 held out for NP Merge, 397 to
report), an MLP (64-128-10), AdamW at a constant learning rate:

- **separate**: two models trained from different initialisations (and data orders);
- **one run**: two snapshots of one run, 100 steps apart.

For each: each model alone, the plain average of the weights, NP Merge (learned on the held-out
300), the prediction ensemble (mean of probabilities), and a student of the ensemble's size of
one model, distilled from it on the training images. Accuracy and loss are on the report split,
mean and spread over ``--seeds``; the cost is parameters and inference time against one model.

    python benchmarks/aggregate.py            # 3 seeds, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, report  # noqa: E402

from ckptavg import distill, ensemble, merge_state_dicts, np_merge  # noqa: E402


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def data() -> tuple[
    tuple[torch.Tensor, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]
]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = torch.tensor(x[order] / 16.0, dtype=torch.float32), torch.tensor(y[order])
    held = [(x[1100 + i : 1200 + i], y[1100 + i : 1200 + i]) for i in range(0, 300, 100)]
    return (x[:1100], y[:1100]), held, (x[1400:], y[1400:])


def train(model: torch.nn.Module, train_set, steps: int, seed: int, snapshot_at: int | None = None):
    x, y = train_set
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    snapshot = None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == snapshot_at:
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return snapshot


@torch.no_grad()
def score(model: torch.nn.Module, data) -> tuple[float, float]:
    model.eval()
    out = model(data[0])
    return float((out.argmax(-1) == data[1]).float().mean()), float(torch.nn.functional.cross_entropy(out, data[1]))


def loaded(state) -> torch.nn.Module:
    model = mlp()
    model.load_state_dict(state)
    return model.eval()


def one_case(case: str, seed: int, train_set, held, test) -> dict[str, tuple[float, float]]:
    torch.manual_seed(seed)
    first = mlp()
    if case == "separate":
        train(first, train_set, 800, seed)
        torch.manual_seed(seed + 100)
        second = mlp()
        train(second, train_set, 800, seed + 100)
        states = [first.state_dict(), second.state_dict()]
    else:
        early = train(first, train_set, 800, seed, snapshot_at=700)
        states = [early, first.state_dict()]
    teacher = ensemble(mlp(), states, average="probs")
    torch.manual_seed(seed + 200)
    student = mlp()
    distill(
        student,
        teacher,
        [(train_set[0][i : i + 64], train_set[1][i : i + 64]) for i in range(0, 1100, 64)],
        steps=800,
        lr=3e-3,
        progress=False,
    )
    return {
        "model A alone": score(loaded(states[0]), test),
        "model B alone": score(loaded(states[1]), test),
        "plain average (SMA)": score(loaded(merge_state_dicts(states)), test),
        "NP Merge (held-out 300)": score(
            loaded(np_merge(mlp(), states, torch.nn.functional.cross_entropy, held, steps=200)), test
        ),
        "ensemble (mean probabilities)": score(teacher, test),
        "student distilled from the ensemble": score(student, test),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_set, held, test = data()
    rows = []
    for case in ("separate", "one run"):
        results = [one_case(case, seed, train_set, held, test) for seed in range(args.seeds)]
        for variant in results[0]:
            accs = [r[variant][0] for r in results]
            losses = [r[variant][1] for r in results]
            rows.append({"case": case, "variant": variant, "accuracy": statistics.fmean(accs), "acc std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "loss": statistics.fmean(losses)})  # fmt: skip
    # Cost: parameters and inference time of the ensemble against one model, on the report split.
    model = mlp().eval()
    both = ensemble(model, [model.state_dict(), mlp().state_dict()], average="probs").eval()
    with torch.no_grad():
        ratio = interleaved(lambda: both(test[0]), lambda: model(test[0]), repeats=21)[0]
    params = sum(p.numel() for p in model.parameters())
    for row in rows:
        ensemble_row = row["variant"].startswith("ensemble")
        row["parameters"] = 2 * params if ensemble_row else params
        row["inference time / one model"] = ratio if ensemble_row else 1.0
    report("aggregate", f"Aggregating two digits MLPs, {args.seeds} seeds (mean; accuracy std)",
           ["case", "variant", "accuracy", "acc std", "loss", "parameters", "inference time / one model"], rows)  # fmt: skip


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
