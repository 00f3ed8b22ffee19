import csv
import math
import random

import lightning as L
import pytest
import torch
import torchmetrics
from conftest import assert_close_to_reference, reference_merge, run_ranks
from helpers.lit import DigitsClassifier, Regression, data, digits, trainer, val_loss_of
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ckptavg import CheckpointAverager, CheckpointWindow, RecoveryError, RecoveryPolicy, SpikeGuard
from ckptavg.lightning.testing import InjectDivergence

# -- the framework-free guard -----------------------------------------------------------------------


def noisy_losses(n: int, seed: int = 0) -> list[float]:
    """A decreasing loss with heavy, skewed mini-batch noise (occasional 2x outliers)."""
    rng = random.Random(seed)
    return [
        (2.0 / (1 + i / 200) + 0.5) * (1 + 0.15 * rng.gauss(0, 1) + (0.6 if rng.random() < 0.01 else 0))
        for i in range(n)
    ]


def test_no_false_alarm_on_ordinary_noisy_losses():
    for seed in range(5):
        guard = SpikeGuard(CheckpointWindow(window=2))
        for step, loss in enumerate(noisy_losses(5000, seed)):
            assert not guard.observe(step, loss), (seed, step, loss)
        assert guard.healthy and guard.events == []


def near_zero_losses(n: int, seed: int = 0, error_rate: float = 0.3) -> list[float]:
    """A classifier near convergence: most batches about 1e-3, a batch holding one misclassified
    example 0.05 to 1 (hundreds of times the median), now and then several in a row."""
    rng = random.Random(seed)
    start = [2.3 * math.exp(-i / 20) for i in range(100)]
    return start + [rng.uniform(0.05, 1.0) if rng.random() < error_rate else rng.uniform(5e-4, 2e-3) for _ in range(n)]


@pytest.mark.parametrize("error_rate", [0.05, 0.3, 0.45])
def test_no_false_alarm_on_heavy_tailed_losses_near_zero(error_rate):
    for seed in range(5):
        guard = SpikeGuard(CheckpointWindow(window=2))
        for step, loss in enumerate(near_zero_losses(5000, seed, error_rate)):
            assert not guard.observe(step, loss), (seed, step, loss)
        assert guard.events == []


def armed_guard(**policy) -> SpikeGuard:
    """A guard that has seen a run fall from 2.0 to a noisy 0.1 over 400 steps (start level
    about 1.0: the median of the first 50 losses)."""
    guard = SpikeGuard(CheckpointWindow(window=2), RecoveryPolicy(**policy))
    for step in range(400):
        guard.observe(step, 0.1 + 1.9 * math.exp(-step / 30) + 0.01 * (step % 3))
    return guard


def test_the_level_must_stay_up_for_patience_steps():
    guard = armed_guard()
    assert guard.limit == pytest.approx(guard.loss_level.start)  # back at the warm-up level, far above the noise
    assert 0.9 < guard.limit < 1.2
    assert not guard.observe(400, 1000.0) and guard.healthy is False  # one batch: the level does not move
    for step in range(401, 408):
        assert not guard.observe(step, 0.1)
    assert guard.healthy and guard.onset is None
    # A sustained divergence: the level crosses at the 4th high loss of 7; the restore is due when
    # it has been abnormal for 10 steps.
    due = [step for step in range(408, 440) if guard.observe(step, 5.0)]
    assert due and due[0] == 408 + 3 + 9 and guard.onset == 408


def test_a_stretch_that_comes_back_by_itself_joins_the_baseline():
    guard = armed_guard()
    for step in range(400, 408):  # 8 high steps: abnormal, but within patience
        assert not guard.observe(step, 3.0)
    assert guard.onset is not None
    for step in range(408, 420):
        assert not guard.observe(step, 0.1)
    assert guard.onset is None and guard.events == [] and 3.0 in guard.loss_level.normal


def test_non_finite_loss_restores_at_once_only_when_the_weights_are_poisoned():
    model = torch.nn.Linear(2, 1)
    guard = armed_guard()
    assert not guard.observe(400, float("nan"), model=model)  # finite weights: a skipped step (AMP), not a divergence
    assert guard.observe(401, float("inf"))  # no model to check: assume the worst
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    fresh = SpikeGuard(CheckpointWindow(window=2))
    assert fresh.observe(0, float("nan"), model=model)  # at once, armed or not


