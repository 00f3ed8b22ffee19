import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_reference, perturbed_states, reference_merge
from safetensors import safe_open

from ckptavg import CheckpointWindow, CorruptSnapshotError

HERE = Path(__file__).parent


def filled_window(tmp_path, tiny_net, count=5, window=4, name="win"):
    states = perturbed_states(tiny_net, count)
    win = CheckpointWindow(window=window, storage="disk", dirpath=tmp_path / name)
    for step, s in enumerate(states):
        assert win.snapshot(s, step=step * 100)
    win.flush()
    return win, states


def snapshot_files(dirpath: Path) -> list[Path]:
    return sorted(dirpath.glob("snapshot-*.safetensors"))


def test_files_are_standard_safetensors_with_a_manifest(tmp_path, tiny_net):
    win, states = filled_window(tmp_path, tiny_net)
    files = snapshot_files(tmp_path / "win")
    assert [f.name for f in files] == [f"snapshot-{s:012d}.safetensors" for s in (100, 200, 300, 400)]
    with safe_open(str(files[-1]), framework="pt") as f:
        assert f.metadata()["step"] == "400"
        for key, value in states[-1].items():
            assert torch.equal(f.get_tensor(key), value)
    manifest = json.loads((tmp_path / "win" / "manifest.json").read_text())
    assert [r["step"] for r in manifest["snapshots"]] == [100, 200, 300, 400]
    assert {"nbytes", "header_crc32", "group_crc32", "file"} <= set(manifest["snapshots"][0])
    assert manifest["window"] == 4 and ["bn.num_batches_tracked", "I64", []] in manifest["layout"]
    win.close()


def test_reopen_holds_the_same_window(tmp_path, tiny_net):
    win, states = filled_window(tmp_path, tiny_net)
    expected = win.merge("ema")
    win.close()
    again = CheckpointWindow.open(tmp_path / "win")
    assert again.steps == [100, 200, 300, 400] and again.window == 4
    merged = again.merge("ema")
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    assert_close_to_reference(merged, reference_merge(states[-4:], "ema"))
    # It keeps going: a new snapshot evicts the oldest file.
    assert again.snapshot(states[0], step=500)
    again.flush()
    assert again.steps == [200, 300, 400, 500]
    assert len(snapshot_files(tmp_path / "win")) == 4
    again.close()


def test_existing_window_is_not_overwritten(tmp_path, tiny_net):
    win, states = filled_window(tmp_path, tiny_net)
    win.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "win").iterdir()}
    fresh = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "win")
    with pytest.raises(FileExistsError, match="CheckpointWindow.open"):
        fresh.snapshot(states[0], step=0)
    assert {p.name: p.read_bytes() for p in (tmp_path / "win").iterdir()} == before


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        CheckpointWindow.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest .*bad/manifest.json is malformed"):
        CheckpointWindow.open(tmp_path / "bad")


def corrupt_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [corrupt_flip, corrupt_truncate, corrupt_header, Path.unlink])
@pytest.mark.parametrize("reopen", [False, True])
def test_corrupt_file_is_named_and_the_rest_stays_usable(tmp_path, tiny_net, corrupt, reopen):
    win, states = filled_window(tmp_path, tiny_net)
    bad = snapshot_files(tmp_path / "win")[1]  # step 200
    if reopen:
        win.close()
        corrupt(bad)
        win = CheckpointWindow.open(tmp_path / "win")
    else:
        corrupt(bad)  # written by this process, verified at write time: size/header still checked
    try:
        win.merge("sma")
    except CorruptSnapshotError as err:
        assert bad.name in str(err)
        assert win.steps == [100, 300, 400]
        assert (bad.parent / (bad.name + ".corrupt")).exists() or corrupt is Path.unlink
        assert_close_to_reference(win.merge("sma"), reference_merge([states[1], states[3], states[4]], "sma"))
        manifest = json.loads((tmp_path / "win" / "manifest.json").read_text())
        assert [r["step"] for r in manifest["snapshots"]] == [100, 300, 400]
    else:
        # Only a data flip in a file this process wrote and already verified can go unseen by a
        # merge (the page cache serves it); verify() reads every file in full.
        assert corrupt is corrupt_flip and not reopen
        assert win.verify() == [bad.name]
        assert win.steps == [100, 300, 400]
    win.close()


