"""The README's demo, the plain-loop example and the benchmarks run end to end (small sizes)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

ROOT = Path(__file__).parents[1]


def run(tmp_path: Path, *args: str) -> str:
    env = os.environ | {"CKPTAVG_BENCH_RESULTS": str(tmp_path / "results"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_demo_recovers_the_spike_and_writes_its_outputs(tmp_path):
    out = run(tmp_path, str(ROOT / "examples" / "demo.py"), "--steps", "80", "--out", str(tmp_path / "demo"))
    assert re.search(r"loss spikes recovered \(at steps\)\s+\[44\]", out), out[-2000:]
    assert re.search(r"without recovery: NaN losses\s+(\d+) of 40 steps", out), out[-2000:]  # the same spike, measured
    assert int(re.search(r"without recovery: NaN losses\s+(\d+) of", out).group(1)) >= 35
    assert (tmp_path / "demo" / "demo_curves.png").stat().st_size > 10_000
    assert list((tmp_path / "demo").glob("logs/version_0/ckptavg/merged.safetensors"))


def test_plain_loop_example(tmp_path):
    out = run(tmp_path, str(ROOT / "examples" / "quickstart.py"), "--steps", "600", "--out", str(tmp_path / "qs"))
    assert "same merge: True" in out


@pytest.mark.parametrize(
    "script, args",
    [
        ("window.py", ["--params", "3e5", "--repeats", "1", "--dtypes", "float32"]),
        ("recovery.py", ["--quick", "--tasks", "digits-b32"]),
        ("anneal.py", ["--tasks", "digits", "--seeds", "2", "--steps", "60", "--evals", "3"]),
        ("distributed.py", ["--params", "3e5", "--repeats", "1"]),
        ("aggregate.py", ["--seeds", "1"]),
        ("hf_trainer.py", ["--quick", "--steps", "16"]),
        ("distributed_merges.py", ["--quick", "--steps", "20", "--variants", "ddp,diloco-10,streaming-4,sparta-0.5%"]),
    ],
)
def test_benchmarks_run(tmp_path, script, args):
    run(tmp_path, str(ROOT / "benchmarks" / script), *args)
    assert (tmp_path / "results" / script.replace(".py", ".json")).exists()


def test_distillation_example_with_lightning(tmp_path):
    out = run(tmp_path, str(ROOT / "examples" / "distill_lightning.py"), "--steps", "80")
    assert re.search(r"distilled student\s+accuracy 0\.\d+", out), out[-2000:]


def test_hugging_face_trainer_example(tmp_path):
    out = run(tmp_path, str(ROOT / "examples" / "hf_trainer.py"), "--steps", "24", "--out", str(tmp_path / "hf"))
    assert re.search(r"eval_merged_loss at step 24: \d", out), out[-2000:]
    assert "reloaded from" in out and (tmp_path / "hf" / "merged" / "config.json").is_file()