def test_restore_only_when_the_stable_point_does_better_on_the_current_batch():
    """A data-mix change makes the loss jump: the stable point is no better on the new data, so
    there is no restore; the level is accepted as normal after accept_after steps."""
    model = torch.nn.Linear(2, 1)
    window = CheckpointWindow(window=4)
    guard = SpikeGuard(window, RecoveryPolicy(accept_after=40))
    for step in range(400):
        guard.observe(step, 0.1 + 1.9 * math.exp(-step / 30))
        if step % 10 == 0:
            window.snapshot(model, step=step)
    same = lambda: 5.0  # noqa: E731 - the current weights and the stable point score alike on the new data
    assert not any(guard.observe(step, 5.0, model=model, evaluate=same) for step in range(400, 460))
    assert [e.action for e in guard.events] == ["accepted"] and guard.healthy
    assert guard.events[0].batch_loss == guard.events[0].stable_loss == 5.0
    # Trouble in the weights: the stable point scores far better on the same batch: restore.
    scores = iter([50.0, 0.2])  # the current weights, then the stable point
    due = next(
        step for step in range(460, 500) if guard.observe(step, 500.0, model=model, evaluate=lambda: next(scores))
    )
    assert due == 460 + 3 + 9
    event = guard.restore(model, step=due)
    assert (
        event.action == "restored"
        and (event.batch_loss, event.stable_loss) == (50.0, 0.2)
        and "vs 0.2 for the stable point" in str(event)
    )


def test_restore_merges_only_snapshots_before_the_spike_and_resets_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    window = CheckpointWindow(window=4)
    guard = SpikeGuard(window, RecoveryPolicy(warmup=5, patience=1))
    states = {}
    for step in range(1, 31):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert not guard.observe(step, 1.0 + 0.01 * (step % 2))
        if step % 5 == 0 and guard.healthy:
            window.snapshot(model, step=step)
            states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    # Four high losses of seven move the median: abnormal at step 34, due at once (patience 1).
    assert [guard.observe(step, 50.0) for step in range(31, 35)] == [False, False, False, True]
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    event = guard.restore(model, [optimizer], step=34)
    # The loss of step 31 measured the weights of step 30: that snapshot is not trusted, and it
    # leaves the window (a later merge must not use it either).
    assert event.steps_merged == [15, 20, 25] and event.onset == 31 and event.reason.startswith("loss spike")
    assert event.losses == [50.0] * 4 and event.steps_lost == 34 - 25 and "last losses [50, 50, 50, 50]" in str(event)
    assert window.steps == [15, 20, 25]
    assert_close_to_reference(model.state_dict(), reference_merge([states[s] for s in (15, 20, 25)], "sma"))
    assert len(optimizer.state) == 0 and all(p.grad is None for p in model.parameters())


def test_restore_errors_say_what_to_try():
    model = torch.nn.Linear(2, 1)
    window = CheckpointWindow(window=3)
    guard = SpikeGuard(window, RecoveryPolicy(max_restores=2, restore_span=100, on_exhausted="raise"))
    assert guard.observe(5, float("inf"))
    with pytest.raises(RecoveryError, match="no snapshot predates step 4"):
        guard.restore(model, step=5)
    window.snapshot(model, step=1)
    for step in (10, 20):
        assert guard.observe(step, float("nan"))
        guard.restore(model, step=step)
    assert guard.observe(30, float("nan"))
    with pytest.raises(
        RecoveryError, match=r"after 2 restores within 100 steps \(at steps \[10, 20\]\).*lower learning rate"
    ):
        guard.restore(model, step=30)
    guard.restore(model, step=200)  # outside the span: allowed again


@pytest.mark.parametrize("bad", [dict(patience=0), dict(lr_scale=0.0), dict(threshold=-1.0), dict(warmup=-1)])
def test_policy_validation(bad):
    with pytest.raises(ValueError, match="RecoveryPolicy"):
        RecoveryPolicy(**bad)
    with pytest.raises(ValueError, match="unknown RecoveryPolicy fields"):
        RecoveryPolicy.from_value({"treshold": 3})


# -- the Lightning callback -------------------------------------------------------------------------


