"""Issue 13: merges chosen on held-out data (select, greedy soup), on a real task: scikit-learn's
digits, an MLP trained at a constant learning rate, a window of its snapshots."""

import copy

import pytest
import torch

from ckptavg import CheckpointWindow, coefficients, evaluator, merge_state_dicts


@pytest.fixture(scope="module")
def digits_window():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    window, states = CheckpointWindow(window=8), {}
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 61):
        idx = torch.randint(0, 1437, (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 6 == 0:
            window.snapshot(model, step=step)
            states[step] = copy.deepcopy(model.state_dict())
    held_out = [(x[1437:], y[1437:])]
    return model, window, states, held_out


def independent_loss(model, state, held_out):
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(twin(held_out[0][0]), held_out[0][1]))


def test_evaluator_scores_merged_weights_without_touching_the_model(digits_window):
    model, window, states, held_out = digits_window
    before = copy.deepcopy(model.state_dict())
    evaluate = evaluator(model, torch.nn.functional.cross_entropy, held_out)
    merged = window.merge("sma")
    assert evaluate(merged) == pytest.approx(independent_loss(model, merged, held_out), rel=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_select_returns_the_best_candidate_and_every_score(digits_window):
    model, window, states, held_out = digits_window
    evaluate = evaluator(model, torch.nn.functional.cross_entropy, held_out)
    best, table = window.select(evaluate)
    names = [row["name"] for row in table]
    assert names[:2] == ["newest", "sma-newest-2"] and {"wma", "ema", "decay-cosine", "decay-1-sqrt"} <= set(names)
    for row in table:  # every score is what an independent evaluation of that merge gives
        merged = merge_state_dicts([states[s] for s in window.steps], weights=row["weights"])
        assert row["score"] == pytest.approx(independent_loss(model, merged, held_out), rel=1e-5), row["name"]
    assert best == min(table, key=lambda row: row["score"])["weights"]
    custom_best, custom = window.select(evaluate, {"sma": "sma", "last-two": [0] * 6 + [1, 1], "cos": ("decay", {"shape": "cosine"})})
    assert [row["name"] for row in custom] == ["sma", "last-two", "cos"]
    assert custom[1]["weights"] == [0.0] * 6 + [0.5, 0.5]


def test_greedy_soup_follows_the_greedy_rule(digits_window):
    model, window, states, held_out = digits_window
    evaluate = evaluator(model, torch.nn.functional.cross_entropy, held_out)
    steps = window.steps

    def uniform_loss(members):
        return independent_loss(model, merge_state_dicts([states[steps[i]] for i in members]), held_out)

    # The rule, written out independently: best single snapshot first, then add in order of
    # individual score when the uniform average strictly improves.
    alone = [uniform_loss([i]) for i in range(len(steps))]
    order = sorted(range(len(steps)), key=lambda i: (alone[i], -i))
    soup, best = [order[0]], alone[order[0]]
    for candidate in order[1:]:
        trial = uniform_loss(soup + [candidate])
        if trial < best - 1e-7:
            soup, best = soup + [candidate], trial
    weights = window.weights("greedy_soup", evaluate=evaluate)
    assert [i for i, w in enumerate(weights) if w > 0] == sorted(soup)
    assert weights == pytest.approx([1 / len(soup) if i in soup else 0.0 for i in range(len(steps))])
    assert evaluate(window.merge(weights)) <= min(alone) + 1e-6
    with pytest.raises(ValueError, match="'greedy_soup' chooses on held-out data: give evaluate="):
        coefficients("greedy_soup", 4)
