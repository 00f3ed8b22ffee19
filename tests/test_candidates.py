"""Issue 13 in the callback: candidate merges previewed beside the main one, a merge selected at
the end of fit on a validation metric (on a separate selection loader too), and every registered
method accepted as the main merge."""

import copy
import json

import lightning as L
import pytest
import torch
from conftest import assert_close_to_reference, reference_merge
from helpers.lit import Recorder, Regression, data, trainer, val_loss_of
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open

from ckptavg import CheckpointAverager, coefficients

CANDIDATES = {"wma": "wma", "cos": {"method": "decay", "shape": "cosine"}, "ema5": {"method": "ema", "alpha": 0.5}}
REFERENCE = {
    "sma": ("sma", {}),
    "wma": ("wma", {}),
    "cos": ("decay", {"shape": "cosine"}),
    "ema5": ("ema", {"alpha": 0.5}),
}


def merged_val_loss(module, recorder, steps, name, loader):
    method, options = REFERENCE[name]
    alpha = options.get("alpha", 0.2)
    weights = coefficients(method, steps, alpha, **{k: v for k, v in options.items() if k != "alpha"})
    twin = copy.deepcopy(module)
    merged = reference_merge([recorder.states[s] for s in steps], weights)
    twin.load_state_dict({k: torch.from_numpy(v).to(recorder.states[steps[-1]][k].dtype) for k, v in merged.items()})
    return val_loss_of(twin, loader)


class TwoLoaders(Regression):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))


def validations_checked(tmp_path, averager, check, max_epochs=3):
    """Fit a Regression with ``averager``; after each validation whose window holds two or more
    snapshots, ``check(trainer, pl_module, recorder, val)``. Returns the steps checked."""
    L.seed_everything(0)
    recorder = Recorder()
    train, val = data()
    seen = []

    class Check(Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking or len(averager.window) < 2:
                return
            check(trainer, pl_module, recorder, val)
            seen.append(trainer.global_step)

    trainer(tmp_path, [recorder, averager, Check()], max_epochs=max_epochs).fit(Regression(), train, val)
    return seen


def test_candidates_are_previewed_at_every_validation_under_their_names(tmp_path):
    averager = CheckpointAverager(window=4, every_n_steps=4, candidates=CANDIDATES, merge_at_end=False)

    def check(trainer, pl_module, recorder, val):
        steps = averager.window.steps
        metrics = trainer.callback_metrics
        assert float(metrics["merged/val_loss"]) == pytest.approx(
            merged_val_loss(pl_module, recorder, steps, "sma", val), rel=1e-5
        )
        for name in CANDIDATES:
            expected = merged_val_loss(pl_module, recorder, steps, name, val)
            assert float(metrics[f"merged/{name}/val_loss"]) == pytest.approx(expected, rel=1e-5), name
            assert f"merged/{name}/val_loss" not in trainer.progress_bar_metrics  # the bar shows the main merge only
        assert float(metrics["val_loss"]) == pytest.approx(
            val_loss_of(copy.deepcopy(pl_module), val), rel=1e-5
        )  # raw untouched

    assert validations_checked(tmp_path, averager, check) == [16, 32, 48]


@pytest.mark.parametrize("preview", [True, False])
def test_select_finishes_with_the_best_candidate_and_records_the_pick(tmp_path, preview):
    L.seed_everything(0)
    recorder, model = Recorder(), Regression(lr=0.1)
    averager = CheckpointAverager(window=5, every_n_steps=3, candidates=CANDIDATES, select="val_loss", preview=preview)
    train, val = data()
    trainer(tmp_path, [recorder, averager], max_epochs=3).fit(model, train, val)
    steps = averager.window.steps
    expected = {name: merged_val_loss(model, recorder, steps, name, val) for name in REFERENCE}
    selection = averager.selection
    assert selection["by"] == "val_loss" and selection["scores"] == pytest.approx(expected, rel=1e-5)
    picked = min(expected, key=expected.get)
    assert selection["picked"] == picked
    method, options = REFERENCE[picked]
    alpha = options.get("alpha", 0.2)
    weights = coefficients(method, steps, alpha, **{k: v for k, v in options.items() if k != "alpha"})
    assert_close_to_reference(model.state_dict(), reference_merge([recorder.states[s] for s in steps], weights))
    with safe_open(str(averager.merged_path), framework="pt") as f:
        metadata = f.metadata()
    assert (
        metadata["selected"] == picked and metadata["selected_by"] == "val_loss (min)" and metadata["method"] == method
    )
    assert json.loads(metadata["candidate_scores"]) == pytest.approx(expected, rel=1e-5)
    assert json.loads(metadata["coefficients"]) == pytest.approx(weights)


def test_select_on_a_second_loader_reports_on_the_first(tmp_path):
    L.seed_everything(0)
    recorder, model = Recorder(), TwoLoaders(lr=0.1)
    averager = CheckpointAverager(window=5, every_n_steps=3, candidates=CANDIDATES, select="val_loss/dataloader_idx_1")
    train, val = data()
    _, selection_loader = data(seed=1)
    trainer(tmp_path, [recorder, averager], max_epochs=3).fit(model, train, [val, selection_loader])
    steps = averager.window.steps
    on_selection = {name: merged_val_loss(model, recorder, steps, name, selection_loader) for name in REFERENCE}
    assert averager.selection["scores"] == pytest.approx(on_selection, rel=1e-5)
    assert averager.selection["picked"] == min(on_selection, key=on_selection.get)
    picked = averager.selection["picked"]
    assert averager.final_metrics["merged"]["val_loss/dataloader_idx_0"] == pytest.approx(
        merged_val_loss(model, recorder, steps, picked, val), rel=1e-5
    )


def test_every_registered_method_works_as_the_callbacks_merge(tmp_path):
    """Post-hoc EMA was refused at construction: its options were checked on one snapshot at step 0."""
    L.seed_everything(0)
    recorder, model = Recorder(), Regression()
    averager = CheckpointAverager(window=4, every_n_steps=4, merge="posthoc", merge_options={"sigma_rel": 0.1})
    train, val = data()
    trainer(tmp_path, [recorder, averager], max_epochs=2).fit(model, train, val)
    steps = averager.window.steps
    weights = coefficients("posthoc", steps, sigma_rel=0.1, max_lost=1.0)
    assert_close_to_reference(model.state_dict(), reference_merge([recorder.states[s] for s in steps], weights))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"select": "val_loss"}, r"select='val_loss' chooses among candidates: give candidates=\[...\] as well"),
        ({"candidates": "wma"}, "candidates must be a list of method names or a mapping"),
        ({"candidates": ["wma", "wma"]}, "the name 'wma' is given twice"),
        ({"candidates": {"a/b": "wma"}}, "without '/'"),
        ({"candidates": {"cos": {"shape": "cosine"}}}, r"candidates\['cos'\] needs a 'method'"),
        (
            {"candidates": {"cos": {"method": "decay", "shap": "cosine"}}},
            r"candidates\['cos'\]: merge method 'decay' has no option 'shap'",
        ),
        ({"candidates": ["median"]}, r"candidates\['median'\]: unknown merge method 'median'"),
        ({"candidates": {"w": [1, 2]}}, r"candidates\['w'\] must be a merge method's name"),
        (
            {"candidates": ["greedy_soup"]},
            r"candidates\['greedy_soup'\]: merge method 'greedy_soup' chooses on held-out data",
        ),
        ({"candidates": {"sma": "wma"}}, "'sma' is the name of the main merge"),
        ({"candidates": ["wma"], "select": ""}, "select must be the name of a validation metric"),
    ],
)
def test_candidate_and_select_arguments_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CheckpointAverager(**kwargs)


