"""Issue 14: prediction ensembles (of a window's snapshots or of separate models) and
distillation into one model, on scikit-learn's digits."""

import copy

import pytest
import torch
from helpers.digits import digits_tensors, train_classifier

from ckptavg import CheckpointWindow, Ensemble, distill, merge_state_dicts
from ckptavg.ensembles import ensemble


def with_state(model, state):
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin.eval()


class Branchy(torch.nn.Module):
    """Data-dependent control flow: vmap cannot batch it, so the ensemble loops."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) if float(self.linear.weight.detach().sum()) > 0 else -self.linear(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
        ),
        Branchy,
    ],
)
def test_the_ensemble_averages_each_members_output(make):
    torch.manual_seed(0)
    members = [make() for _ in range(3)]
    for m in members:  # BatchNorm statistics that differ per member
        m.train()
        m(torch.randn(16, 4) * (1 + torch.rand(1)))
    states = [m.state_dict() for m in members]
    window = CheckpointWindow(window=3)
    for step, state in enumerate(states, start=1):
        window.snapshot(state, step=step)
    x = torch.randn(5, 4)
    with torch.no_grad():
        outputs = torch.stack([with_state(members[0], s)(x) for s in states])
        for both in (ensemble(members[0], states).eval(), Ensemble.from_window(window, members[0]).eval()):
            assert torch.allclose(both(x), outputs.mean(0), atol=1e-6)
            assert both.vectorized is (make is not Branchy)
        probs = ensemble(members[0], states, average="probs").eval()(x)
        assert torch.allclose(probs.exp(), torch.softmax(outputs, -1).mean(0), atol=1e-6)


def test_bad_states_are_refused_naming_the_tensor():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"tensor 'weight' has shapes"):
        ensemble(a, [a.state_dict(), b.state_dict()])
    with pytest.raises(ValueError, match=r"states\[1\] has no 'bias'"):
        ensemble(a, [a.state_dict(), {"weight": a.weight}])
    with pytest.raises(ValueError, match="average must be 'logits' or 'probs'"):
        ensemble(a, [a.state_dict()], average="mean")


@pytest.fixture(scope="module")
def two_separate_models():
    x, y = digits_tensors(shuffle_seed=0)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        train_classifier(model, x[:1300], y[:1300], 300, lr=1e-2, batch=64, seed=seed)
        models.append(model.eval())
    train = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 1300, 100)]
    return models, train, (x[1300:], y[1300:])


def accuracy(model, data):
    with torch.no_grad():
        return float((model.eval()(data[0]).argmax(-1) == data[1]).float().mean())


def test_distilling_an_ensemble_of_separate_models_beats_their_average(two_separate_models):
    models, train, test = two_separate_models
    states = [m.state_dict() for m in models]
    teacher = ensemble(models[0], states, average="probs")
    averaged = with_state(models[0], merge_state_dicts(states))
    torch.manual_seed(3)
    student = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    losses = distill(student, teacher, train, steps=300, temperature=2.0, lr=1e-2, progress=False)
    assert len(losses) == 300 and losses[-1] < losses[0]
    alone = [accuracy(m, test) for m in models]
    scores = {
        "ensemble": accuracy(teacher, test),
        "average": accuracy(averaged, test),
        "student": accuracy(student, test),
    }
    assert scores["average"] < min(alone) - 0.05  # averaging separate models fails ...
    assert scores["ensemble"] >= max(alone) - 0.01  # ... an ensemble does not ...
    assert scores["student"] > scores["average"] + 0.05 and scores["student"] >= min(alone) - 0.03, (
        alone,
        scores,
    )  # ... nor its student


def test_distill_refuses_bad_arguments(two_separate_models):
    models, train, _ = two_separate_models
    student = copy.deepcopy(models[0])
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        distill(student, models[1], train, temperature=0)
    with pytest.raises(ValueError, match="hard_weight must be in"):
        distill(student, models[1], train, hard_weight=2)
    with pytest.raises(ValueError, match="the batches ran out"):
        distill(student, models[1], [], steps=3, progress=False)
    with pytest.raises(ValueError, match="the batches ran out"):
        distill(student, models[1], iter(train[:1]), steps=3, progress=False)
