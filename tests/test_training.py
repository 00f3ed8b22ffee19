"""ckptavg.training: the framework-neutral session, driven by a plain PyTorch loop (no framework).

The Lightning callback's tests exercise the same session through Lightning; here it is driven
directly, the way an adapter does, to pin its contract: cadence, recovery, previews, the end of
the run and checkpoint state.
"""

import math
from pathlib import Path

import pytest
import torch

from ckptavg import CheckpointWindow, MergeSpec
from ckptavg.training import AveragerConfig, NamedMerge, TrainingSession


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)


def _run(session, steps=60, spike_at=None, batch=32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    session.plan(float(steps), None, 0)
    session.begin(model, 0)
    for step in range(1, steps + 1):
        i = (step * batch) % len(x)
        xb, yb = x[i : i + batch], y[i : i + batch]
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        if step == spike_at:
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        session.add_loss(loss)
        session.before_optimizer_step([optimizer], step)
        optimizer.step()
        session.restore_learning_rates()

        def batch_loss(xb=xb, yb=yb):
            with torch.no_grad():
                return float(torch.nn.functional.mse_loss(model(xb), yb))

        session.end_step(step, model, [optimizer], batch_loss)
        if session.snapshot_due(step):
            session.snapshot(model, step, overlap=False)
    return model


def _validation(model):
    x, y = _data(seed=1)
    with torch.no_grad():
        return {"val_loss": float(torch.nn.functional.mse_loss(model(x), y))}


def test_a_plain_loop_snapshots_on_the_automatic_cadence_and_ends_with_the_merge(tmp_path):
    infos, warnings = [], []
    session = TrainingSession(AveragerConfig(window=4, storage="cpu"), info=infos.append, warn=warnings.append)
    model = _run(session, steps=80)
    assert session.cadence == (2, None)  # 80 // (10 x 4)
    assert session.window.steps == [74, 76, 78, 80]
    expected = session.window.merge("sma")
    written = []

    def evaluate(merge):
        if merge is None:
            return _validation(model)
        with session.window.swapped(model, merge.weights(session.window)):
            return _validation(model)

    session.finish(80, model, evaluate=evaluate, monitored=("val_loss", "min"), export=written.append)
    assert written == [session.main]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name])
    assert set(session.final_metrics) == {"raw", "merged"}
    assert any("final raw vs merged" in message for message in infos)


def test_a_nan_step_is_restored_from_the_merge_of_earlier_snapshots():
    warnings = []
    session = TrainingSession(
        AveragerConfig(window=4, every_n_steps=5, storage="cpu"), info=lambda m: None, warn=warnings.append
    )
    model = _run(session, steps=60, spike_at=43)
    restored = [e for e in session.recovery_events if e.action == "restored"]
    assert [e.step for e in restored] == [43]
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())
    assert 45 in session.window.steps and all(s <= 40 or s >= 45 for s in session.window.steps)


def test_the_session_state_round_trips_and_a_resumed_window_continues(tmp_path):
    config = AveragerConfig(window=3, every_n_steps=10, storage="disk", dirpath=tmp_path / "avg", recover=False)
    first = TrainingSession(config, info=lambda m: None)
    first.bind(rank=0, world_size=1, storage="disk", spread=False, default_dirpath=tmp_path, root=tmp_path)
    _run(first, steps=40)
    state = first.state_dict()
    first.close()
    assert state["merge"] == "sma" and len(state["coefficients"]) == 3
    second = TrainingSession(config, info=lambda m: None)
    second.bind(rank=0, world_size=1, storage="disk", spread=False, default_dirpath=tmp_path, root=tmp_path)
    second.load_state_dict(state)
    assert second.window.steps == [20, 30, 40]
    assert Path(second.window_folder).is_dir()
    second.close()


def test_config_errors_are_the_averagers():
    for kwargs, message in (
        ({"window": 0}, "window must be a positive integer"),
        ({"every_n_steps": 5, "every_n_epochs": 1}, "not both"),
        ({"merge": "nope"}, "unknown merge method"),
        ({"select": "val_loss"}, "give candidates"),
        ({"storage": "gpu"}, "storage must be"),
        ({"alpha": 0.3, "decay": 0.9}, "give alpha or decay"),
        ({"preview_every": 0}, "preview_every must be a positive integer"),
        ({"preview_batches": 0}, "preview_batches must be a number of batches"),
        ({"preview_batches": 1.5}, "preview_batches must be a number of batches"),
        ({"preview_batches": True}, "preview_batches must be a number of batches"),
    ):
        with pytest.raises(ValueError, match=message):
            AveragerConfig(**kwargs)
    config = AveragerConfig(merge=MergeSpec("ema", alpha=0.4), candidates=["wma"])
    assert config.main == NamedMerge("ema", "ema", 0.4, {})
    window = CheckpointWindow(2)
    window.snapshot(torch.nn.Linear(2, 2), step=1)
    window.snapshot(torch.nn.Linear(2, 2), step=2)
    assert config.main.weights(window) == window.weights("ema", 0.4)


def test_an_untested_framework_version_is_said_once():
    import warnings

    from ckptavg import training

    with pytest.warns(UserWarning, match="tested with somelib 2.4 to 2.6; this is 3.0.1"):
        training.warn_if_untested("somelib", "3.0.1", ((2, 4), (2, 6)), "MyAdapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training.warn_if_untested("somelib", "3.0.1", ((2, 4), (2, 6)), "MyAdapter")  # once per process
        training.warn_if_untested("otherlib", "2.5.0", ((2, 4), (2, 6)), "MyAdapter")  # inside the range


def test_without_recovery_no_snapshot_is_taken_of_weights_whose_loss_is_nan():
    # recover=False: the session reads a step's loss only when it snapshots (no per-step sync), and
    # a NaN run never fills the window with NaN snapshots that would evict the good ones.
    session = TrainingSession(
        AveragerConfig(window=4, every_n_steps=5, storage="cpu", recover=False), info=lambda m: None
    )
    model = _run(session, steps=60, spike_at=43)
    assert not all(math.isfinite(float(p.detach().sum())) for p in model.parameters())  # nothing restored
    assert session.window.steps == [25, 30, 35, 40]  # the NaN of step 43 poisoned every later step
    assert all(torch.isfinite(t).all() for t in session.window.merge("sma").values())
