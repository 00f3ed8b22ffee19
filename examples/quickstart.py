"""ckptavg in a plain PyTorch loop: constant-LR training, a rolling window, merged previews.

A small MLP learns a fixed random teacher network from noisy samples with SGD at a constant,
fairly high learning rate, so its weights keep oscillating around the optimum. Every
``--every`` steps the window takes a snapshot; at each evaluation the merged weights (SMA, WMA,
EMA of the window) are evaluated next to the raw weights with ``window.swapped``. At the end the
merged model is written to ``merged.safetensors`` and the disk window is reopened as a crashed
run would.

    python examples/quickstart.py [--steps 3000] [--out runs/quickstart]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ckptavg import CheckpointWindow


def make_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5
    x_val = torch.randn(4096, 32, generator=generator)
    with torch.no_grad():
        y_val = teacher(x_val)
    return teacher, x_val, y_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=50, help="snapshot interval in steps")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and no machine is oversubscribed)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, x_val, y_val = make_data()
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)  # constant LR, no decay
    # Two tiers side by side: the CPU ring for previews, and a crash-safe disk window.
    window = CheckpointWindow(window=args.window)
    disk = CheckpointWindow(window=args.window, storage="disk", dirpath=out / f"window-{time.time_ns()}")

    def val_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(x_val), y_val).item()

    print(
        f"{'step':>6} {'raw':>9} {'sma':>9} {'wma':>9} {'ema':>9}   (validation MSE, {args.window} x {args.every} steps)"
    )
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 32)
        with torch.no_grad():
            y = teacher(x) + 0.5 * torch.randn(32, 1)  # noisy labels keep SGD bouncing
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            window.snapshot(model, step=step)
            disk.snapshot(model, step=step)
        if step % (args.steps // 6) == 0 and len(window) >= 2:
            losses = [val_loss()]
            for method in ("sma", "wma", "ema"):
                with window.swapped(model, method):  # merged weights inside, raw weights after
                    losses.append(val_loss())
            print(f"{step:>6} " + " ".join(f"{v:>9.4f}" for v in losses))

    raw = val_loss()
    window.load_into(model, "sma")
    merged = val_loss()
    save_file(window.merge("sma"), str(out / "merged.safetensors"))
    disk.close()
    reopened = CheckpointWindow.open(disk.dirpath)  # what a restarted job would do
    same = all(
        torch.equal(a, b) for a, b in zip(reopened.merge("sma").values(), window.merge("sma").values(), strict=True)
    )
    print(
        f"\nfinal raw {raw:.4f} -> merged (SMA of steps {window.steps[0]}..{window.steps[-1]}) {merged:.4f}"
        f"  ({100 * (raw - merged) / raw:.1f}% lower)"
    )
    print(f"wrote {out / 'merged.safetensors'}; disk window reopened with steps {reopened.steps}, same merge: {same}")
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
