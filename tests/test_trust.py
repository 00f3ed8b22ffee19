"""Issue 11: a stored window is trustworthy. One writer per folder, readers that change nothing,
and a manifest that is never trusted as a list of paths."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S, assert_close_to_reference, perturbed_states, reference_merge

from ckptavg import CheckpointWindow, CkptavgWarning, FolderLockedError, consolidate

HERE = Path(__file__).parent


def writer_process(dirpath: Path, until_step: int) -> subprocess.Popen:
    """The crash test's worker: writes snapshots (step s holds the value s) until it is killed.
    Returns once it has committed ``until_step``."""
    env = os.environ | {"PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "workers" / "crash.py"), str(dirpath)], stdout=subprocess.PIPE, text=True, env=env
    )
    for line in proc.stdout:
        if line.strip().isdigit() and int(line) >= until_step:
            return proc
    raise AssertionError(f"the writer exited early with {proc.wait(HANG_GUARD_S)}")


def test_one_writer_per_folder_readers_see_the_last_committed_window(tmp_path):
    d = tmp_path / "win"
    writer = writer_process(d, until_step=6)
    try:
        with pytest.raises(
            FolderLockedError, match=rf"being written by another process \(pid {writer.pid}\).*readonly=True"
        ):
            CheckpointWindow.open(d)
        listing = sorted(p.name for p in d.iterdir())
        for _ in range(10):  # while the writer keeps writing and evicting
            with CheckpointWindow.open(d, readonly=True) as reader:
                steps = reader.steps
                merged = reader.merge("sma")
            assert len(steps) == 4 and steps == list(range(steps[0], steps[0] + 4))
            assert torch.allclose(merged["big"], torch.full_like(merged["big"], sum(steps) / 4))
            assert int(merged["count"]) == steps[-1]
        assert listing  # the readers' own files: none (no lock, no leftovers removed)
        assert not any(p.name.startswith(".lock") and p.stat().st_size == 0 for p in d.iterdir())
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(HANG_GUARD_S)
    # The lock died with its process: a new writer opens the folder with no cleanup by hand.
    with CheckpointWindow.open(d) as win:
        assert len(win.steps) == 4 and win.merge("sma")["big"].isfinite().all()


def test_a_second_writer_in_the_same_process_is_refused_until_the_first_closes(tmp_path, tiny_net):
    states = perturbed_states(tiny_net, 3)
    first = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "win")
    first.snapshot(states[0], step=1)
    first.flush()
    with pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
        CheckpointWindow.open(tmp_path / "win")
    first.close()
    with CheckpointWindow.open(tmp_path / "win") as second:
        assert second.snapshot(states[1], step=2) and second.steps == [1, 2]


def test_readonly_windows_change_nothing_and_refuse_to_write(tmp_path, tiny_net):
    states = perturbed_states(tiny_net, 5)
    with CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "win") as win:
        for step, s in enumerate(states, start=1):
            win.snapshot(s, step=step)
    d = tmp_path / "win"
    (d / "snapshot-000000000009.safetensors.tmp").write_bytes(b"a writer's file in flight")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with CheckpointWindow.open(d, readonly=True, window=2) as reader:
        assert reader.steps == [4, 5]  # the newest, nothing evicted on disk
        with pytest.raises(ValueError, match="opened readonly"):
            reader.snapshot(states[0], step=6)
        with pytest.raises(ValueError, match="opened readonly"):
            reader.discard_from(5)
    consolidate(d, "sma")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    # A smaller window deletes snapshots only when asked to.
    with pytest.raises(ValueError, match=r"holds 4 snapshots.*would delete the oldest 2.*evict=True"):
        CheckpointWindow.open(d, window=2)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"window must be a positive integer or None, got {bad!r}"):
            CheckpointWindow.open(d, window=bad, evict=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    with CheckpointWindow.open(d, window=2, evict=True) as win:
        assert win.steps == [4, 5]


def edit_manifest(d: Path, edit) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m["snapshots"][0].update(file="../outside.safetensors"), r"snapshots\[0\]\.file"),
        (lambda m: m["snapshots"][1].update(file="/etc/passwd"), r"snapshots\[1\]\.file"),
        (lambda m: m["snapshots"][0].update(file="snapshot-000000000003.safetensors"), r"snapshots\[0\]\.file"),
        (lambda m: m["snapshots"][0].update(nbytes="big"), r"snapshots\[0\]\.nbytes"),
        (lambda m: m["snapshots"][0].pop("header_crc32"), r"snapshots\[0\]\.header_crc32"),
        (lambda m: m["snapshots"].reverse(), "steps must increase"),
        (lambda m: m.update(window=-1), "'window' must be a positive integer"),
        (lambda m: m.update(snapshots={"a": 1}), "'snapshots' must be a list"),
        (lambda m: m["layout"][0].__setitem__(0, m["layout"][1][0]), "field 'layout'"),  # a duplicate name
        (lambda m: m["layout"].__setitem__(slice(0, 2), m["layout"][1::-1]), "disagree with the header of"),  # swapped
        (lambda m: m["layout"][0].__setitem__(2, [10**9, 10**9]), r"snapshots\[0\]\.nbytes' is"),  # would allocate 4 EB
        (lambda m: m["snapshots"][0].update(header_bytes=50 << 30), r"snapshots\[0\]\.nbytes' is"),
        (lambda m: m["layout"][0].__setitem__(1, "I32"), "disagree with the header of"),  # same size, other dtype
    ],
)
def test_a_hand_edited_manifest_is_refused_before_anything_is_touched(tmp_path, tiny_net, edit, field):
    states = perturbed_states(tiny_net, 3)
    with CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "win") as win:
        for step, s in enumerate(states, start=1):
            win.snapshot(s, step=step)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not the window's")
    d = tmp_path / "win"
    edit_manifest(d, edit)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for opening in (
        lambda: CheckpointWindow.open(d),
        lambda: CheckpointWindow.open(d, readonly=True),
        lambda: consolidate(d, "sma"),
    ):
        with pytest.raises(ValueError, match=rf"manifest {d / 'manifest.json'} is malformed: .*{field}"):
            opening()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before and outside.read_bytes() == b"not the window's"


def test_a_rank_index_naming_other_folders_is_refused(tmp_path, tiny_net):
    d = tmp_path / "run"
    (d / "rank0").mkdir(parents=True)
    (d / "manifest.json").write_text(
        json.dumps(
            {"format": "ckptavg.ranks", "version": 1, "world_size": 1, "kind": "spread", "ranks": ["../elsewhere"]}
        )
    )
    with pytest.raises(ValueError, match=r"field 'ranks' must be \['rank0'.*got \['../elsewhere'\]"):
        consolidate(d, "sma")


def test_a_planted_temporary_symlink_is_never_written_through(tmp_path, tiny_net):
    states = perturbed_states(tiny_net, 2)
    d = tmp_path / "win"
    d.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (d / "snapshot-000000000001.safetensors.tmp").symlink_to(target)
    (d / "manifest.json.tmp").symlink_to(target)
    with CheckpointWindow(window=4, storage="disk", dirpath=d) as win:
        win.snapshot(states[0], step=1)
    assert target.read_text() == "keep me"
    assert not (d / "snapshot-000000000001.safetensors").is_symlink() and win.steps == [1]


def test_ctrl_c_while_flush_waits_keeps_the_snapshot_being_written(tmp_path, monkeypatch):
    """The real writer thread sends the SIGINT itself, once the main thread is waiting in flush(),
    and writes only after the interrupt has landed: the order is fixed, not left to timing."""
    import signal
    import threading

    from ckptavg.storage import disk as storage

    main = threading.main_thread()
    interrupted = threading.Event()
    write_snapshot = storage.write_snapshot

    def waiting_in_flush() -> bool:
        frame = sys._current_frames().get(main.ident)
        while frame is not None:
            if frame.f_code.co_name == "flush" and frame.f_code.co_filename == storage.__file__:
                return True
            frame = frame.f_back
        return False

    def write_after_an_interrupt(*args, **kwargs):
        while not waiting_in_flush():
            threading.Event().wait(0.001)
        os.kill(os.getpid(), signal.SIGINT)
        interrupted.wait(HANG_GUARD_S)
        return write_snapshot(*args, **kwargs)

    monkeypatch.setattr(storage, "write_snapshot", write_after_an_interrupt)
    # Python's own Ctrl-C handler: a process started in the background (CI, nohup) inherits SIGINT
    # ignored, and then Python installs none.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    state = {"big": torch.arange(1000.0)}
    win = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "win")
    win.snapshot(state, step=1)
    try:
        with pytest.raises(KeyboardInterrupt):
            win.flush()
    finally:
        interrupted.set()
        signal.signal(signal.SIGINT, previous)
    win.close()  # the interrupted wait is resumed: the snapshot is committed and listed
    assert win.steps == [1]
    with CheckpointWindow.open(tmp_path / "win", readonly=True) as reader:
        assert reader.steps == [1] and torch.equal(reader.merge()["big"], state["big"])


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda s: s.pop("steps"), r"lacks \['steps'\]"),
        (lambda s: s.update(steps=[3, 2, 1]), "'steps' must increase"),
        (lambda s: s.update(steps=[1, "2", 3]), "'steps' must be a list of non-negative integers"),
        (
            lambda s: s["layout"][0].__setitem__(2, [2_000_000_000]),
            r"'snapshots\['F32'\]' is \(3, \d+\); its layout and steps make \(3, 2000",
        ),
        (lambda s: s.update(steps=[1, 2]), r"'snapshots\['\w+'\]' is \(3, \d+\); its layout and steps make \(2,"),
        (lambda s: s["snapshots"].pop("I64"), "holds groups"),
        (lambda s: s.update(layout=[["a", "F99", [2]]]), "field 'layout' is malformed"),
    ],
)
def test_a_tampered_window_state_is_refused_before_anything_changes(tiny_net, tamper, message):
    states = perturbed_states(tiny_net, 3)
    source = CheckpointWindow(window=4)
    for step, s in enumerate(states, start=1):
        source.snapshot(s, step=step)
    state = source.state_dict()
    tamper(state)
    target = CheckpointWindow(window=4)
    target.snapshot(states[0], step=7)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert target.steps == [7] and torch.equal(target.merge()["fc1.weight"], states[0]["fc1.weight"])


# -- forks: a window started from another run's state owns its folder -----------------------------


def inode(path: Path) -> int:
    return path.stat().st_ino


def test_a_window_loaded_from_another_folders_state_links_what_it_inherits(tmp_path, tiny_net):
    """Issue 11: two runs forked from one checkpoint wrote into the base run's folder (the later
    fork's resume trimmed it). A state loaded into a window with another dirpath now starts that
    window from hard links to the snapshots it lists; the base folder is only read."""
    states = perturbed_states(tiny_net, 6)
    base = tmp_path / "base"
    with CheckpointWindow(window=5, storage="disk", dirpath=base) as win:
        for step in (1, 2, 3):
            win.snapshot(states[step - 1], step=step)
        forked_at = win.state_dict()
        for step in (4, 5):  # the base run goes on after the checkpoint
            win.snapshot(states[step - 1], step=step)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    forks = []
    for name in ("fork-a", "fork-b"):
        fork = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / name)
        fork.load_state_dict(forked_at)
        assert fork.steps == [1, 2, 3]
        fork.snapshot(states[5], step=4)
        forks.append(fork)
    for fork in forks:
        fork.close()
        files = {p.name for p in fork.dirpath.iterdir()} - {".lock"}
        assert files == {"manifest.json"} | {f"snapshot-{s:012d}.safetensors" for s in (1, 2, 3, 4)}
        for s in (1, 2, 3):  # linked, not copied
            name = f"snapshot-{s:012d}.safetensors"
            assert inode(fork.dirpath / name) == inode(base / name)
        merged = CheckpointWindow.open(fork.dirpath, readonly=True).merge("sma")
        assert_close_to_reference(merged, reference_merge([states[i] for i in (0, 1, 2, 5)], "sma"))
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.name != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }
    assert CheckpointWindow.open(base, readonly=True).steps == [1, 2, 3, 4, 5]


def test_a_fork_inherits_from_a_folder_whose_writer_is_still_running(tmp_path):
    d = tmp_path / "base"
    writer = writer_process(d, until_step=3)
    try:
        with CheckpointWindow.open(d, readonly=True) as reader:
            state = reader.state_dict()
        fork = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "fork")
        fork.load_state_dict(state)  # no lock taken on the base folder; its writer keeps evicting
        steps = fork.steps
        merged = fork.merge("sma")
        fork.close()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(HANG_GUARD_S)
    assert steps and steps == state["steps"][-len(steps) :]
    assert torch.allclose(merged["big"], torch.full_like(merged["big"], sum(steps) / len(steps)))


@pytest.mark.skipif(
    os.stat("/dev/shm").st_dev == os.stat("/tmp").st_dev if os.path.isdir("/dev/shm") else True,
    reason="needs a second file system",
)
def test_a_fork_on_another_file_system_copies_what_it_inherits(tmp_path, tiny_net):
    import shutil
    import tempfile

    states = perturbed_states(tiny_net, 3)
    base = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="ckptavg-test-"))
    try:
        with CheckpointWindow(window=4, storage="disk", dirpath=base) as win:
            for step, s in enumerate(states, start=1):
                win.snapshot(s, step=step)
            state = win.state_dict()
        with CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "fork") as fork:
            fork.load_state_dict(state)
            assert fork.steps == [1, 2, 3]
            assert fork.verify() == []
            torch.testing.assert_close(fork.merge("sma")["fc1.weight"], win.merge("sma")["fc1.weight"], rtol=0, atol=0)
        assert not list((tmp_path / "fork").glob("*.tmp"))
    finally:
        shutil.rmtree(base)


def test_a_fork_into_a_folder_that_holds_another_window_is_refused(tmp_path, tiny_net):
    states = perturbed_states(tiny_net, 3)
    with CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "base") as win:
        win.snapshot(states[0], step=1)
        state = win.state_dict()
    with CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "other") as other:
        other.snapshot(states[1], step=5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()}
    fork = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "other")
    with pytest.raises(
        FileExistsError, match=rf"{tmp_path / 'other'} already holds a checkpoint window.*another dirpath"
    ):
        fork.load_state_dict(state)
    assert {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()} == before


def test_resuming_in_place_never_deletes_what_a_finished_run_kept(tmp_path, tiny_net):
    """A fixed folder: resuming a crashed run from its checkpoint drops the snapshots it took after
    the checkpoint (that run is gone); a finished run's snapshots are not dropped by a fork that
    was pointed at the same folder: it is refused, with what to do."""
    states = perturbed_states(tiny_net, 5)
    d = tmp_path / "win"
    win = CheckpointWindow(window=4, storage="disk", dirpath=d)
    for step in (1, 2, 3):
        win.snapshot(states[step - 1], step=step)
    state = win.state_dict()
    for step in (4, 5):
        win.snapshot(states[step - 1], step=step)
    win.finish()  # the run completed
    win.close()
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    again = CheckpointWindow(window=4, storage="disk", dirpath=d)
    with pytest.raises(
        ValueError, match=r"finished at step 5.*would delete its snapshots of steps \[4, 5\].*own dirpath"
    ):
        again.load_state_dict(state)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    # Resuming from the finished run's own last state (training on from its end) is fine.
    with CheckpointWindow.open(d, readonly=True) as reader:
        end = reader.state_dict()
    with CheckpointWindow(window=4, storage="disk", dirpath=d) as resumed:
        resumed.load_state_dict(end)
        assert resumed.snapshot(states[0], step=6) and resumed.steps == [3, 4, 5, 6]
    # A crashed (unfinished) run's later snapshots are dropped, with a warning naming them.
    with CheckpointWindow(window=4, storage="disk", dirpath=d) as crashed:
        with pytest.warns(
            CkptavgWarning, match=r"dropping the snapshots of steps \[4, 5, 6\] taken after the checkpoint"
        ):
            with pytest.warns(CkptavgWarning, match=r"lists steps \[1, 2\], whose files are no longer"):
                crashed.load_state_dict(state)  # steps 1 and 2 were evicted meanwhile
        assert crashed.steps == [3]


def test_a_resume_whose_snapshot_folder_is_gone_goes_on_with_an_empty_window(tmp_path, tiny_net):
    """A checkpoint copied to another machine without its disk window: say so, train on."""
    import shutil

    states = perturbed_states(tiny_net, 3)
    with CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "base") as win:
        win.snapshot(states[0], step=1)
        state = win.state_dict()
    shutil.rmtree(tmp_path / "base")
    with CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "new") as resumed:
        with pytest.warns(
            CkptavgWarning, match=rf"lists steps \[1\], whose files are no longer in {tmp_path / 'base'}"
        ):
            resumed.load_state_dict(state)
        assert resumed.steps == [] and resumed.snapshot(states[1], step=2) and resumed.steps == [2]


def read_only_command(folder: Path) -> list[str] | None:
    """A command prefix under which ``folder`` is read-only: a read-only bind mount in a private
    mount namespace (root ignores permissions), or permissions (everyone else). ``None``: neither."""
    if os.geteuid() != 0:
        for path in [folder, *folder.iterdir()]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", script, str(folder), "true"], capture_output=True)
    return ["unshare", "-m", "sh", "-c", script, str(folder)] if probe.returncode == 0 else None


def test_a_read_only_copy_of_a_folder_opens_for_merging(tmp_path, tiny_net):
    """Issue 11: open() on a read-only copy (a download, an archive, a read-only mount) failed,
    trying to lock it and delete leftovers. It now opens readonly, with a warning; nothing else
    changes: merge, verify and consolidate work, a snapshot is refused with a clear error."""
    states = perturbed_states(tiny_net, 3)
    d = tmp_path / "win"
    with CheckpointWindow(window=4, storage="disk", dirpath=d) as win:
        for step, s in enumerate(states, start=1):
            win.snapshot(s, step=step)
        expected = win.merge("wma")
    (d / ".lock").unlink()  # a copy holds only the window's own files
    torch.save(expected, tmp_path / "expected.pt")
    prefix = read_only_command(d)
    if prefix is None:
        pytest.skip("cannot make a folder read-only here (root without mount namespaces)")
    code = f"""
