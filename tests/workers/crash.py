"""Writes disk snapshots forever, until it is killed. Used by test_disk.py's crash test.

Every tensor of the snapshot at step s holds the value s (the int tensor holds s too), so a
reader can check each stored file's content exactly. Reopens the window if one exists, so a test
can kill and restart it repeatedly on the same folder.
"""

import sys
from pathlib import Path

import torch

from ckptavg import CheckpointWindow


def main() -> None:
    dirpath = Path(sys.argv[1])
    if (dirpath / "manifest.json").exists():
        win = CheckpointWindow.open(dirpath)
    else:
        win = CheckpointWindow(window=4, storage="disk", dirpath=dirpath)
    step = win.steps[-1] + 1 if win.steps else 0
    state = {
        "big": torch.zeros(1_000_000),
        "half": torch.zeros(300_000, dtype=torch.bfloat16),
        "count": torch.zeros((), dtype=torch.int64),
    }
    print("ready", flush=True)
    while True:
        for tensor in state.values():
            tensor.fill_(step)
        win.snapshot(state, step=step)
        print(step, flush=True)
        step += 1


if __name__ == "__main__":
    main()
