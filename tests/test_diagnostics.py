"""Issue 14: the checkpoint-correlation diagnostic, exact against a float64 reference and
separating the cases that matter on real runs (scikit-learn's digits)."""

import pytest
import torch
from helpers.digits import digits_tensors, train_classifier

from ckptavg import CheckpointWindow


def flat(state):
    return torch.cat([t.double().flatten() for t in state.values() if t.is_floating_point()])


def cosine_matrix(vectors):
    stacked = torch.stack(vectors)
    norms = stacked.norm(dim=1)
    return (stacked @ stacked.T) / (norms[:, None] * norms[None, :])


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_every_figure_matches_a_float64_reference(tmp_path, storage):
    """Products run as fp32 GEMMs summed in fp64: weight cosines to 1e-5; deviation cosines, which
    subtract the mean of nearly equal Gram entries, to 1e-3 (snapshots far apart, as here)."""
    torch.manual_seed(0)
    base = {
        "big": torch.randn(1200, 1000),
        "bias": torch.randn(7),
        "half": torch.randn(300, 5).to(torch.bfloat16),
        "count": torch.tensor(3),
    }
    window = CheckpointWindow(window=5, storage=storage, dirpath=tmp_path / "w" if storage == "disk" else None)
    states = []
    for step in range(1, 6):
        state = {
            k: (v + 0.05 * step * torch.randn_like(v.float()).to(v.dtype)) if v.is_floating_point() else v
            for k, v in base.items()
        }
        window.snapshot(state, step=step * 10)
        states.append({k: v.clone() for k, v in state.items()})
    report = window.correlation()
    vectors = [flat(s) for s in states]
    mean = torch.stack(vectors).mean(0)
    updates = [b - a for a, b in zip(vectors[:-1], vectors[1:], strict=True)]
    assert torch.allclose(torch.tensor(report.weight_cosine, dtype=torch.float64), cosine_matrix(vectors), atol=1e-5)
    assert torch.allclose(
        torch.tensor(report.deviation_cosine, dtype=torch.float64),
        cosine_matrix([v - mean for v in vectors]),
        atol=1e-3,
    )
    expected_updates = [float(cosine_matrix([a, b])[0, 1]) for a, b in zip(updates[:-1], updates[1:], strict=True)]
    assert report.update_cosine == pytest.approx(expected_updates, abs=1e-4)
    distances = max(float((a - b).norm()) for a in vectors for b in vectors)
    assert report.relative_spread == pytest.approx(
        distances / float(torch.stack([v.norm() for v in vectors]).mean()), rel=1e-4
    )
    big = [s["big"].double().flatten() for s in states]
    assert report.per_tensor["big"]["min_weight_cosine"] == pytest.approx(float(cosine_matrix(big).min()), abs=1e-5)
    assert "count" not in report.per_tensor  # integer tensors are not averaged, so not judged
    window.close()


def digits_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


@pytest.fixture(scope="module")
def digits_data():
    return digits_tensors()


def train(model, data, steps, seed=0, blast=(), optimizer=None):
    return train_classifier(model, *data, steps, seed=seed, optimizer=optimizer, blast=blast)


def test_the_verdict_separates_one_run_a_spike_and_separate_models(digits_data):
    model = digits_model(0)
    optimizer = train(model, digits_data, 200)
    one_run = CheckpointWindow(window=8)
    for k in range(8):
        optimizer = train(model, digits_data, 25, seed=k + 1, optimizer=optimizer)
        one_run.snapshot(model, step=200 + 25 * (k + 1))
    healthy = one_run.correlation()
    assert healthy.verdict == "average", healthy.reason

    spiked = CheckpointWindow(window=8)
    for k in range(8):
        optimizer = train(model, digits_data, 25, seed=k + 20, optimizer=optimizer, blast={0, 1, 2} if k == 5 else ())
        spiked.snapshot(model, step=1000 + 25 * (k + 1))
    spike = spiked.correlation()
    assert spike.verdict in ("newest", "do not average"), spike.summary()
    assert spike.newest_correlated <= 3  # the snapshots after the blast, not before

    separate = CheckpointWindow(window=2)
    for seed in (1, 2):
        other = digits_model(seed)
        train(other, digits_data, 300, seed=seed)
        separate.snapshot(other, step=seed)
    apart = separate.correlation()
    assert apart.verdict == "do not average", apart.summary()
    print("\n", healthy.summary(), "\n", spike.summary(), "\n", apart.summary())