import warnings, torch
from ckptavg import CheckpointWindow, consolidate
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    win = CheckpointWindow.open({str(d)!r})
print("WARNED", [str(w.message) for w in caught])
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
assert win.steps == [1, 2, 3] and win.verify() == []
for key, value in win.merge("wma").items():
    assert torch.equal(value, expected[key]), key
assert all(torch.equal(v, expected[k]) for k, v in consolidate({str(d)!r}, "wma").items())
try:
    win.snapshot(win.merge("sma"), step=4)
except ValueError as err:
    print("REFUSED", err)
"""
    env = os.environ | {"PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr
    assert f"{d} is not writable" in done.stdout and "opened readonly" in done.stdout
    assert "REFUSED cannot take a snapshot" in done.stdout
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json"] + [
        f"snapshot-{s:012d}.safetensors" for s in (1, 2, 3)
    ]


def test_a_snapshot_whose_manifest_does_not_fit_is_not_left_behind(tmp_path):
    """Issue 11: on a full disk, a snapshot file that fits while its manifest does not stayed in the
    folder, uncommitted. The write is undone, the error names the file, the window is unchanged,
    and the next snapshot, once there is room, is written as usual. (A file-size limit stands in
    for the full disk: writes past it fail with EFBIG, as they fail with ENOSPC on a full disk.)"""
    code = f"""