def test_verify_reads_everything_and_drops_bad_files(tmp_path, tiny_net):
    win, _ = filled_window(tmp_path, tiny_net)
    win.close()
    files = snapshot_files(tmp_path / "win")
    corrupt_flip(files[0])
    corrupt_truncate(files[2])
    win = CheckpointWindow.open(tmp_path / "win")
    with pytest.warns(RuntimeWarning, match="is unusable"):
        dropped = win.verify()
    assert dropped == [files[0].name, files[2].name]
    assert win.steps == [200, 400]
    win.close()


def test_open_removes_what_a_crash_left_behind(tmp_path, tiny_net):
    win, _ = filled_window(tmp_path, tiny_net)
    win.close()
    d = tmp_path / "win"
    (d / "snapshot-000000000900.safetensors.tmp").write_bytes(b"half a write")
    (d / "snapshot-000000000050.safetensors").write_bytes(b"evicted but not yet deleted")
    (d / "notes.txt").write_text("user file")
    leftovers = sorted(p.name for p in d.iterdir())
    with CheckpointWindow.open(d, readonly=True) as reader:  # a reader never deletes
        assert reader.steps == [100, 200, 300, 400]
    assert sorted(p.name for p in d.iterdir()) == leftovers
    CheckpointWindow.open(d).close()  # the writer cleans up its own leftovers only
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [".lock", "manifest.json", "notes.txt"] + [f"snapshot-{s:012d}.safetensors" for s in (100, 200, 300, 400)]
    )


def test_failed_background_write_is_reported_and_rolled_back(tmp_path, tiny_net):
    win, states = filled_window(tmp_path, tiny_net)
    d = tmp_path / "win"
    blocker = d / "snapshot-000000000500.safetensors.tmp"
    blocker.mkdir()  # the writer cannot create its temporary file
    assert win.snapshot(states[0], step=500)
    with pytest.raises(
        OSError, match=r"writing the snapshot of step 500 to .*snapshot-000000000500.safetensors failed"
    ):
        win.flush()
    assert win.steps == [100, 200, 300, 400]
    blocker.rmdir()
    assert_close_to_reference(win.merge("sma"), reference_merge(states[1:], "sma"))
    assert win.snapshot(states[0], step=600)
    win.close()
    assert CheckpointWindow.open(d).steps == [200, 300, 400, 600]


def test_disk_resume_with_a_fresh_window_object(tmp_path, tiny_net):
    # The plain-loop resume idiom: construct as at the start of the run, then load the checkpoint.
    win, states = filled_window(tmp_path, tiny_net, count=3)
    checkpoint = win.state_dict()
    assert checkpoint["steps"] == [0, 100, 200]
    win.snapshot(states[0], step=300)  # the run went on after its checkpoint, then crashed
    win.close()
    resumed = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "win")
    resumed.load_state_dict(checkpoint)
    assert resumed.steps == [0, 100, 200]
    assert_close_to_reference(resumed.merge("wma"), reference_merge(states, "wma"))
    assert resumed.snapshot(states[1], step=300)
    resumed.close()


def test_disk_state_dict_warns_about_missing_files(tmp_path, tiny_net):
    win, states = filled_window(tmp_path, tiny_net, count=3)
    checkpoint = win.state_dict()
    for step in (300, 400):
        win.snapshot(states[0], step=step)
    win.close()
    fresh = CheckpointWindow.open(tmp_path / "win")
    with pytest.warns(RuntimeWarning, match=r"lists steps \[0\], whose files are no longer"):
        fresh.load_state_dict(checkpoint)
    assert fresh.steps == [100, 200]
    assert_close_to_reference(fresh.merge(), reference_merge(states[1:3], "sma"))
    assert [p.name for p in snapshot_files(tmp_path / "win")] == [f"snapshot-{s:012d}.safetensors" for s in (100, 200)]


