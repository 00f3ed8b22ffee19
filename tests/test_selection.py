"""Issue 13: merges chosen on held-out data (select, greedy soup), on a real task: scikit-learn's
digits, an MLP trained at a constant learning rate, a window of its snapshots."""

import copy
import math

import pytest
import torch

from ckptavg import CheckpointWindow, coefficients, evaluator, learn_weights, merge_state_dicts, select


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
    best, table = select(window, evaluate)
    names = [row["name"] for row in table]
    assert names[:2] == ["newest", "sma-newest-2"] and {"wma", "ema", "decay-cosine", "decay-1-sqrt"} <= set(names)
    for row in table:  # every score is what an independent evaluation of that merge gives
        merged = merge_state_dicts([states[s] for s in window.steps], weights=row["weights"])
        assert row["score"] == pytest.approx(independent_loss(model, merged, held_out), rel=1e-5), row["name"]
    assert best == min(table, key=lambda row: row["score"])["weights"]
    custom_best, custom = select(
        window, evaluate, {"sma": "sma", "last-two": [0] * 6 + [1, 1], "cos": ("decay", {"shape": "cosine"})}
    )
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


def test_select_tries_posthoc_widths_by_default(digits_window):
    model, window, states, held_out = digits_window
    evaluate = evaluator(model, torch.nn.functional.cross_entropy, held_out)
    _, table = select(window, evaluate)
    rows = {row["name"]: row for row in table}
    assert {"posthoc-0.05", "posthoc-0.1", "posthoc-0.2"} <= set(rows)
    assert rows["posthoc-0.1"]["weights"] == pytest.approx(window.weights("posthoc", sigma_rel=0.1, max_lost=1.0))


def test_evaluator_handles_tied_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 11, bias=False))
    model[1].weight = model[0].weight
    state = {name: t.detach().clone() + 0.01 for name, t in model.state_dict().items()}  # both names, equal values
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    targets = torch.tensor([[2, 3, 4], [5, 6, 7]])

    def loss_fn(logits, y):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    with torch.no_grad():
        expected = float(loss_fn(twin(tokens), targets))
    assert evaluator(model, loss_fn, [(tokens, targets)])(state) == pytest.approx(expected, rel=1e-6)


def reference_learned_weights(states, model, held_out, start, steps, lr):
    """The learned merge written out independently: float64 logits, softmax, an explicit weighted
    sum of the state dicts, Adam, one (cycling) batch per step."""
    logits = torch.tensor([math.log(w) for w in start], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    model = copy.deepcopy(model).eval()
    for step in range(steps):
        c = torch.softmax(logits, 0)
        merged = {name: sum(c[j] * states[j][name].double() for j in range(len(states))).float() for name in states[0]}
        x, y = held_out[step % len(held_out)]
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, merged, (x,)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.softmax(logits.detach(), 0).tolist()


def test_learn_weights_descends_the_held_out_loss_and_matches_a_reference(digits_window):
    model, window, states, held_out = digits_window
    before = copy.deepcopy(model.state_dict())
    x, y = held_out[0]
    batches = [(x[i : i + 60], y[i : i + 60]) for i in range(0, 360, 60)]
    evaluate = evaluator(model, torch.nn.functional.cross_entropy, batches)
    learned = learn_weights(window, model, torch.nn.functional.cross_entropy, batches, steps=40, lr=0.1)
    assert len(learned) == len(window) and sum(learned) == pytest.approx(1.0) and min(learned) > 0
    assert evaluate(window.merge(learned)) < evaluate(window.merge("sma")) - 1e-4
    reference = reference_learned_weights(
        [states[s] for s in window.steps], model, batches, window.weights("sma"), 40, 0.1
    )
    assert learned == pytest.approx(reference, abs=2e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert learn_weights(
        window, model, torch.nn.functional.cross_entropy, batches, steps=0, init="wma"
    ) == window.weights("wma")


def test_learn_weights_refuses_bad_arguments_before_any_work(digits_window):
    model, window, _, held_out = digits_window
    loss = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        learn_weights(window, model, loss, held_out, steps=-1)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        learn_weights(window, model, loss, held_out, lr=float("nan"))
    with pytest.raises(ValueError, match="at least one batch"):
        learn_weights(window, model, loss, [])
    with pytest.raises(ValueError, match="init must be non-negative"):
        learn_weights(window, model, loss, held_out, init=[2, -1, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        learn_weights(window, model, loss, held_out, init="nope")


def test_evaluator_keeps_the_models_non_persistent_buffers():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0, 0.0]), persistent=False)

        def forward(self, x):
            return self.linear(x) * self.mask

    model = Masked()
    state = {k: v + 0.5 for k, v in model.state_dict().items()}  # no "mask": it is not saved
    x, y = torch.ones(3, 4), torch.zeros(3, 4)
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(twin(x), y))
    assert evaluator(model, torch.nn.functional.mse_loss, [(x, y)])(state) == pytest.approx(expected, rel=1e-6)


def test_the_window_methods_of_0_1_still_work_with_a_deprecation_warning():
    from ckptavg import Ensemble

    window = CheckpointWindow(window=3)
    model = torch.nn.Linear(2, 1)
    for step in range(1, 4):
        with torch.no_grad():
            model.weight.add_(0.5)
        window.snapshot(model, step=step)
    batches = [(torch.ones(4, 2), torch.zeros(4, 1))]
    evaluate = evaluator(model, torch.nn.functional.mse_loss, batches)
    with pytest.warns(DeprecationWarning, match=r"use ckptavg.select\(window"):
        assert window.select(evaluate) == select(window, evaluate)
    with pytest.warns(DeprecationWarning, match=r"use ckptavg.learn_weights\(window"):
        old = window.learn_weights(model, torch.nn.functional.mse_loss, batches, steps=3)
    assert old == learn_weights(window, model, torch.nn.functional.mse_loss, batches, steps=3)
    with pytest.warns(DeprecationWarning, match=r"use ckptavg.Ensemble.from_window"):
        ensemble = window.ensemble(model)
    x = torch.randn(5, 2)
    assert torch.equal(ensemble(x), Ensemble.from_window(window, model)(x))


def test_the_window_imports_nothing_built_on_it():
    import ast
    from pathlib import Path

    import ckptavg.window

    tree = ast.parse(Path(ckptavg.window.__file__).read_text())
    top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert not top_level & {"selection", "learning", "ensembles", "offline", "recovery", "callback", "cli"}