import os, resource, signal, torch
from pathlib import Path
from ckptavg import CheckpointWindow
d = Path({str(tmp_path / "win")!r})
win = CheckpointWindow(window=64, storage="disk", dirpath=d)
state = {{"w": torch.zeros(4)}}
for step in range(1, 41):  # forty records: the manifest outgrows one snapshot file
    win.snapshot(state, step=step)
win.flush()
snapshot_size = (d / "snapshot-000000000040.safetensors").stat().st_size
assert (d / "manifest.json").stat().st_size > 2 * snapshot_size
before = {{p.name: p.read_bytes() for p in d.iterdir()}}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2 * snapshot_size, resource.RLIM_INFINITY))
win.snapshot(state, step=41)
try:
    win.flush()
except OSError as err:
    print("ERROR", err)
assert {{p.name: p.read_bytes() for p in d.iterdir()}} == before, sorted(set(p.name for p in d.iterdir()) ^ set(before))
assert win.steps[-1] == 40
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
win.snapshot(state, step=42)
win.close()
print("STEPS", CheckpointWindow.open(d, readonly=True).steps[-2:])
"""
    env = os.environ | {"PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    assert (
        "ERROR writing the snapshot of step 41 to" in done.stdout
        and "the window keeps its previous 40 snapshots" in done.stdout
    )
    assert "STEPS [40, 42]" in done.stdout
