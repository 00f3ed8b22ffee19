"""Issue 19: the edges a new user and three adversarial rounds found, each reproduced first."""

from __future__ import annotations

import math
import threading

import lightning as L
import pytest
import torch
from helpers.lit import Regression, data, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from ckptavg import CheckpointAverager


class RendersTheBar(Regression):
    """Renders the Rich progress bar in every validation step, as Rich's refresh thread does at
    any moment (deterministically here, in the main thread)."""

    bars: list

    def validation_step(self, batch, batch_idx):
        bar = self.trainer.progress_bar_callback
        self.bars.append(bar)
        if bar is not None and bar.progress is not None:
            bar.progress.refresh()  # renders every column, as the refresh thread does
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("explicit", [True, False])
def test_the_rich_progress_bar_survives_the_preview(tmp_path, explicit):
    thread_errors: list = []
    previous = threading.excepthook
    threading.excepthook = lambda args: thread_errors.append(args.exc_value)
    try:
        model = RendersTheBar()
        model.bars = []
        train, val = data()
        callbacks = [CheckpointAverager(window=3, every_n_steps=4, recover=False)]
        if explicit:
            callbacks.append(RichProgressBar(console_kwargs={"force_terminal": True}))
        run = trainer(tmp_path, callbacks, enable_progress_bar=True, max_epochs=2, val_check_interval=8)
        run.fit(model, train, val)
    finally:
        threading.excepthook = previous
    assert thread_errors == []
    assert isinstance(run.progress_bar_callback, RichProgressBar)  # Lightning's default when rich is installed
    assert all(bar is run.progress_bar_callback for bar in model.bars)  # the preview's runs too
    assert "merged/val_loss" in run.callback_metrics


# -- recovery: steps that need autograd, module state, units, silence ------------------------------


class StatefulRegression(Regression):
    """A training step as people write them: a gradient penalty through torch.autograd.grad,
    BatchNorm statistics, an EMA teacher and a step counter updated in place, a rebound buffer."""

    def __init__(self):
        super().__init__(lr=0.005)
        self.net.insert(1, torch.nn.BatchNorm1d(32))
        self.teacher = torch.nn.Linear(8, 1)
        self.teacher.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("rebound", torch.zeros(()), persistent=False)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.clone().requires_grad_(True)
        prediction = self(x)
        (slope,) = torch.autograd.grad(prediction.sum(), x, create_graph=True)
        loss = torch.nn.functional.mse_loss(prediction, y) + 1e-3 * slope.pow(2).mean()
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), (self.net[0].weight[:1], self.net[0].bias[:1]), strict=True):
                t.mul_(0.9).add_(0.1 * s.reshape(t.shape))
            self.updates += 1
        self.rebound = self.rebound + 1  # a new tensor bound to the buffer's name
        self.losses.append(float(loss))
        return loss


def test_the_recovery_check_runs_steps_that_need_autograd_and_leaves_no_module_state_behind(tmp_path):
    from test_recovery import ScrambleWeights

    L.seed_everything(0)
    model = StatefulRegression()
    train, _ = data(shuffle=True)
    averager = CheckpointAverager(window=8, every_n_steps=4, preview=False, merge_at_end=False)
    trainer(tmp_path, [averager, ScrambleWeights(120)], max_epochs=12, limit_val_batches=0).fit(model, train)
    checks = len(model.losses) - 192  # training_step ran twice more for each check
    assert checks >= 2 and math.isfinite(
        averager.guard.checked[0]
    )  # the check ran, with autograd, and scored the batch
    # only the 192 real steps left state behind (a restore rolls the persistent state back to the
    # merged point, counters included)
    assert float(model.rebound) == 192
    assert int(model.updates) == int(model.net[1].num_batches_tracked)


def test_the_recovery_check_leaves_every_tensor_of_the_module_as_it_was():
    from ckptavg.lightning import _internals as _evaluation

    model = StatefulRegression()
    model.train()
    x, y = data()[0].dataset.tensors
    batch = (x[:16], y[:16])
    model.training_step(batch, 0)  # a real step first: non-trivial statistics
    before = {name: t.detach().clone() for name, t in [*model.state_dict().items(), ("rebound", model.rebound)]}
    bound = model.rebound
    loss = _evaluation.batch_loss(model, batch, 0)()
    assert math.isfinite(loss) and len(model.losses) == 2
    after = {name: t for name, t in [*model.state_dict().items(), ("rebound", model.rebound)]}
    assert model.rebound is bound
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_recovery_watches_the_real_loss_under_gradient_accumulation(tmp_path):
    model = StatefulRegression()
    train, _ = data()
    averager = CheckpointAverager(window=4, every_n_steps=2, preview=False, merge_at_end=False)
    trainer(tmp_path, [averager], max_steps=6, accumulate_grad_batches=4, limit_val_batches=0).fit(model, train)
    assert averager.guard.loss_level.seen == 6
    assert averager.guard.last_loss == pytest.approx(sum(model.losses[-4:]) / 4, rel=1e-5)


