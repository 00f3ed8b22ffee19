import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torchmetrics
from conftest import HANG_GUARD_S, assert_close_to_reference, reference_merge, run_ranks
from helpers.lit import Recorder, Regression, data, trainer, val_loss_of
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import load_file

from ckptavg import CheckpointAverager, CheckpointWindow, merge_state_dicts


def csv_rows(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("storage", ["cpu", "disk"])
@pytest.mark.parametrize("method", ["sma", "wma", "ema"])
def test_end_of_run_merge_equals_an_independent_average(tmp_path, storage, method):
    L.seed_everything(0)
    recorder = Recorder()
    averager = CheckpointAverager(window=4, every_n_steps=5, merge=method, alpha=0.3, storage=storage)
    model = Regression()
    train, val = data()
    trainer(tmp_path, [recorder, averager], max_epochs=3).fit(model, train, val)

    steps = averager.window.steps
    assert steps == [30, 35, 40, 45]  # 16 batches per epoch, 48 optimizer steps
    reference = reference_merge([recorder.states[s] for s in steps], method, alpha=0.3)
    assert_close_to_reference(model.state_dict(), reference)

    path = tmp_path / "lightning_logs" / "version_0" / "ckptavg" / "merged.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        assert json.loads(metadata["steps"]) == steps and metadata["method"] == method
        assert json.loads(metadata["coefficients"]) == pytest.approx(averager.window.weights(method, 0.3))
        for key, value in model.state_dict().items():
            assert torch.equal(f.get_tensor(key), value)


class PreviewChecker(Callback):
    """After the averager: checks merged/val_loss against a copy of the model loaded with an
    independent merge of the recorded weights, and that the module still holds its raw weights."""

    def __init__(self, recorder: Recorder, averager: CheckpointAverager, val):
        self.recorder, self.averager, self.val = recorder, averager, val
        self.checked = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        raw_step, raw_state = self.recorder.at_validation[-1]
        for key, value in pl_module.state_dict().items():
            assert torch.equal(value, raw_state[key]), key
        merged = merge_state_dicts([self.recorder.states[s] for s in self.averager.window.steps])
        twin = copy.deepcopy(pl_module)
        twin.load_state_dict(merged)
        expected = val_loss_of(twin, self.val)
        assert float(trainer.callback_metrics["merged/val_loss"]) == pytest.approx(expected, rel=1e-5)
        # A torchmetrics object logged by the module: its state from the raw run must not leak in.
        with torch.no_grad():
            twin.eval()
            expected_mae = torch.cat([(twin(x) - y).abs().flatten() for x, y in self.val]).mean()
        assert float(trainer.callback_metrics["merged/val_mae"]) == pytest.approx(float(expected_mae), rel=1e-5)
        self.checked.append(raw_step)


def test_preview_logs_the_merged_models_metrics(tmp_path):
    L.seed_everything(0)
    recorder = Recorder()
    averager = CheckpointAverager(window=3, every_n_steps=6, merge_at_end=False)
    train, val = data()
    checker = PreviewChecker(recorder, averager, val)
    trainer(tmp_path, [recorder, averager, checker], max_epochs=4, val_check_interval=8).fit(Regression(), train, val)
    # Validation every 8 steps; the first one (step 8) sees one snapshot (step 6): its "merge".
    assert checker.checked == [8, 16, 24, 32, 40, 48, 56, 64]
    rows = csv_rows(tmp_path)
    raw_steps = [r["step"] for r in rows if r.get("val_loss")]
    merged_steps = [r["step"] for r in rows if r.get("merged/val_loss")]
    assert merged_steps == raw_steps  # logged at the very step of the raw metrics
    assert all(r.get("merged/val_mae") for r in rows if r.get("merged/val_loss"))


def run_for_identity(tmp_path: Path, preview: bool):
    L.seed_everything(123)
    model = Regression(dropout=0.2)  # dropout and shuffling: any RNG draw by the preview would show
    train, val = data(shuffle=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2)
    averager = CheckpointAverager(window=3, every_n_steps=4, preview=preview, merge_at_end=False)
    trainer(tmp_path, [averager, checkpoint], max_epochs=3, val_check_interval=8, enable_checkpointing=True).fit(
        model, train, val
    )
    raw = [(r["step"], r["val_loss"], r["val_mae"]) for r in csv_rows(tmp_path) if r.get("val_loss")]
    return model, raw, checkpoint


def test_preview_leaves_training_and_raw_metrics_exactly_as_without_it(tmp_path):
    with_model, with_raw, with_ckpt = run_for_identity(tmp_path / "with", preview=True)
    without_model, without_raw, without_ckpt = run_for_identity(tmp_path / "without", preview=False)
    assert with_raw == without_raw and len(with_raw) == 6
    for key, value in without_model.state_dict().items():
        assert torch.equal(with_model.state_dict()[key], value), key
    assert with_ckpt.best_model_score == without_ckpt.best_model_score
    assert Path(with_ckpt.best_model_path).name == Path(without_ckpt.best_model_path).name
    assert any(r.get("merged/val_loss") for r in csv_rows(tmp_path / "with"))


def test_final_raw_and_merged_metrics_side_by_side(tmp_path):
    L.seed_everything(0)
    averager = CheckpointAverager(window=4, every_n_steps=4)
    model = Regression()
    train, val = data()
    trainer(tmp_path, [averager], max_steps=40, val_check_interval=16).fit(model, train, val)
    # The last validation ran at step 32, before the final snapshots: both are evaluated again.
    assert set(averager.final_metrics) == {"raw", "merged"}
    assert averager.final_metrics["merged"]["val_loss"] == pytest.approx(val_loss_of(model, val), rel=1e-5)
    last = {r for r in csv_rows(tmp_path)[-1] if csv_rows(tmp_path)[-1][r]}
    assert {"final/raw/val_loss", "final/merged/val_loss", "final/raw/val_mae"} <= last


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    L.seed_everything(0)
    recorder = Recorder()
    averager = CheckpointAverager(window=10, every_n_steps=2, start_step=3)
    model = Regression()
    train, val = data()
    trainer(tmp_path, [recorder, averager], max_epochs=2, accumulate_grad_batches=4, limit_val_batches=0).fit(
        model, train
    )
    # 16 batches per epoch / 4 = 4 optimizer steps per epoch, 8 in all; first snapshot after step 3.
    assert averager.window.steps == [4, 6, 8]
    assert_close_to_reference(model.state_dict(), reference_merge([recorder.states[s] for s in (4, 6, 8)], "sma"))


def test_default_cadence_fills_the_window_over_the_last_tenth_of_the_run(tmp_path):
    """Issue 12: the old default (every epoch) took one snapshot in a step-based run (max_steps,
    one long epoch), never previewed, and "merged" one snapshot, silently."""
    averager = CheckpointAverager(window=8)
    train, val = data(n_train=6400)  # 400 batches: one epoch
    trainer(tmp_path / "steps", [averager], max_steps=400).fit(Regression(), train, val)
    assert averager.window.steps == list(range(365, 401, 5))  # every 400 // 80 steps
    assert any(r.get("merged/val_loss") for r in csv_rows(tmp_path / "steps"))
    epochs = CheckpointAverager(window=5)
    trainer(tmp_path / "epochs", [epochs], max_epochs=3, limit_val_batches=0).fit(Regression(), data()[0])
    assert epochs.window.steps == [44, 45, 46, 47, 48]  # 48 steps, a window of 5: every step


def test_a_window_that_cannot_fit_is_refused_at_fit_start(tmp_path):
    steps = []

    class Steps(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    # 321 float32 weights: 1.3 KiB a snapshot; 10^8 of them do not fit in this machine's memory.
    with pytest.raises(
        ValueError, match=r"a window of 100000000 snapshots of 1.3 KiB needs 119.6 GiB of host memory.*storage='disk'"
    ):
        trainer(tmp_path, [CheckpointAverager(window=100_000_000, every_n_steps=1), Steps()], max_steps=4).fit(
            Regression(), data()[0]
        )
    assert steps == []


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_stop_and_resume_is_bit_identical(tmp_path, storage):
    def run(root: Path, max_epochs: int, ckpt_path=None):
        L.seed_everything(7)
        model = Regression()
        train, val = data()
        averager = CheckpointAverager(window=8, every_n_steps=5, storage=storage)
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        trainer(root, [averager, checkpoint], max_epochs=max_epochs, enable_checkpointing=True).fit(
            model, train, val, ckpt_path=ckpt_path
        )
        return model, averager

    uninterrupted, _ = run(tmp_path / "a", max_epochs=4)
    stopped, first = run(tmp_path / "b", max_epochs=2)  # 32 steps: 6 of 8 snapshots, between two
    assert first.window.steps == [5, 10, 15, 20, 25, 30]
    # A fresh process would start from the checkpoint file alone: load it with weights_only.
    state = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert any("CheckpointAverager" in key for key in state["callbacks"])
    resumed, second = run(tmp_path / "b", max_epochs=4, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert second.window.steps == [25, 30, 35, 40, 45, 50, 55, 60]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_a_chain_of_resumes_ends_like_an_uninterrupted_run(tmp_path, storage):
    """Issue 11: with the disk tier and Lightning's versioned log dirs, the second resume failed
    (the first resume recorded its own new log dir, not the folder holding the files)."""

    def run(root: Path, max_epochs: int, ckpt_path=None, name="ckpt"):
        L.seed_everything(7)
        model = Regression()
        train, val = data()
        averager = CheckpointAverager(window=8, every_n_steps=5, storage=storage)
        checkpoint = ModelCheckpoint(dirpath=root / name, save_last=True)
        trainer(root, [averager, checkpoint], max_epochs=max_epochs, enable_checkpointing=True).fit(
            model, train, val, ckpt_path=ckpt_path
        )
        return model, averager

    uninterrupted, whole = run(tmp_path / "a", max_epochs=4)
    run(tmp_path / "b", max_epochs=2, name="ckpt1")
    run(tmp_path / "b", max_epochs=3, ckpt_path=tmp_path / "b" / "ckpt1" / "last.ckpt", name="ckpt2")
    resumed, last = run(tmp_path / "b", max_epochs=4, ckpt_path=tmp_path / "b" / "ckpt2" / "last.ckpt", name="ckpt3")
    assert last.window.steps == whole.window.steps == [25, 30, 35, 40, 45, 50, 55, 60]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


class WithBuffer(Regression):
    def __init__(self):
        super().__init__()
        self.strict_loading = False
        self.register_buffer("extra", torch.zeros(3))


@pytest.mark.parametrize(
    "before, after", [(Regression, WithBuffer), (WithBuffer, Regression)], ids=["added", "removed"]
)
def test_a_model_that_changed_is_reported_at_resume_not_steps_later(tmp_path, before, after):
    train, val = data()
    L.seed_everything(0)
    first = CheckpointAverager(window=4, every_n_steps=2)
    trainer(
        tmp_path,
        [first, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        max_epochs=1,
        enable_checkpointing=True,
    ).fit(before(), train, val)
    steps = []

    class Steps(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    resumed = after()
    resumed.strict_loading = False
    with pytest.raises(
        ValueError, match=r"the model being resumed .*key 'extra'.*Resume with that model, or start a new window"
    ):
        trainer(tmp_path, [CheckpointAverager(window=4, every_n_steps=2), Steps()], max_epochs=2).fit(
            resumed, train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert steps == []  # reported before any training step


def test_forks_from_one_checkpoint_each_keep_their_own_window(tmp_path):
    """Issue 11: two runs forked from one checkpoint (Lightning's versioned log dirs) wrote into the
    base run's folder under the same names. Each fork now starts its own folder from hard links to
    the snapshots it inherits; the base window is only read, also while its writer still runs."""
    train, val = data()
    L.seed_everything(0)
    base_recorder = Recorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    base = CheckpointAverager(window=6, every_n_steps=8, storage="disk")
    trainer(tmp_path, [base_recorder, base, checkpoints], max_epochs=3, enable_checkpointing=True).fit(
        Regression(), train, val
    )
    base_folder = tmp_path / "lightning_logs" / "version_0" / "ckptavg" / "window"
    files_of = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".lock"}  # noqa: E731
    before = files_of(base_folder)
    assert CheckpointWindow.open(base_folder, readonly=True).steps == [8, 16, 24, 32, 40, 48]

    still_writing = CheckpointWindow.open(base_folder)  # the base run's writer, still alive
    try:
        for version, lr in ((1, 0.01), (2, 0.02)):
            L.seed_everything(0)
            recorder, fork = Recorder(), CheckpointAverager(window=6, every_n_steps=8, storage="disk")
            model = Regression(lr=lr)
            trainer(tmp_path, [recorder, fork], max_epochs=3).fit(
                model, train, val, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=16.ckpt"
            )
            folder = tmp_path / "lightning_logs" / f"version_{version}" / "ckptavg" / "window"
            assert fork.window.dirpath == folder and fork.window.steps == [8, 16, 24, 32, 40, 48]
            for step in (8, 16):
                name = f"snapshot-{step:012d}.safetensors"
                assert (folder / name).stat().st_ino == (base_folder / name).stat().st_ino  # linked, not copied
            snapshots = [base_recorder.states[8], base_recorder.states[16]] + [
                recorder.states[s] for s in (24, 32, 40, 48)
            ]
            assert_close_to_reference(model.state_dict(), reference_merge(snapshots, "sma"))
    finally:
        still_writing.close()
    assert files_of(base_folder) == before


def test_a_fork_pointed_at_a_finished_runs_folder_is_refused_at_fit_start(tmp_path):
    train, val = data()
    out = tmp_path / "out"
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    averager = CheckpointAverager(window=6, every_n_steps=8, storage="disk", dirpath=out)
    trainer(tmp_path, [averager, checkpoints], max_epochs=3, enable_checkpointing=True).fit(Regression(), train, val)
    before = {p.name: p.read_bytes() for p in (out / "window").iterdir() if p.name != ".lock"}
    steps = []

    class Steps(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    fork = CheckpointAverager(window=6, every_n_steps=8, storage="disk", dirpath=out)
    with pytest.raises(
        ValueError, match=r"finished at step 48.*would delete its snapshots of steps \[24, 32, 40, 48\].*own dirpath"
    ):
        trainer(tmp_path, [fork, Steps()], max_epochs=3).fit(
            Regression(lr=0.01), train, val, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=16.ckpt"
        )
    assert steps == []
    assert {p.name: p.read_bytes() for p in (out / "window").iterdir() if p.name != ".lock"} == before
    # Training on from the finished run's last checkpoint continues its window in place.
    more = CheckpointAverager(window=6, every_n_steps=8, storage="disk", dirpath=out)
    trainer(tmp_path, [more], max_epochs=4).fit(
        Regression(), train, val, ckpt_path=tmp_path / "ckpt" / "epoch=2-step=48.ckpt"
    )
    assert more.window.steps == [24, 32, 40, 48, 56, 64]


def test_a_rerun_into_an_occupied_folder_is_refused_at_fit_start(tmp_path):
    train, val = data()
    trainer(
        tmp_path,
        [CheckpointAverager(window=4, every_n_steps=2, storage="disk", dirpath=tmp_path / "out")],
        max_epochs=1,
    ).fit(Regression(), train, val)
    steps = []

    class Steps(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    with pytest.raises(
        FileExistsError, match=r"already holds a checkpoint window from an earlier run. Resume that run"
    ):
        again = CheckpointAverager(window=4, every_n_steps=2, storage="disk", dirpath=tmp_path / "out")
        trainer(tmp_path, [again, Steps()], max_epochs=1).fit(Regression(), train, val)
    assert steps == []
    assert CheckpointWindow.open(tmp_path / "out" / "window", readonly=True).steps == [10, 12, 14, 16]  # untouched


def test_a_failed_fit_frees_its_disk_window_for_the_next_run(tmp_path):
    """Lightning skips teardown when fit raises: the folder's writer lock must not outlive the run."""
    L.seed_everything(0)
    averager = CheckpointAverager(window=4, every_n_steps=2, storage="disk", dirpath=tmp_path / "out", preview=False)
    train, val = data()
    with pytest.raises(RuntimeError, match="validation failed on purpose"):
        trainer(tmp_path, [averager], max_epochs=2).fit(Regression(fail_after_val_calls=4), train, val)
    assert averager.window.steps == [10, 12, 14, 16]  # still readable
    with CheckpointWindow.open(tmp_path / "out" / "window") as reopened:  # a new writer is welcome
        assert reopened.steps == [10, 12, 14, 16]


def test_exception_inside_the_preview_leaves_raw_weights_intact(tmp_path):
    L.seed_everything(0)
    recorder = Recorder()
    averager = CheckpointAverager(window=3, every_n_steps=2)
    # 4 validation batches per run: the raw run at step 8 passes, the preview that follows fails.
    model = Regression(fail_after_val_calls=4)
    train, val = data()
    with pytest.raises(RuntimeError, match="validation failed on purpose"):
        trainer(tmp_path, [recorder, averager], max_epochs=3, num_sanity_val_steps=0, val_check_interval=8).fit(
            model, train, val
        )
    step, raw = recorder.at_validation[-1]
    assert step == 8 and len(averager.window) >= 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw[key]), key


def test_no_snapshot_keeps_raw_weights_and_warns(tmp_path):
    averager = CheckpointAverager(window=3, every_n_steps=1000)
    model = Regression()
    with pytest.warns(UserWarning, match="no snapshot was taken"):
        trainer(tmp_path, [averager], max_steps=5, limit_val_batches=0).fit(model, data()[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=0), "window must be a positive integer"),
        (dict(every_n_steps=0), "every_n_steps must be a positive integer"),
        (dict(every_n_steps=5, every_n_epochs=1), "not both"),
        (dict(start_step=-1), "start_step"),
        (dict(merge="median"), "unknown merge method"),
        (dict(alpha=2.0), r"alpha must be in \(0, 1\]"),
        (dict(storage="gpu"), "storage must be"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CheckpointAverager(**kwargs)


def test_ddp_two_processes(tmp_path):
    ranks = run_ranks("workers/ddp_lightning.py", tmp_path)
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][key], value), key
    assert ranks[0]["steps"] == ranks[1]["steps"] == [10, 12, 14, 16]  # 8 batches per rank per epoch
    # Every rank ran the preview (the module logs without sync_dist: each rank sees its own shard).
    assert ranks[0]["merged_val_loss"] is not None and ranks[1]["merged_val_loss"] is not None
    assert (tmp_path / "out" / "merged.safetensors").exists()
    # Only rank 0 logs: one metrics file, with the preview in it.
    assert len(list(tmp_path.glob("**/metrics.csv"))) == 1
    assert any(r.get("merged/val_loss") for r in csv_rows(tmp_path))


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_ddp_spread_window_resumes_from_a_checkpoint(tmp_path, storage):
    # Each rank keeps half of the window; a run stopped after 2 epochs and resumed by a new Trainer
    # ends bit for bit like the uninterrupted run, with the same window.
    ranks = run_ranks("workers/ddp_lightning.py", tmp_path, f"resume-{storage}")
    for rank in ranks:
        assert rank["steps_a"] == rank["steps_b"] == [18, 20, 22, 24]
        assert rank["stored_numel"] <= rank["full_numel"] / 2 + 64
        for key, value in ranks[0]["weights_a"].items():
            assert torch.equal(rank["weights_b"][key], value), key
        for key, value in ranks[0]["merge_a"].items():
            assert torch.equal(rank["merge_b"][key], value), key
    assert (tmp_path / "b" / "out" / "merged.safetensors").exists()


def test_spread_window_resumes_in_a_single_process(tmp_path):
    # A 2-process DDP run's spread window (every rank's half in the checkpoint) resumes in one
    # process: the merge at the end covers snapshots from both runs.
    ranks = run_ranks("workers/ddp_lightning.py", tmp_path, "resize")
    assert ranks[0]["steps"] == [10, 12, 14, 16]
    L.seed_everything(0)
    model = Regression()
    recorder, averager = (
        Recorder(),
        CheckpointAverager(window=4, every_n_steps=2, storage="cpu", dirpath=tmp_path / "out", recover=False),
    )
    train, val = data()
    trainer(tmp_path / "single", [recorder, averager], max_steps=18).fit(
        model, train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert averager.window.steps == [12, 14, 16, 18] and averager.window.sharding is None
    snapshots = [ranks[0]["states"][s] for s in (12, 14, 16)] + [recorder.states[18]]
    assert_close_to_reference(model.state_dict(), reference_merge(snapshots, "sma"))


def test_reusing_the_callback_for_a_new_run_starts_a_new_window(tmp_path):
    averager = CheckpointAverager(window=3, every_n_steps=4)
    trainer(tmp_path / "a", [averager], max_steps=12, limit_val_batches=0).fit(Regression(), data()[0])
    assert averager.window.steps == [4, 8, 12]
    with pytest.warns(UserWarning, match="starting a new window"):
        trainer(tmp_path / "b", [averager], max_steps=8, limit_val_batches=0).fit(Regression(), data()[0])
    assert averager.window.steps == [4, 8]


def test_two_averagers_keep_separate_state_through_a_checkpoint(tmp_path):
    L.seed_everything(0)
    sma = CheckpointAverager(window=2, every_n_steps=4, merge_at_end=False)
    ema = CheckpointAverager(
        window=3, every_n_steps=8, merge="ema", merge_at_end=False, recover=False
    )  # one guard restores
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [sma, ema, checkpoint], max_epochs=2, limit_val_batches=0, enable_checkpointing=True).fit(
        Regression(), data()[0]
    )
    assert sma.state_key != ema.state_key
    sma2 = CheckpointAverager(window=2, every_n_steps=4, merge_at_end=False)
    ema2 = CheckpointAverager(window=3, every_n_steps=8, merge="ema", merge_at_end=False, recover=False)
    trainer(tmp_path, [sma2, ema2], max_epochs=2, limit_val_batches=0).fit(
        Regression(), data()[0], ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert (sma2.window.steps, ema2.window.steps) == ([28, 32], [16, 24, 32])


class ManyWaysToLog(Regression):
    """Logs validation metrics every way Lightning allows: a tensor with sync_dist, torchmetrics
    objects, a MetricCollection, on_step and on_epoch, over two dataloaders."""

    def __init__(self):
        super().__init__()
        self.mse = torch.nn.ModuleList([torchmetrics.MeanSquaredError() for _ in range(2)])
        self.collections = torch.nn.ModuleList(
            [
                torchmetrics.MetricCollection(
                    {"mae": torchmetrics.MeanAbsoluteError(), "mse": torchmetrics.MeanSquaredError()}, prefix="coll_"
                )
                for _ in range(2)
            ]
        )

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        prediction = self(x)
        loss = torch.nn.functional.mse_loss(prediction, y)
        self.log("val_loss", loss, sync_dist=True)
        self.mse[dataloader_idx](prediction, y)
        self.log("val_mse", self.mse[dataloader_idx])
        collection = self.collections[dataloader_idx]
        collection(prediction, y)
        self.log_dict(collection)
        self.log("val_steps", loss, on_step=True, on_epoch=True)


def expected_metrics(model: torch.nn.Module, loaders) -> dict[str, float]:
    """What each key would read for ``model``'s weights, computed independently."""
    out = {}
    with torch.no_grad():
        model.eval()
        for k, loader in enumerate(loaders):
            errors = [model(x) - y for x, y in loader]
            batch_mse = [float(e.pow(2).mean()) for e in errors]
            every = torch.cat([e.flatten() for e in errors])
            suffix = f"/dataloader_idx_{k}"
            out |= {
                "val_loss" + suffix: sum(batch_mse) / len(batch_mse), "val_steps_epoch" + suffix: sum(batch_mse) / len(batch_mse),
                "val_steps" + suffix: sum(batch_mse) / len(batch_mse), "val_mse" + suffix: float(every.pow(2).mean()),
                "coll_mse" + suffix: float(every.pow(2).mean()), "coll_mae" + suffix: float(every.abs().mean()),
            }  # fmt: skip
    return out


def test_merged_metrics_equal_an_independent_evaluation_however_they_are_logged(tmp_path):
    """Issue 11: a torchmetrics object's state from the raw validation leaked into the merged one
    (merged/val_mse was the mean of the raw and the merged runs)."""
    L.seed_everything(0)
    recorder = Recorder()
    averager = CheckpointAverager(window=3, every_n_steps=4)
    train, val = data()
    _, second = data(seed=1)
    loaders = [val, second]
    seen = []

    class Check(Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking or "merged/val_loss/dataloader_idx_0" not in trainer.callback_metrics:
                return
            twin = copy.deepcopy(pl_module)
            twin.load_state_dict(merge_state_dicts([recorder.states[s] for s in averager.window.steps]))
            expected = expected_metrics(twin, loaders)
            got = {
                k.removeprefix("merged/"): float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("merged/")
            }
            assert set(got) == set(expected)
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-5), key
            raw = expected_metrics(pl_module, loaders)  # the raw metrics are untouched
            for key, value in raw.items():
                assert float(trainer.callback_metrics[key]) == pytest.approx(value, rel=1e-5), key
            seen.append(trainer.global_step)

    model = ManyWaysToLog()
    trainer(tmp_path, [recorder, averager, Check()], max_epochs=3, val_check_interval=0.5).fit(model, train, loaders)
    assert seen == [8, 16, 24, 32, 40, 48]
    # The end of the run: the module holds the merged weights; final/merged/... measured them.
    expected = expected_metrics(model, loaders)
    assert averager.final_metrics["merged"] == pytest.approx(
        {k: expected[k] for k in averager.final_metrics["merged"]}, rel=1e-5
    )
    assert set(averager.final_metrics["merged"]) == set(expected)


def test_the_end_of_run_export_never_writes_through_a_planted_link(tmp_path):
    """The neighbour of issue 11's planted *.tmp symlinks: merged.safetensors is written through a
    temporary name too."""
    out = tmp_path / "out"
    out.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (out / "merged.safetensors.tmp").symlink_to(precious)
    train, val = data()
    trainer(tmp_path, [CheckpointAverager(window=4, every_n_steps=4, dirpath=out)], max_epochs=1).fit(
        Regression(), train, val
    )
    assert precious.read_text() == "keep me"
    assert not (out / "merged.safetensors").is_symlink() and not (out / "merged.safetensors.tmp").exists()
    with safe_open(str(out / "merged.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["steps"]) == [4, 8, 12, 16]


@pytest.mark.parametrize("averager_first", [True, False], ids=["averager-first", "averager-last"])
def test_stock_callbacks_monitor_merged_metrics_in_any_order(tmp_path, averager_first):
    """Issue 12: ModelCheckpoint/EarlyStopping(monitor="merged/val_loss") crashed on any validation
    before the window held two snapshots (the defaults: epoch 0), and EarlyStopping listed before
    the averager read the previous validation's value. The best checkpoint's merged weights come
    out in one call and score what the checkpoint was ranked by."""
    from lightning.pytorch.callbacks import EarlyStopping

    from ckptavg import load_merged_weights

    L.seed_everything(0)
    train, val = data()
    averager = CheckpointAverager(window=3, every_n_epochs=1)
    stopping = EarlyStopping(monitor="merged/val_loss", patience=100, strict=True)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="merged/val_loss", save_top_k=1, filename="best")
    callbacks = [averager, stopping, best] if averager_first else [stopping, best, averager]
    trainer(tmp_path, callbacks, max_epochs=5, num_sanity_val_steps=0, enable_checkpointing=True).fit(
        Regression(), train, val
    )

    merged = [float(r["merged/val_loss"]) for r in csv_rows(tmp_path) if r.get("merged/val_loss")]
    raw = [float(r["val_loss"]) for r in csv_rows(tmp_path) if r.get("val_loss")]
    assert len(merged) == len(raw) == 5
    assert merged[0] == raw[0]  # before the first snapshot the averager would leave the weights as they are
    assert float(stopping.best_score) == pytest.approx(min(merged), rel=1e-6)  # the current validation's value
    assert float(best.best_model_score) == pytest.approx(min(merged), rel=1e-6)
    twin = Regression()
    twin.load_state_dict(load_merged_weights(best.best_model_path))
    assert val_loss_of(twin, val) == pytest.approx(float(best.best_model_score), rel=1e-5)


def test_merged_weights_of_a_disk_window_checkpoint_and_of_one_before_any_snapshot(tmp_path):
    from ckptavg import load_merged_weights

    L.seed_everything(0)
    train, val = data()
    recorder = Recorder()
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=8)
    averager = CheckpointAverager(window=8, every_n_steps=10, storage="disk")
    trainer(tmp_path, [recorder, averager, every], max_steps=40, enable_checkpointing=True, limit_val_batches=0).fit(
        Regression(), train
    )
    # At step 8 the window was empty: the merged weights are the checkpoint's own.
    early = torch.load(tmp_path / "ckpt" / "epoch=0-step=8.ckpt", weights_only=True)["state_dict"]
    for key, value in load_merged_weights(tmp_path / "ckpt" / "epoch=0-step=8.ckpt").items():
        assert torch.equal(value, early[key]), key
    # At step 32 the window held steps 10, 20, 30 (the disk window has since moved on to 40).
    assert_close_to_reference(
        load_merged_weights(tmp_path / "ckpt" / "epoch=1-step=32.ckpt"),
        reference_merge([recorder.states[s] for s in (10, 20, 30)], "sma"),
    )
    with pytest.raises(ValueError, match=r"holds no CheckpointAverager state"):
        torch.save({"state_dict": early, "callbacks": {}}, tmp_path / "plain.ckpt")
        load_merged_weights(tmp_path / "plain.ckpt")
    # The same from the command line.
    script = str(Path(sys.executable).parent / "ckptavg")
    done = subprocess.run([script, "export", str(tmp_path / "ckpt" / "epoch=1-step=32.ckpt"), "-o", str(tmp_path / "best.safetensors")],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert done.returncode == 0, done.stderr
    exported = load_file(str(tmp_path / "best.safetensors"))
    expected = load_merged_weights(tmp_path / "ckpt" / "epoch=1-step=32.ckpt")
    assert set(exported) == set(expected) and all(torch.equal(exported[k], expected[k]) for k in expected)
    done = subprocess.run(
        [script, "export", str(tmp_path / "plain.ckpt"), "-o", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 2 and "holds no CheckpointAverager state" in done.stderr


def test_merge_and_decay_arguments_are_checked_at_construction():
    with pytest.raises(
        ValueError,
        match=r"merge must be a merge method's name \(\[.*'sma'.*\]\), got \[1, 2, 3, 4\]\. Explicit weights.*CheckpointWindow.merge",
    ):
        CheckpointAverager(merge=[1, 2, 3, 4])
    assert CheckpointAverager(merge="ema", decay=0.75).alpha == pytest.approx(0.25)
    with pytest.raises(ValueError, match="give alpha or decay, not both"):
        CheckpointAverager(merge="ema", alpha=0.3, decay=0.7)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="decay must be in"):
            CheckpointAverager(merge="ema", decay=bad)


def test_resuming_a_checkpoint_taken_at_max_steps_still_ends_with_the_merged_model(tmp_path):
    """Issue 12: fit() from a checkpoint at max_steps runs no training loop, and skipped the
    end-of-run merge silently (the model stayed raw)."""
    L.seed_everything(0)
    train, val = data()
    first = Regression()
    averager = CheckpointAverager(window=4, every_n_steps=4)
    trainer(
        tmp_path,
        [averager, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        max_steps=32,
        enable_checkpointing=True,
    ).fit(first, train, val)
    again = Regression()
    trainer(tmp_path, [CheckpointAverager(window=4, every_n_steps=4)], max_steps=32).fit(
        again, train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def merged_is_worse_run(tmp_path, keep):
    L.seed_everything(0)
    train, val = data()
    recorder, model = Recorder(), Regression(lr=0.02)
    # A window over every step from the start: its average includes the untrained weights.
    averager = CheckpointAverager(window=48, every_n_steps=1, keep=keep, recover=False)
    trainer(tmp_path, [recorder, averager], max_epochs=3).fit(model, train, val)
    return recorder, averager, model, val


def test_merged_weights_that_score_worse_are_reported_and_keep_best_keeps_the_raw_ones(tmp_path):
    with pytest.warns(UserWarning, match=r"the merged weights score worse than the raw ones on val_loss .*keep='best'"):
        recorder, averager, model, val = merged_is_worse_run(tmp_path / "merged", keep="merged")
    assert averager.final_metrics["merged"]["val_loss"] > averager.final_metrics["raw"]["val_loss"]
    assert val_loss_of(model, val) == pytest.approx(averager.final_metrics["merged"]["val_loss"], rel=1e-5)

    with pytest.warns(
        UserWarning, match=r"score worse than the raw ones on val_loss .*the module keeps its raw weights"
    ):
        recorder, averager, model, val = merged_is_worse_run(tmp_path / "best", keep="best")
    for key, value in recorder.states[48].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert averager.merged_path is not None and averager.merged_path.name == "merged.safetensors"
    with safe_open(str(averager.merged_path), framework="pt") as f:
        assert json.loads(f.metadata()["steps"]) == list(range(1, 49))  # the merged model is still written


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        return self.head(self.embed(tokens))


class TiedModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.compile(TiedLM(), backend="eager")  # names gain "_orig_mod."

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return torch.nn.functional.cross_entropy(self.model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_export_module_gives_a_file_that_loads_into_the_bare_model(tmp_path):
    """Issue 12: the export kept the LightningModule's prefixes (and torch.compile's _orig_mod.)
    and stored tied weights twice; it now loads into the model on its own."""
    from safetensors.torch import load_model
    from torch.utils.data import DataLoader, TensorDataset

    tokens = torch.randint(0, 16, (64, 9), generator=torch.Generator().manual_seed(0))
    recorder, module = Recorder(), TiedModule()
    averager = CheckpointAverager(window=4, every_n_steps=2, export_module="model", recover=False)
    trainer(tmp_path, [recorder, averager], max_steps=8).fit(module, DataLoader(TensorDataset(tokens), batch_size=8))
    with safe_open(str(averager.merged_path), framework="pt") as f:
        assert sorted(f.keys()) in (["embed.weight"], ["head.weight"]) and f.metadata()["module"] == "model"
    bare = TiedLM()
    load_model(bare, str(averager.merged_path))
    reference = reference_merge([recorder.states[s] for s in (2, 4, 6, 8)], "sma")
    assert_close_to_reference(
        {"embed.weight": bare.embed.weight.detach()}, {"embed.weight": reference["model._orig_mod.embed.weight"]}
    )
    assert bare.head.weight is bare.embed.weight
    with pytest.raises(
        ValueError, match=r"export_module='modle' is not a submodule of TiedModule \(its children: \['model'\]\)"
    ):
        trainer(tmp_path, [CheckpointAverager(export_module="modle")], max_steps=2).fit(
            TiedModule(), DataLoader(TensorDataset(tokens), batch_size=8)
        )


def test_the_callback_takes_any_registered_method_with_its_options(tmp_path):
    from ckptavg import coefficients

    L.seed_everything(0)
    recorder, model = Recorder(), Regression()
    averager = CheckpointAverager(window=4, every_n_steps=4, merge="decay", merge_options={"shape": "cosine"})
    train, val = data()
    trainer(tmp_path, [recorder, averager], max_epochs=2).fit(model, train, val)
    steps = averager.window.steps
    weights = coefficients("decay", steps, shape="cosine")
    assert_close_to_reference(model.state_dict(), reference_merge([recorder.states[s] for s in steps], weights))
    with safe_open(str(averager.merged_path), framework="pt") as f:
        assert f.metadata()["method"] == "decay" and json.loads(f.metadata()["options"]) == {"shape": "cosine"}
        assert json.loads(f.metadata()["coefficients"]) == pytest.approx(weights)
    with pytest.raises(ValueError, match="merge method 'decay' has no option 'shap'"):
        CheckpointAverager(merge="decay", merge_options={"shap": "cosine"})
    with pytest.raises(ValueError, match="unknown merge method 'median'"):
        CheckpointAverager(merge="median")


def test_previews_every_other_validation_on_half_the_batches(tmp_path, caplog):
    train, val = data()
    averager = CheckpointAverager(window=4, every_n_steps=5, storage="cpu", preview_every=2, preview_batches=0.5)
    seen: dict[int, tuple[float, float] | None] = {}

    class Probe(Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            if "merged/val_loss" not in trainer.callback_metrics:
                seen[trainer.global_step] = None
                return
            with averager.window.swapped(pl_module, "sma"):
                reference = val_loss_of(pl_module, list(val)[:2])  # 2 of the 4 validation batches
            seen[trainer.global_step] = (float(trainer.callback_metrics["merged/val_loss"]), reference)

    caplog.set_level("INFO", logger="ckptavg")
    trainer(tmp_path, [averager, Probe()], max_steps=64, val_check_interval=16).fit(Regression(), train, val)
    assert [s for s, v in seen.items() if v is not None] == [16, 48] and [s for s, v in seen.items() if v is None] == [
        32,
        64,
    ]
    for logged, reference in (v for v in seen.values() if v is not None):
        assert logged == pytest.approx(reference, rel=1e-6)
    assert "every 2 validations also runs 1 validation(s) on the first 50% of its batches" in caplog.text


def test_monitoring_merged_metrics_needs_a_preview_at_every_validation(tmp_path):
    train, val = data()
    averager = CheckpointAverager(window=4, every_n_steps=5, preview_every=2)
    watcher = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="merged/val_loss")
    with pytest.raises(ValueError, match=r"preview_every=2\): ModelCheckpoint\(monitor='merged/val_loss'\)"):
        trainer(tmp_path, [averager, watcher], max_steps=10, enable_checkpointing=True).fit(Regression(), train, val)
