"""Issue 14 (packaging): the core (the window, merges, recovery, offline tools, the command line)
works without Lightning or torchmetrics; the callback says which extra to install."""

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import HANG_GUARD_S

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoLightning())
    import torch
    import ckptavg
    from ckptavg import CheckpointWindow, SpikeGuard, merge_state_dicts
    from ckptavg.cli import main

    model = torch.nn.Linear(4, 2)
    window = CheckpointWindow(window=2)
    window.snapshot(model, step=1)
    window.snapshot(model, step=2)
    window.load_into(model, "decay", shape="cosine")
    SpikeGuard(window).observe(1, 0.5)
    assert window.correlation().verdict == "average"
    try:
        ckptavg.CheckpointAverager
    except ModuleNotFoundError as err:
        assert "pip install 'ckptavg[lightning]'" in str(err), err
    else:
        raise AssertionError("CheckpointAverager imported without Lightning")
    assert not [m for m in sys.modules if m.startswith(("lightning", "torchmetrics"))]
    print("core without lightning: ok")
    """
)


def test_the_core_needs_no_lightning(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0 and "core without lightning: ok" in done.stdout, done.stderr[-3000:]