def run(tmp_path, sabotage: InjectDivergence | None, recover=True, max_epochs=12, merge_at_end=True):
    """192 optimizer steps; the model ends with the merge of its last 8 snapshots (the product's
    output: raw weights of a noisy high-LR run swing too much to compare one step's worth; over
    seeds 0-3 the clean run's merged loss varies by about 15%)."""
    L.seed_everything(0)
    model = Regression()
    train, val = data(shuffle=True)
    averager = CheckpointAverager(window=8, every_n_steps=4, recover=recover, merge_at_end=merge_at_end, preview=False)
    callbacks = [averager] + ([sabotage] if sabotage else [])
    trainer(tmp_path, callbacks, max_epochs=max_epochs, limit_val_batches=0).fit(model, train)
    return model, averager, val


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    model, averager, val = run(tmp_path_factory.mktemp("clean"), None)
    return val_loss_of(model, val), averager


def test_clean_run_raises_no_alarm(clean):
    loss, averager = clean
    assert averager.recovery_events == [] and math.isfinite(loss)
    assert averager.guard.loss_level.seen == 192  # every optimizer step was judged


@pytest.mark.parametrize("mode", ["lr", "nan"])
def test_divergence_is_recovered_without_manual_action(tmp_path, clean, mode):
    clean_loss, _ = clean
    model, averager, val = run(tmp_path / "with", InjectDivergence({60, 61, 62}, mode, lr_factor=400))
    # The weights turn non-finite within 3 steps of the blast (at once for NaN batches): restored then.
    assert [e.step for e in averager.recovery_events][:1] in ([60], [61], [62], [63])
    assert all(max(e.steps_merged) < e.onset - 1 for e in averager.recovery_events)
    # One restore for the diverging learning rate; one per poisoned batch for the NaNs.
    assert len(averager.recovery_events) == (1 if mode == "lr" else 3)
    recovered = val_loss_of(model, val)
    # Close to the clean run, or better: the run restarts from a merged (averaged) point.
    assert math.isfinite(recovered) and recovered <= 1.15 * clean_loss

    # Without recovery the raw weights end in NaN or far off (its end-of-run merge would still skip
    # NaN snapshots, since the window rejects them, but every step after the spike is lost).
    unprotected, _, _ = run(
        tmp_path / "without", InjectDivergence({60, 61, 62}, mode, lr_factor=400), recover=False, merge_at_end=False
    )
    diverged = val_loss_of(unprotected, val)
    assert not math.isfinite(diverged) or diverged > 3 * clean_loss


def test_restore_limit_gives_up_with_a_warning_by_default(tmp_path):
    """No crash from the safety net: past the budget it warns, logs, and training goes on."""
    with pytest.warns(UserWarning, match="restore budget is spent, so recovery gives up"):
        _, averager, _ = run(tmp_path, InjectDivergence({30, 50, 70}), recover={"max_restores": 2})
    assert [(e.step, e.action) for e in averager.recovery_events] == [
        (30, "restored"),
        (50, "restored"),
        (70, "gave up"),
    ]
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "ckptavg/recovery_gave_up" in logged and "ckptavg/trigger_limit" in logged
    # No snapshot is taken at a step whose loss is NaN (after giving up too): the end-of-run merge is finite.
    assert averager.window.steps[-1] <= 70 and all(torch.isfinite(p).all() for p in averager.window.merge().values())


def test_restore_limit_raises_the_documented_error(tmp_path):
    policy = RecoveryPolicy(max_restores=2, restore_span=1000, on_exhausted="raise")
    with pytest.raises(RecoveryError, match="diverged again at step 70 .*after 2 restores"):
        run(tmp_path, InjectDivergence({30, 50, 70}), recover=policy)