def test_log_correlation_logs_the_windows_summary_at_each_snapshot(tmp_path):
    import csv

    L.seed_everything(0)
    averager = CheckpointAverager(window=4, every_n_steps=4, log_correlation=True)
    train, val = data()
    trainer(tmp_path, [averager], max_epochs=2).fit(Regression(), train, val)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("ckptavg/min_weight_cosine")]
    assert [int(r["step"]) for r in rows] == list(range(12, 33, 4))  # from the third snapshot on
    assert averager.last_correlation == averager.window.correlation().summary()
    assert float(rows[-1]["ckptavg/min_weight_cosine"]) == pytest.approx(
        averager.last_correlation["min_weight_cosine"], rel=1e-6
    )


def test_preview_ensemble_logs_the_ensembles_metrics_and_leaves_the_module_as_it_was(tmp_path):
    averager = CheckpointAverager(window=3, every_n_steps=4, preview_ensemble=True, merge_at_end=False)

    def check(trainer, pl_module, recorder, val):
        members = []
        for step in averager.window.steps:
            twin = copy.deepcopy(pl_module)
            twin.load_state_dict(recorder.states[step])
            members.append(twin.eval())
        with torch.no_grad():
            expected = float(
                torch.stack(
                    [torch.nn.functional.mse_loss(torch.stack([m(x) for m in members]).mean(0), y) for x, y in val]
                ).mean()
            )
        assert float(trainer.callback_metrics["ensemble/val_loss"]) == pytest.approx(expected, rel=1e-5)
        assert "forward" not in pl_module.__dict__  # the class's forward again
        assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(
            val_loss_of(copy.deepcopy(pl_module), val), rel=1e-5
        )

    assert validations_checked(tmp_path, averager, check) == [16, 32, 48]


def test_preview_ensemble_says_so_when_validation_never_calls_forward(tmp_path):
    from helpers.lit import DigitsClassifier, digits

    L.seed_everything(0)
    averager = CheckpointAverager(window=3, every_n_steps=10, preview_ensemble=True, merge_at_end=False)
    train, val = digits()
    with pytest.warns(UserWarning, match=r"DigitsClassifier.validation_step never calls self\(...\)"):
        trainer(tmp_path, [averager], max_steps=60, val_check_interval=30).fit(DigitsClassifier(), train, val)
    assert averager._ensemble_unsupported
