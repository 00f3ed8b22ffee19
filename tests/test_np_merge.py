"""Issue 13: NP Merge of separately trained models, on scikit-learn's digits: two MLPs trained
from different initialisations, whose plain average fails."""

import copy

import pytest
import torch
from helpers.digits import digits_tensors, train_classifier

from ckptavg import merge_state_dicts, np_merge


def train(seed, x, y, steps=300):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    train_classifier(model, x, y, steps, lr=1e-2, batch=64, seed=seed)
    return model


@pytest.fixture(scope="module")
def two_models():
    x, y = digits_tensors(shuffle_seed=0)
    train_set, held_out, test = (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])
    models = [train(seed, *train_set) for seed in (1, 2, 3)]
    return models, [(held_out[0][i : i + 100], held_out[1][i : i + 100]) for i in range(0, 300, 100)], test


def accuracy(model, state, data):
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    with torch.no_grad():
        return float((twin(data[0]).argmax(1) == data[1]).float().mean())


def test_np_merge_recovers_what_a_plain_average_of_separate_models_loses(two_models):
    models, held_out, test = two_models
    a, b = (m.state_dict() for m in models[:2])
    alone = [accuracy(models[0], s, test) for s in (a, b)]
    average = accuracy(models[0], merge_state_dicts([a, b]), test)
    merged = np_merge(models[0], [a, b], torch.nn.functional.cross_entropy, held_out, steps=300, lr=0.05)
    learned = accuracy(models[0], merged, test)
    assert min(alone) > 0.9 and average < min(alone) - 0.05  # the plain average fails here
    assert learned > average + 0.05 and learned >= min(alone) - 0.02, (alone, average, learned)
    per_tensor = np_merge(
        models[0], [a, b], torch.nn.functional.cross_entropy, held_out, steps=300, granularity="tensor"
    )
    assert accuracy(models[0], per_tensor, test) > average


def test_np_merge_starts_from_the_plain_average_and_merges_more_models_in_turn(two_models):
    models, held_out, _ = two_models
    states = [m.state_dict() for m in models]
    loss = torch.nn.functional.cross_entropy
    untrained = np_merge(models[0], states[:2], loss, held_out, steps=0)
    reference = {k: (states[0][k].double() + states[1][k].double()) / 2 for k in states[0]}
    assert all(torch.allclose(untrained[k].double(), reference[k], atol=1e-7) for k in reference)
    three = np_merge(models[0], states, loss, held_out, steps=0)  # ((A, B) / 2 + C) / 2
    assert all(
        torch.allclose(three[k].double(), (reference[k] + states[2][k].double()) / 2, atol=1e-7) for k in reference
    )
    before = copy.deepcopy(models[0].state_dict())
    np_merge(models[0], states, loss, held_out, steps=3)
    assert all(torch.equal(v, before[k]) for k, v in models[0].state_dict().items())


def test_np_merge_refuses_mismatched_or_bad_states(two_models):
    models, held_out, _ = two_models
    a = models[0].state_dict()
    loss = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="at least two state dicts"):
        np_merge(models[0], [a], loss, held_out)
    with pytest.raises(ValueError, match=r"states\[1\] does not match the model: missing \['2.bias'\]"):
        np_merge(models[0], [a, {k: v for k, v in a.items() if k != "2.bias"}], loss, held_out)
    with pytest.raises(ValueError, match=r"states\[1\]\['0.weight'\] has shape \(32, 63\)"):
        np_merge(models[0], [a, {**a, "0.weight": torch.zeros(32, 63)}], loss, held_out)
    with pytest.raises(ValueError, match=r"states\[1\]\['0.bias'\] holds NaN"):
        np_merge(models[0], [a, {**a, "0.bias": torch.full((32,), float("nan"))}], loss, held_out)
    with pytest.raises(ValueError, match="granularity must be 'element' or 'tensor'"):
        np_merge(models[0], [a, a], loss, held_out, granularity="layer")