class ManualRegression(Regression):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()  # and returns nothing, as Lightning's docs show


def test_manual_optimization_without_a_returned_loss_says_recovery_is_off(tmp_path):
    train, _ = data()
    averager = CheckpointAverager(window=4, every_n_steps=2, preview=False, merge_at_end=False)
    with pytest.warns(
        UserWarning, match="training_step returned no loss, so recovery cannot watch the run and is off"
    ) as caught:
        trainer(tmp_path, [averager], max_steps=8, limit_val_batches=0).fit(ManualRegression(), train)
    assert sum("returned no loss" in str(w.message) for w in caught) == 1  # said once


# -- cadence, choosing with bad scores, what a checkpoint rebuilds, two averagers -------------------


def test_a_cadence_that_never_snapshots_warns_at_fit_start(tmp_path):
    class Stop(Exception):
        pass

    class StopAtFirstStep(Callback):
        def on_train_batch_start(self, *args):
            raise Stop

    train, val = data()
    for cadence, runs in (({"every_n_steps": 500}, {"max_steps": 220}), ({"every_n_epochs": 5}, {"max_epochs": 3})):
        with pytest.warns(UserWarning, match="is never reached"), pytest.raises(Stop):
            trainer(tmp_path, [CheckpointAverager(**cadence), StopAtFirstStep()], **runs).fit(Regression(), train, val)