def test_lr_is_scaled_after_a_restore_then_given_back(tmp_path):
    seen = {}

    class WatchLR(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen[trainer.global_step + 1] = optimizer.param_groups[0]["lr"]

    L.seed_everything(0)
    averager = CheckpointAverager(
        window=4, every_n_steps=4, recover={"lr_scale": 0.1, "lr_scale_steps": 3}, merge_at_end=False
    )
    train, _ = data()
    trainer(tmp_path, [averager, InjectDivergence({40}), WatchLR()], max_epochs=4, limit_val_batches=0).fit(
        Regression(), train
    )
    assert [e.step for e in averager.recovery_events] == [40]
    assert [seen[s] for s in (40, 41, 42, 43, 44)] == pytest.approx([0.05, 0.005, 0.005, 0.005, 0.05])


def test_resume_keeps_the_detector_history_and_restore_count(tmp_path):
    def fit(max_epochs, sabotage_steps, ckpt_path=None):
        L.seed_everything(0)
        averager = CheckpointAverager(window=4, every_n_steps=4, merge_at_end=False, preview=False)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        train, _ = data()
        run_ = trainer(tmp_path, [averager, InjectDivergence(sabotage_steps), checkpoint], max_epochs=max_epochs,
                       limit_val_batches=0, enable_checkpointing=True)  # fmt: skip
        run_.fit(Regression(), train, ckpt_path=ckpt_path)
        return averager

    first = fit(3, {30})
    assert [e.step for e in first.recovery_events] == [30]
    seen = first.guard.loss_level.seen
    # Two steps after the resume: a fresh detector would still be warming up and miss this spike.
    resumed = fit(6, {51}, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [e.step for e in resumed.recovery_events] == [30, 51]
    assert resumed.guard.loss_level.seen > seen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_classifier_whose_loss_goes_to_zero_is_never_restored(tmp_path, seed):
    """Issue 10: the digits classifier at batch 32 (median per-batch loss about 0.002, a batch with
    one misclassified example at 0.01 to 0.3) crashed with RecoveryError under the defaults."""
    L.seed_everything(seed)
    averager = CheckpointAverager(window=8, every_n_steps=12, preview=False)
    train, val = digits(batch_size=32)
    trainer(tmp_path, [averager], max_epochs=25, limit_val_batches=0).fit(DigitsClassifier(), train)
    assert averager.recovery_events == []
    assert averager.guard.loss_level.seen == 25 * 45  # every optimizer step was judged


class ScrambleWeights(Callback):
    """Before the given step's forward pass, add large (finite) noise to every weight: the loss
    jumps and stays high, the weights stay finite."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.add_(torch.randn_like(p))


class CountingRegression(Regression):
    """Updates a torchmetrics object and logs in training_step, and counts its calls."""

    def __init__(self):
        super().__init__(lr=0.005)  # slow enough that the scrambled weights stay finite and bad
        self.train_mae = torchmetrics.MeanAbsoluteError()
        self.examples_seen = torchmetrics.SumMetric()  # never reset: counts every update
        self.training_steps = 0

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        prediction = self(x)
        self.train_mae(prediction, y)
        self.examples_seen.update(torch.tensor(float(len(x))))
        self.log("train_mae", self.train_mae, on_step=True, on_epoch=False)
        return torch.nn.functional.mse_loss(prediction, y)


def test_restore_is_checked_on_the_current_batch_without_a_trace(tmp_path):
    """Before restoring, the callback scores the current batch with the current weights and with the
    stable point: the check logs nothing and leaves torchmetrics and the RNG as they were."""
    L.seed_everything(0)
    model = CountingRegression()
    averager = CheckpointAverager(window=8, every_n_steps=4, preview=False, merge_at_end=False)
    train, _ = data(shuffle=True)
    trainer(tmp_path, [averager, ScrambleWeights(120)], max_epochs=12, limit_val_batches=0, log_every_n_steps=1).fit(
        model, train
    )
    (event,) = averager.recovery_events
    assert event.action == "restored" and event.onset == 120 and event.steps_merged[-1] == 116
    assert event.stable_loss < event.batch_loss and math.isfinite(event.batch_loss)
    # training_step ran twice more (the check), but its metric updates and logging left no trace.
    assert model.training_steps == 192 + 2 and float(model.examples_seen.compute()) == 192 * 16
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train_mae")]
    assert len(rows) == 192 and len({row["step"] for row in rows}) == 192


def test_recover_false_has_no_guard(tmp_path):
    averager = CheckpointAverager(recover=False)
    assert averager.guard is None and averager.recovery_events == []


def test_ddp_spike_on_one_rank_restores_both_together(tmp_path):
    ranks = run_ranks("workers/ddp_lightning.py", tmp_path, "spike-on-rank-1")
    assert ranks[0]["restores"] == ranks[1]["restores"] == [12]
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][key], value), key
        assert torch.isfinite(value).all()


def test_policy_fields_go_in_recover():
    """One spelling (issue 12): the plain keyword arguments became top-level defaults under
    LightningCLI that silently overrode the recover mapping."""
    averager = CheckpointAverager(recover={"max_restores": 1, "lr_scale": 0.5, "lr_scale_steps": 10})
    assert (averager.recovery.max_restores, averager.recovery.lr_scale, averager.recovery.lr_scale_steps) == (
        1,
        0.5,
        10,
    )
    with pytest.raises(ValueError, match=r"unknown RecoveryPolicy fields \['max_restore'\]"):
        CheckpointAverager(recover={"max_restore": 2})
    with pytest.raises(TypeError, match="max_restores"):
        CheckpointAverager(max_restores=2)