def test_sigkill_at_random_moments_leaves_a_reopenable_window(tmp_path):
    d = tmp_path / "crash"
    rng = random.Random(1234)
    seen_steps: list[int] = []
    for trial in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "workers" / "crash.py"), str(d)],
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONPATH": str(HERE.parent)},
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reported = [int(line) for line in proc.stdout.read().split()]

        win = CheckpointWindow.open(d)
        steps = win.steps
        assert 1 <= len(steps) <= 4, (trial, steps)
        assert steps == list(range(steps[0], steps[0] + len(steps)))
        # snapshot() returning means the host copy was taken, not that the file is complete: the
        # newest reported step may be missing, never more than that one.
        if reported:
            assert steps[-1] >= reported[-1] - 1
        assert not list(d.glob("*.tmp"))
        assert len(list(d.glob("snapshot-*.safetensors"))) == len(steps)
        # Every stored file is complete and holds exactly its step's values.
        for i, step in enumerate(steps):
            one_hot = [1.0 if j == i else 0.0 for j in range(len(steps))]
            merged = win.merge(one_hot)
            assert torch.all(merged["big"] == step) and torch.all(merged["half"] == step)
        assert win.merge("sma")["big"][0].item() == pytest.approx(sum(steps) / len(steps))
        assert win.verify() == []
        win.close()
        seen_steps.append(steps[-1])
    assert seen_steps == sorted(seen_steps)  # every restart continued the same window


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_discard_from_drops_the_newest_snapshots_and_continues(tmp_path, tiny_net, storage):
    """A restore drops the snapshots taken after a divergence began: the manifest no longer lists
    them (their files are gone), a reopened window holds the rest, and snapshots continue."""
    states = perturbed_states(tiny_net, 6)
    win = CheckpointWindow(window=4, storage=storage, dirpath=tmp_path / "win" if storage == "disk" else None)
    for step, s in enumerate(states[:5], start=1):
        assert win.snapshot(s, step=step)
    win.discard_from(4)
    assert win.steps == [2, 3]
    assert_close_to_reference(win.merge("sma"), reference_merge(states[1:3], "sma"))
    assert win.snapshot(states[5], step=6)
    assert win.steps == [2, 3, 6]
    if storage == "disk":
        win.close()
        assert [f.name for f in snapshot_files(tmp_path / "win")] == [
            f"snapshot-{s:012d}.safetensors" for s in (2, 3, 6)
        ]
        assert CheckpointWindow.open(tmp_path / "win").steps == [2, 3, 6]


def test_a_long_disk_merge_shows_progress_and_merges_the_same(tmp_path, tiny_net, monkeypatch, capsys):
    """Issue 12: a long disk merge showed no progress. Above PROGRESS_BYTES (2 GiB; lowered
    here) it shows a tqdm bar on a terminal; the result is the same."""
    from ckptavg.storage import disk as storage

    states = perturbed_states(tiny_net, 3)
    with CheckpointWindow(window=3, storage="disk", dirpath=tmp_path / "win") as win:
        for step, state in enumerate(states, start=1):
            win.snapshot(state, step=step)
        quiet = win.merge("wma")
        shown = []
        monkeypatch.setattr(storage, "PROGRESS_BYTES", 0)
        real = storage.progress_bar
        monkeypatch.setattr(
            storage,
            "progress_bar",
            lambda total, description: shown.append((total, description)) or real(total, description),
        )
        loud = win.merge("wma")
    assert shown and shown[0][0] == 3 * sum(t.numel() * t.element_size() for t in states[0].values())
    assert "merging 3 snapshots from" in shown[0][1]
    for key, value in quiet.items():
        assert torch.equal(loud[key], value), key
