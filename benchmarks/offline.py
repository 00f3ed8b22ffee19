"""``ckptavg merge`` against ``mergekit-yaml`` on the same config: time and peak resident memory.

    python benchmarks/offline.py                      # GPT-2 shaped models of ~100M and ~500M parameters
    python benchmarks/offline.py --sizes 100m --quick # one size, one repeat

Three fine-tunes and their base are built locally (random weights, no download) as Hugging Face
folders, in float32 and in bfloat16, and merged with ``linear`` and ``ties`` (density 0.5) by
both tools from one mergekit YAML file (``ckptavg merge --config``). Each merge runs in its own
process; its peak resident memory is read from ``getrusage`` in a wrapper process, minus the
resident memory of a process that only imports the tool (the interpreter and torch). Both tools
run on one thread (``OMP_NUM_THREADS=1``; mergekit with ``--lazy-unpickle`` off by default,
``--out-shard-size`` large). The outputs are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import report  # noqa: E402

SIZES = {"100m": (768, 12), "500m": (1280, 24)}  # GPT-2 shaped: (width, layers)
WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "code = subprocess.run(sys.argv[1:]).returncode; elapsed = time.perf_counter() - t; "
    "print(elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, code)"
)


def build(root: Path, width: int, layers: int, dtype: torch.dtype) -> tuple[Path, list[Path], int, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=width, n_layer=layers, n_head=width // 64, vocab_size=50257, n_positions=1024)
    base = GPT2LMHeadModel(config).to(dtype)
    base.save_pretrained(root / "base", max_shard_size="100GB")
    numel = sum(p.numel() for p in base.parameters())
    largest = max(p.numel() * p.element_size() for p in base.parameters())
    folders = []
    state = base.state_dict()
    for i in range(3):
        model = GPT2LMHeadModel(config).to(dtype)
        model.load_state_dict(state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"ft{i}", max_shard_size="100GB")
        folders.append(root / f"ft{i}")
        del model
    del base
    return root / "base", folders, numel, largest


def measure(command: list[str]) -> tuple[float, int]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True, check=True)
    seconds, peak, code = out.stdout.strip().splitlines()[-1].split()
    if code != "0":
        raise RuntimeError(f"{command[:3]} failed with exit code {code}")
    return float(seconds), int(peak)


def idle(module: str) -> int:
    return measure([sys.executable, "-c", f"import {module}"])[1]


def compare(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    files = sorted(a.glob("*.safetensors"))
    theirs = {}
    for f in sorted(b.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            theirs.update({k: (f, k) for k in h.keys()})
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k not in theirs:
                    continue
                with safe_open(str(theirs[k][0]), "pt") as g:
                    worst = max(worst, float((h.get_tensor(k).double() - g.get_tensor(k).double()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100m,500m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default="linear,ties")
    parser.add_argument("--quick", action="store_true", help="the smallest size only, float32")
    options = parser.parse_args()
    sizes = ["100m"] if options.quick else options.sizes.split(",")
    dtypes = ["float32"] if options.quick else options.dtypes.split(",")
    mergekit = shutil.which("mergekit-yaml")
    base_ckptavg, base_mergekit = idle("ckptavg.cli"), idle("mergekit.merge") if mergekit else 0
    rows: list[dict[str, Any]] = []
    for size in sizes:
        width, layers = SIZES[size]
        for dtype_name in dtypes:
            with TemporaryDirectory() as tmp:
                root = Path(tmp)
                base, fts, numel, largest = build(root, width, layers, getattr(torch, dtype_name))
                for method in options.methods.split(","):
                    config = {
                        "merge_method": method,
                        "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts],
                        "dtype": dtype_name,
                        **({"base_model": str(base), "parameters": {"density": 0.5}} if method == "ties" else {}),
                    }
                    (root / "merge.yml").write_text(json.dumps(config))  # JSON is YAML
                    ours_s, ours_peak = measure(
                        [sys.executable, "-m", "ckptavg", "merge", "--config", str(root / "merge.yml"), "-o", str(root / "ours"), "-q", "--force"]
                    )  # fmt: skip
                    row: dict[str, Any] = {
                        "model": f"{numel / 1e6:.0f}M {dtype_name}",
                        "method": method,
                        "ckptavg s": round(ours_s, 1),
                        "ckptavg MiB": round((ours_peak - base_ckptavg) / 2**20),
                        "bound MiB": round(largest * (len(fts) + (method == "ties") + 2) / 2**20),
                    }
                    if mergekit:
                        theirs_s, theirs_peak = measure(
                            [mergekit, str(root / "merge.yml"), str(root / "theirs"), "--out-shard-size", "100B", "--no-copy-tokenizer", "--quiet", "-j", "1"]
                        )  # fmt: skip
                        row |= {
                            "mergekit s": round(theirs_s, 1),
                            "mergekit MiB": round((theirs_peak - base_mergekit) / 2**20),
                            "time ratio": round(ours_s / theirs_s, 2),
                            "max abs diff": f"{compare(root / 'ours', root / 'theirs'):.2g}",
                        }
                        shutil.rmtree(root / "theirs")
                    shutil.rmtree(root / "ours")
                    rows.append(row)
                    print(row, flush=True)
    columns = [
        "model",
        "method",
        "ckptavg s",
        "mergekit s",
        "time ratio",
        "ckptavg MiB",
        "mergekit MiB",
        "bound MiB",
        "max abs diff",
    ]
    report("offline", "ckptavg merge vs mergekit-yaml (one thread; memory above an idle interpreter)", columns, rows)


if __name__ == "__main__":
    main()
