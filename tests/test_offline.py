import collections

import pytest
import torch
from conftest import assert_close_to_reference, perturbed_states, reference_merge
from safetensors.torch import save_file

from ckptavg import CheckpointWindow, merge_state_dicts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", [None, "wma", "ema", [3, 1, 1]])
def test_matches_reference_and_the_window(tiny_net, dtype, method):
    states = perturbed_states(tiny_net, 3, dtype=dtype)
    merged = merge_state_dicts(states, weights=method, alpha=0.3)
    assert_close_to_reference(merged, reference_merge(states, method or "sma", alpha=0.3))
    win = CheckpointWindow(window=3)
    for step, s in enumerate(states):
        win.snapshot(s, step=step)
    from_window = win.merge(method or "sma", alpha=0.3)
    assert all(torch.equal(merged[k], from_window[k]) for k in merged)


def test_integer_tensors_come_from_the_last_checkpoint_and_do_not_crash():
    # fairseq's average_checkpoints divides integer tensors and crashes; they are counters.
    a = {"w": torch.ones(2), "steps": torch.tensor(10), "mask": torch.tensor([True, False])}
    b = {"w": torch.zeros(2), "steps": torch.tensor(20), "mask": torch.tensor([False, True])}
    merged = merge_state_dicts([a, b])
    assert merged["steps"].item() == 20 and merged["mask"].tolist() == [False, True]
    assert merged["w"].tolist() == [0.5, 0.5]


def test_results_are_independent_tensors_that_safetensors_can_save(tmp_path, tiny_net):
    states = perturbed_states(tiny_net, 2)
    save_file(merge_state_dicts(states), str(tmp_path / "m.safetensors"))
    win = CheckpointWindow(window=2)
    for step, s in enumerate(states):
        win.snapshot(s, step=step)
    save_file(win.merge(), str(tmp_path / "w.safetensors"))


def test_files_of_every_kind(tmp_path, tiny_net):
    states = perturbed_states(tiny_net, 3)
    save_file(states[0], str(tmp_path / "a.safetensors"))
    torch.save(states[1], tmp_path / "b.pt")
    torch.save({"state_dict": states[2], "epoch": 3, "optimizer_states": []}, tmp_path / "c.ckpt")  # Lightning
    merged = merge_state_dicts([tmp_path / "a.safetensors", str(tmp_path / "b.pt"), tmp_path / "c.ckpt"], "wma")
    assert_close_to_reference(merged, reference_merge(states, "wma"))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused_with_the_file_named(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Payload()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        merge_state_dicts([path, path])
    assert "must never run" not in capsys.readouterr().out


def test_bad_files_are_named(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="junk.safetensors"):
        merge_state_dicts([tmp_path / "junk.safetensors"])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        merge_state_dicts([tmp_path / "missing.pt"])
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt holds a list"):
        merge_state_dicts([tmp_path / "list.pt"])


def test_mismatch_names_the_key_and_the_checkpoint(tmp_path):
    a = {"w": torch.ones(2), "b": torch.ones(1)}
    save_file({"w": torch.ones(3), "b": torch.ones(1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"wide.safetensors: key 'w' has shape \(3,\)"):
        merge_state_dicts([a, tmp_path / "wide.safetensors"])
    with pytest.raises(ValueError, match=r"state dict #1 is missing key 'b'"):
        merge_state_dicts([a, {"w": torch.ones(2)}])
    with pytest.raises(ValueError, match="expected 2 weights"):
        merge_state_dicts([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="empty window"):
        merge_state_dicts([])


def test_accepts_ordered_dicts_and_models(tiny_net):
    od = collections.OrderedDict(tiny_net.state_dict())
    merged = merge_state_dicts([tiny_net, od])
    assert all(torch.equal(merged[k], v) for k, v in tiny_net.state_dict().items())
