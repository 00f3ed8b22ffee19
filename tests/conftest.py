from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def reference_merge(
    snapshots: list[dict[str, torch.Tensor]], method: str | list[float], alpha: float = 0.2
) -> dict[str, np.ndarray]:
    """An independent float64 NumPy merge. EMA runs PMA's recursion directly on the tensors
    instead of using precomputed coefficients, so it checks the coefficient formulas too."""
    arrays = [
        {k: v.double().numpy() if v.dtype.is_floating_point else v.numpy() for k, v in s.items()} for s in snapshots
    ]
    n = len(arrays)
    out = {}
    for key in arrays[0]:
        if not snapshots[-1][key].dtype.is_floating_point:
            out[key] = arrays[-1][key]
            continue
        if method == "ema":
            acc = arrays[0][key].copy()
            for a in arrays[1:]:
                acc = alpha * a[key] + (1 - alpha) * acc
        else:
            if method == "sma":
                w = np.full(n, 1.0 / n)
            elif method == "wma":
                w = np.arange(1, n + 1, dtype=np.float64)
                w /= w.sum()
            else:
                w = np.asarray(method, dtype=np.float64)
                w /= w.sum()
            acc = sum(wi * a[key] for wi, a in zip(w, arrays, strict=True))
        out[key] = acc
    return out


def assert_close_to_reference(merged: dict[str, torch.Tensor], reference: dict[str, np.ndarray]) -> None:
    """fp64 to ~1e-12; fp32 to fp32 rounding; bf16/fp16 within one ulp of the exact value (the
    fp32 accumulation loses nothing before the single final cast)."""
    assert sorted(merged) == sorted(reference)
    for key, ref in reference.items():
        got = merged[key]
        if not got.dtype.is_floating_point:
            np.testing.assert_array_equal(got.numpy(), ref, err_msg=key)
            continue
        value = got.double().numpy()
        if got.dtype == torch.float64:
            np.testing.assert_allclose(value, ref, rtol=1e-12, atol=1e-12, err_msg=key)
        elif got.dtype == torch.float32:
            np.testing.assert_allclose(value, ref, rtol=1e-6, atol=1e-6, err_msg=key)
        else:
            eps = torch.finfo(got.dtype).eps  # one ulp at 1.0; scale by the magnitude
            tolerance = eps * np.maximum(np.abs(ref), 2.0**-6) + 1e-30
            assert np.all(np.abs(value - ref) <= tolerance), f"{key}: max error {np.max(np.abs(value - ref))}"


class TinyNet(torch.nn.Module):
    """Linear + BatchNorm (with its integer num_batches_tracked) + a bias-free layer."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, width)
        self.bn = torch.nn.BatchNorm1d(width)
        self.fc2 = torch.nn.Linear(width, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def perturbed_states(
    model: torch.nn.Module, count: int, seed: int = 0, dtype: torch.dtype | None = None
) -> list[dict[str, torch.Tensor]]:
    """``count`` training-like states: weights drift, BN statistics and its counter advance."""
    generator = torch.Generator().manual_seed(seed)
    if dtype is not None:
        model = model.to(dtype)
    states = []
    for _ in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.1)
            model.train()
            model(torch.randn(32, 8, generator=generator).to(next(model.parameters()).dtype))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


TESTS = Path(__file__).parent

# Subprocess tests bound their work (steps, sizes), not their time: this limit only turns a hang
# into a failure, far above what a loaded 2-core machine needs (CI itself stops at 90 minutes).
HANG_GUARD_S = 1800


def run_ranks(worker: str, out: Path, *args: str, torchrun: bool = False) -> list[dict]:
    """Run a two-process worker script in real subprocesses (``torch.distributed.run`` for plain
    workers; Lightning workers launch their second process themselves) and load what each rank
    saved as ``out/rank<r>.pt``."""
    env = os.environ | {"PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else []
    command = [sys.executable, *launcher, str(TESTS / worker), str(out), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


# Test workers are scripts: pytest must never import them (they would run with its arguments).
collect_ignore_glob = ["workers/*"]