class NanScore(Regression):
    """Validation reports NaN for val_score and a real val_loss."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_score", -torch.nn.functional.mse_loss(self(batch[0]), batch[1]))


def test_greedy_soup_and_select_never_pick_a_nan_score():
    from ckptavg import CheckpointWindow, select

    win = CheckpointWindow(3)
    for step in range(1, 4):
        win.snapshot({"a": torch.full((2,), float(step))}, step=step)
    score = {1.0: 1.0, 2.0: math.nan, 3.0: 0.5}
    weights = win.weights("greedy_soup", evaluate=lambda sd: score.get(float(sd["a"][0]), 0.75))
    assert weights == [0.0, 0.0, 1.0] or weights[1] == 0.0  # the NaN-scored snapshot never joins
    with pytest.raises(ValueError, match="every snapshot scored NaN"):
        win.weights("greedy_soup", evaluate=lambda sd: math.nan)
    with pytest.raises(ValueError, match="no candidate scored a finite value"):
        select(win, lambda sd: math.nan)


def test_keep_best_judges_each_metric_in_its_own_direction(tmp_path):
    L.seed_everything(0)
    averager = CheckpointAverager(
        window=3, every_n_steps=4, candidates=["wma"], select="merged/val_score", mode="max", keep="best"
    )
    assert averager.select == "val_score"  # merged/<metric> names the same metric of each merge
    train, val = data()
    run = trainer(tmp_path, [averager], max_epochs=2)
    run.fit(NanScore(), train, val)
    assert averager._monitored(run) == ("val_score", "max")
    assert averager.selection["by"] == "val_score"
    plain = CheckpointAverager(window=3, mode="max")
    assert plain._monitored(run) == ("val_loss", "min")  # the default metric keeps its own direction


def test_select_and_monitor_name_logged_metrics_or_fail_at_the_sanity_check(tmp_path):
    train, val = data()
    for kwargs in ({"candidates": ["wma"], "select": "val_acc"}, {"monitor": "merged/val_acc"}):
        model = Regression()
        with pytest.raises(
            ValueError, match=r"is not a metric the module logs in validation \(it logs \['val_loss', 'val_mae'\]\)"
        ):
            trainer(tmp_path, [CheckpointAverager(window=3, every_n_steps=4, **kwargs)], max_epochs=1).fit(
                model, train, val
            )
        assert model.global_step == 0  # refused before training


def test_a_callable_decay_shape_is_rebuilt_from_the_stored_coefficients(tmp_path):
    from ckptavg import load_merged_weights

    L.seed_everything(0)
    shape = lambda x: (1 - x) ** 3  # noqa: E731 - a shape no name stands for
    averager = CheckpointAverager(
        window=4, every_n_steps=4, merge="decay", merge_options={"shape": shape}, merge_at_end=False
    )
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = Regression()
    trainer(tmp_path, [averager, saver], max_epochs=2, limit_val_batches=0, enable_checkpointing=True).fit(
        model, data()[0]
    )
    expected = averager.window.merge("decay", shape=shape)
    assert averager.window.weights("decay", shape=shape) != averager.window.weights("sma")
    rebuilt = load_merged_weights(tmp_path / "ckpt" / "last.ckpt")
    for name, tensor in expected.items():
        assert torch.equal(rebuilt[name], tensor), name


def test_two_averagers_that_would_clash_are_refused_at_setup(tmp_path):
    train, val = data()
    both = [CheckpointAverager(window=3, every_n_steps=4), CheckpointAverager(window=4, every_n_steps=4, merge="ema")]
    model = Regression()
    with pytest.raises(
        ValueError, match=r"would share the metrics merged/<name> \(preview=True\); restoring the model"
    ):
        trainer(tmp_path, both, max_epochs=1).fit(model, train, val)
    assert model.global_step == 0
    disk = [CheckpointAverager(window=3, storage="disk", preview=False, recover=False, merge_at_end=False, dirpath=tmp_path / "w"),
            CheckpointAverager(window=4, storage="disk", preview=False, recover=False, merge_at_end=False, dirpath=tmp_path / "w")]  # fmt: skip
    with pytest.raises(ValueError, match="would share the disk window in"):
        trainer(tmp_path, disk, max_epochs=1).fit(Regression(), train, val)


# -- what a Lightning checkpoint holds, and how large it is ----------------------------------------


def test_a_checkpoint_holds_the_weights_its_monitored_metric_measured_and_resumes_the_raw_run(tmp_path):
    from helpers.lit import val_loss_of

    L.seed_everything(0)
    train, val = data(shuffle=True)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="merged/val_loss", save_top_k=1, save_last=True)
    averager = CheckpointAverager(window=4, every_n_steps=4)
    run = trainer(tmp_path / "a", [averager, saver], max_epochs=4, enable_checkpointing=True)
    model = Regression()
    run.fit(model, train, val)
    assert averager._storage == "disk"  # the run writes checkpoints: the window lives on disk
    best = Regression.load_from_checkpoint(saver.best_model_path)
    assert val_loss_of(best, val) == pytest.approx(float(saver.best_model_score), rel=1e-5)

    # trainer.test on the best checkpoint measures the same weights
    class Tested(Regression):
        def test_step(self, batch, batch_idx):
            self.log("test_loss", torch.nn.functional.mse_loss(self(batch[0]), batch[1]))

    tester = trainer(tmp_path / "t", [], enable_checkpointing=False)
    (scores,) = tester.test(Tested(), val, ckpt_path=saver.best_model_path, verbose=False)
    assert scores["test_loss"] == pytest.approx(float(saver.best_model_score), rel=1e-5)

    # Resuming from a mid-run checkpoint continues the raw run: the end is bit-identical.
    def fit(root, max_epochs, ckpt_path=None):
        L.seed_everything(7)
        model = Regression()
        saver = ModelCheckpoint(dirpath=root / "ckpt", monitor="merged/val_loss", save_last=True)
        trainer(
            root,
            [CheckpointAverager(window=4, every_n_steps=4), saver],
            max_epochs=max_epochs,
            enable_checkpointing=True,
        ).fit(model, *data(), ckpt_path=ckpt_path)
        return model

    whole = fit(tmp_path / "w", 4)
    fit(tmp_path / "b", 2)
    assert "ckptavg_raw_state_dict" in torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    resumed = fit(tmp_path / "b", 4, tmp_path / "b" / "ckpt" / "last.ckpt")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class Wide(Regression):
    def __init__(self):
        super().__init__(lr=0.005)  # stable at this width: the window fills with every snapshot
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1))


def test_checkpoints_stay_near_one_extra_copy_by_default(tmp_path):
    train, val = data()
    sizes = {}
    for name, callbacks in (
        ("none", []),
        ("auto", [CheckpointAverager(window=8, every_n_steps=2)]),
        ("cpu", [CheckpointAverager(window=8, every_n_steps=2, storage="cpu")]),
    ):
        L.seed_everything(0)
        saver = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        trainer(tmp_path / f"log-{name}", [*callbacks, saver], max_epochs=2, enable_checkpointing=True).fit(
            Wide(), train, val
        )
        sizes[name] = (tmp_path / name / "last.ckpt").stat().st_size
    model_bytes = sum(t.numel() * t.element_size() for t in Wide().state_dict().values())
    # the merged state_dict plus the raw weights for resuming: one model more, where the cpu tier adds the window too
    assert 0.9 * model_bytes < sizes["auto"] - sizes["none"] < 1.2 * model_bytes
    assert sizes["cpu"] - sizes["none"] > (8 + 1) * model_bytes  # the window, and the raw weights


def test_a_rerun_in_the_same_folder_gets_the_next_default_window_folder(tmp_path):
    train, val = data()
    for _ in range(2):
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer(
            tmp_path,
            [CheckpointAverager(window=3, every_n_steps=4), saver],
            max_epochs=1,
            logger=False,
            enable_checkpointing=True,
        ).fit(Regression(), train, val)
    assert (tmp_path / "ckptavg" / "window" / "manifest.json").exists()
    assert (tmp_path / "ckptavg_1" / "window" / "manifest.json").exists() and (
        tmp_path / "ckptavg_1" / "merged.safetensors"
    ).exists()


def test_a_cpu_window_state_without_its_tensors_is_a_value_error_naming_the_field():
    from ckptavg import CheckpointWindow

    window = CheckpointWindow(3)
    for step in range(1, 4):
        window.snapshot({"a": torch.ones(4) * step}, step=step)
    state = window.state_dict()
    del state["snapshots"]
    with pytest.raises(ValueError, match=r"lacks \['snapshots'\]"):
        CheckpointWindow(3).load_state_dict(state)


def test_a_disk_window_is_found_again_after_its_run_folder_moved(tmp_path):
    import shutil

    train, val = data()
    L.seed_everything(0)
    first = tmp_path / "a"
    saver = ModelCheckpoint(dirpath=first / "ckpt", save_last=True)
    run = trainer(
        first, [CheckpointAverager(window=4, every_n_steps=2), saver], max_epochs=1, enable_checkpointing=True
    )
    run.fit(Regression(), train, val)
    shutil.move(first, tmp_path / "b")  # copied to another machine, or renamed
    moved = tmp_path / "b"
    averager = CheckpointAverager(window=4, every_n_steps=2, merge_at_end=False)
    resumed = trainer(
        moved, [averager, ModelCheckpoint(dirpath=moved / "ckpt2")], max_steps=18, enable_checkpointing=True
    )
    resumed.fit(Regression(), train, val, ckpt_path=moved / "ckpt" / "last.ckpt")
    assert averager.window.steps == [12, 14, 16, 18]  # the inherited snapshots, and one more


def test_a_second_fit_with_the_same_callback_inherits_nothing_from_the_first(tmp_path):
    from ckptavg.lightning.testing import InjectDivergence

    train, val = data()
    L.seed_everything(0)
    averager = CheckpointAverager(window=8, every_n_steps=4, recover={"warmup": 4}, merge_at_end=False)
    trainer(tmp_path / "a", [averager, InjectDivergence({12})], max_steps=16, limit_val_batches=0).fit(
        Regression(), train
    )
    assert [e.step for e in averager.recovery_events] == [12]
    trainer(tmp_path / "b", [averager], max_steps=16, limit_val_batches=0).fit(Regression(), train)
    assert averager.window.steps == [4, 8, 12, 16]  # step 12 is no restore of this run


def test_tampered_checkpoint_fields_are_value_errors_naming_them(tmp_path):
    from ckptavg import load_merged_weights

    train, val = data()
    L.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    averager = CheckpointAverager(window=3, every_n_steps=4, storage="cpu")
    trainer(tmp_path, [averager, saver], max_epochs=1, enable_checkpointing=True).fit(Regression(), train, val)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("CheckpointAverager")]
    tampered = {**checkpoint, "callbacks": {key: {**checkpoint["callbacks"][key], "coefficients": ["x", 1]}}}
    torch.save(tampered, tmp_path / "coefficients.ckpt")
    with pytest.raises(ValueError, match="field 'coefficients' must be a list of finite numbers"):
        load_merged_weights(tmp_path / "coefficients.ckpt")
    torch.save({**checkpoint, "ckptavg_raw_state_dict": [1, 2]}, tmp_path / "raw.ckpt")
    resumed = CheckpointAverager(window=3, every_n_steps=4, storage="cpu")
    with pytest.raises(ValueError, match="field 'ckptavg_raw_state_dict' must map names to tensors"):
        trainer(tmp_path, [resumed], max_epochs=2).fit(Regression(), train, val, ckpt_path=tmp_path / "raw.ckpt")
