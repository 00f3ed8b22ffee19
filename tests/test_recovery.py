import math
import random

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ckptavg import CheckpointAverager, CheckpointWindow, RecoveryError, RecoveryPolicy, SpikeGuard
from ckptavg.testing import InjectDivergence
from conftest import assert_close_to_reference, reference_merge, run_ranks
from lit_helpers import DigitsClassifier, Regression, data, digits, trainer, val_loss_of


# -- the framework-free guard -----------------------------------------------------------------------


def noisy_losses(n: int, seed: int = 0) -> list[float]:
    """A decreasing loss with heavy, skewed mini-batch noise (occasional 2x outliers)."""
    rng = random.Random(seed)
    return [(2.0 / (1 + i / 200) + 0.5) * (1 + 0.15 * rng.gauss(0, 1) + (0.6 if rng.random() < 0.01 else 0)) for i in range(n)]


def test_no_false_alarm_on_ordinary_noisy_losses():
    for seed in range(5):
        guard = SpikeGuard(CheckpointWindow(window=2))
        for step, loss in enumerate(noisy_losses(5000, seed)):
            assert not guard.observe(step, loss), (seed, step, loss)
        assert guard.healthy


def test_spike_nan_and_patience():
    guard = SpikeGuard(CheckpointWindow(window=2), RecoveryPolicy(warmup=10, patience=2))
    for step in range(50):
        guard.observe(step, 1.0 + 0.01 * (step % 3))
    assert guard.observe(50, 10.0) is False and not guard.healthy  # abnormal, patience 2
    assert guard.observe(51, 0.99) is False and guard.healthy  # back to normal: a transient
    assert guard.observe(52, 10.0) is False
    assert guard.observe(53, 12.0) is True and guard.onset == 52
    fresh = SpikeGuard(CheckpointWindow(window=2), RecoveryPolicy(warmup=10, patience=5))
    assert fresh.observe(0, float("nan")) is True  # non-finite: at once, armed or not


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
    assert guard.observe(31, 50.0)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    event = guard.restore(model, [optimizer], step=31)
    # The loss of step 31 measured the weights of step 30: that snapshot is not trusted.
    assert event.steps_merged == [15, 20, 25] and event.onset == 31 and event.reason.startswith("loss spike")
    assert_close_to_reference(model.state_dict(), reference_merge([states[s] for s in (15, 20, 25)], "sma"))
    assert len(optimizer.state) == 0 and all(p.grad is None for p in model.parameters())


def test_restore_errors_say_what_to_try():
    model = torch.nn.Linear(2, 1)
    window = CheckpointWindow(window=3)
    guard = SpikeGuard(window, RecoveryPolicy(max_restores=2, restore_span=100))
    assert guard.observe(5, float("inf"))
    with pytest.raises(RecoveryError, match="no snapshot predates step 4"):
        guard.restore(model, step=5)
    window.snapshot(model, step=1)
    for step in (10, 20):
        assert guard.observe(step, float("nan"))
        guard.restore(model, step=step)
    assert guard.observe(30, float("nan"))
    with pytest.raises(RecoveryError, match=r"after 2 restores within 100 steps \(at steps \[10, 20\]\).*lower learning rate"):
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
    assert [e.step for e in averager.recovery_events][:1] in ([60], [61], [62])
    assert all(max(e.steps_merged) < e.onset - 1 for e in averager.recovery_events)
    # One restore for the diverging learning rate; one per poisoned batch for the NaNs.
    assert len(averager.recovery_events) == (1 if mode == "lr" else 3)
    recovered = val_loss_of(model, val)
    # Close to the clean run, or better: the run restarts from a merged (averaged) point.
    assert math.isfinite(recovered) and recovered <= 1.15 * clean_loss

    # Without recovery the raw weights end in NaN or far off (its end-of-run merge would still skip
    # NaN snapshots, since the window rejects them, but every step after the spike is lost).
    unprotected, _, _ = run(tmp_path / "without", InjectDivergence({60, 61, 62}, mode, lr_factor=400), recover=False, merge_at_end=False)
    diverged = val_loss_of(unprotected, val)
    assert not math.isfinite(diverged) or diverged > 3 * clean_loss


def test_restore_limit_raises_the_documented_error(tmp_path):
    policy = RecoveryPolicy(max_restores=2, restore_span=1000)
    with pytest.raises(RecoveryError, match="diverged again at step 70 .*after 2 restores"):
        run(tmp_path, InjectDivergence({30, 50, 70}), recover=policy)


def test_lr_is_scaled_after_a_restore_then_given_back(tmp_path):
    seen = {}

    class WatchLR(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen[trainer.global_step + 1] = optimizer.param_groups[0]["lr"]

    L.seed_everything(0)
    averager = CheckpointAverager(window=4, every_n_steps=4, recover={"lr_scale": 0.1, "lr_scale_steps": 3}, merge_at_end=False)
    train, _ = data()
    trainer(tmp_path, [averager, InjectDivergence({40}), WatchLR()], max_epochs=4, limit_val_batches=0).fit(Regression(), train)
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


def test_recover_false_has_no_guard(tmp_path):
    averager = CheckpointAverager(recover=False)
    assert averager.guard is None and averager.recovery_events == []


def test_ddp_spike_on_one_rank_restores_both_together(tmp_path):
    ranks = run_ranks("ddp_worker.py", tmp_path, "spike-on-rank-1")
    assert ranks[0]["restores"] == ranks[1]["restores"] == [12]
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][key], value), key
        assert torch.isfinite(value).all()


def test_policy_fields_as_plain_keyword_arguments():
    averager = CheckpointAverager(recover=True, max_restores=1, lr_scale=0.5, lr_scale_steps=10)
    assert (averager.recovery.max_restores, averager.recovery.lr_scale, averager.recovery.lr_scale_steps) == (1, 0.5, 10)
    assert CheckpointAverager(recover={"patience": 4}, threshold=9.0).recovery.threshold == 9.0
    with pytest.raises(ValueError, match=r"unknown RecoveryPolicy fields \['max_restore'\]"):
        CheckpointAverager(max_restore=2)
    with pytest.raises(ValueError, match="recover is off"):
        CheckpointAverager(recover=False, max_restores=2)
