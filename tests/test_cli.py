"""Issue 14: the ``ckptavg`` console script, run as installed, in a subprocess, on real files."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptavg import CheckpointWindow, coefficients

SCRIPT = Path(sys.executable).parent / "ckptavg"


def ckptavg(*args, cwd):
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)


def states(n=4):
    torch.manual_seed(0)
    return [
        {"w": torch.randn(64, 32) + i, "b": torch.randn(32).to(torch.bfloat16), "step": torch.tensor(100 * i)}
        for i in range(n)
    ]


def reference(snapshots, weights):
    out = {}
    for key in snapshots[0]:
        if snapshots[0][key].is_floating_point():
            out[key] = sum(w * s[key].double() for w, s in zip(weights, snapshots, strict=True))
        else:
            out[key] = snapshots[-1][key]
    return out


def assert_matches(path, expected):
    merged = load_file(str(path))
    assert set(merged) == set(expected)
    for key, value in expected.items():
        if value.is_floating_point():
            tolerance = 1e-6 if merged[key].dtype == torch.float32 else 1e-2
            assert torch.allclose(merged[key].double(), value, atol=tolerance, rtol=tolerance), key
        else:
            assert torch.equal(merged[key], value), key


def folder_digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def test_merge_mixes_formats_with_any_method_or_weights(tmp_path):
    snaps = states()
    save_file(snaps[0], tmp_path / "a.safetensors")
    torch.save({"state_dict": snaps[1], "epoch": 1}, tmp_path / "b.ckpt")  # a Lightning checkpoint
    torch.save(snaps[2], tmp_path / "c.pt")
    save_file(snaps[3], tmp_path / "d.safetensors")
    inputs = ["a.safetensors", "b.ckpt", "c.pt", "d.safetensors"]
    done = ckptavg(
        "merge", *inputs, "--method", "decay", "--option", "shape=1-sqrt", "-o", "out/m.safetensors", "-q", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    weights = coefficients("decay", 4, shape="1-sqrt")
    assert_matches(tmp_path / "out" / "m.safetensors", reference(snaps, weights))
    with safe_open(str(tmp_path / "out" / "m.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["method"] == "decay" and json.loads(metadata["inputs"]) == inputs
    assert json.loads(metadata["coefficients"]) == pytest.approx(weights)
    done = ckptavg("merge", "a.safetensors", "b.ckpt", "--weights", "0.25,0.75", "-o", "w.safetensors", cwd=tmp_path)
    assert done.returncode == 0 and "weights: [0.25, 0.75]" in done.stdout
    assert_matches(tmp_path / "w.safetensors", reference(snaps[:2], [0.25, 0.75]))


def test_globs_and_last_select_inputs_in_name_order(tmp_path):
    snaps = states()
    for i, s in enumerate(snaps):
        save_file(s, tmp_path / f"step-{i}.safetensors")
    done = ckptavg(
        "merge",
        "step-*.safetensors",
        "--last",
        "3",
        "--method",
        "ema",
        "--alpha",
        "0.5",
        "-o",
        "m.safetensors",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert_matches(tmp_path / "m.safetensors", reference(snaps[1:], coefficients("ema", 3, 0.5)))


def test_hugging_face_folders_keep_their_sharding_and_files(tmp_path):
    snaps = states(2)
    for i, s in enumerate(snaps):
        folder = tmp_path / f"hf-{i}"
        folder.mkdir()
        save_file({"w": s["w"]}, folder / "model-00001-of-00002.safetensors")
        save_file({"b": s["b"], "step": s["step"]}, folder / "model-00002-of-00002.safetensors")
        weight_map = {
            "w": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "step": "model-00002-of-00002.safetensors",
        }
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
        )
        (folder / "config.json").write_text(json.dumps({"hidden_size": 32, "run": i}))
    done = ckptavg("merge", "hf-0", "hf-1", "-o", "merged", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "merged"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert json.loads((out / "config.json").read_text())["run"] == 0  # the first input's files
    expected = reference(snaps, [0.5, 0.5])
    assert_matches(out / "model-00001-of-00002.safetensors", {"w": expected["w"]})
    assert_matches(out / "model-00002-of-00002.safetensors", {"b": expected["b"], "step": expected["step"]})
    assert (
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]["w"]
        == "model-00001-of-00002.safetensors"
    )


def test_a_window_folder_merges_inspects_and_verifies_without_being_changed(tmp_path):
    snaps = states()
    window = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "window")
    for s in snaps:
        window.snapshot(s, step=int(s["step"]) + 100)
    window.close()
    before = folder_digest(tmp_path / "window")
    done = ckptavg(
        "merge",
        "window",
        "--method",
        "posthoc",
        "--option",
        "sigma_rel=0.1",
        "--option",
        "max_lost=1.0",
        "-o",
        "m.safetensors",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert_matches(
        tmp_path / "m.safetensors",
        reference(snaps, coefficients("posthoc", [100, 200, 300, 400], sigma_rel=0.1, max_lost=1.0)),
    )
    report = ckptavg("inspect", "window", "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    (rank,) = json.loads(report.stdout)["ranks"]
    assert rank["steps"] == [100, 200, 300, 400] and rank["damaged"] == [] and rank["tensors"]["count"] == 3
    assert rank["correlation"]["verdict"] in ("average", "newest", "do not average")
    assert ckptavg("verify", "window", cwd=tmp_path).returncode == 0
    victim = sorted((tmp_path / "window").glob("*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the data
    victim.write_bytes(bytes(data))
    damaged_state = folder_digest(tmp_path / "window")
    done = ckptavg("verify", "window", cwd=tmp_path)
    assert done.returncode == 1 and f"damaged: {Path('window') / victim.name}" in done.stdout
    assert folder_digest(tmp_path / "window") == damaged_state != before  # reading never changes a folder


def test_bad_inputs_exit_2_naming_the_file_and_write_nothing(tmp_path):
    snaps = states(2)
    save_file(snaps[0], tmp_path / "a.safetensors")
    save_file({**snaps[1], "w": torch.zeros(64, 31)}, tmp_path / "b.safetensors")
    done = ckptavg("merge", "a.safetensors", "b.safetensors", "-o", "m.safetensors", cwd=tmp_path)
    assert done.returncode == 2 and "b.safetensors: tensor 'w' is torch.float32 [64, 31]" in done.stderr
    done = ckptavg("merge", "a.safetensors", "missing-*.pt", "-o", "m.safetensors", cwd=tmp_path)
    assert done.returncode == 2 and "missing-*.pt: no such file" in done.stderr

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    done = ckptavg("merge", "a.safetensors", "evil.pt", "-o", "m.safetensors", cwd=tmp_path)
    assert done.returncode == 2 and "evil.pt" in done.stderr and not (tmp_path / "pwned").exists()
    done = ckptavg(
        "merge",
        "a.safetensors",
        "a.safetensors",
        "--method",
        "decay",
        "--option",
        "shap=cosine",
        "-o",
        "m.safetensors",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "has no option 'shap'" in done.stderr
    done = ckptavg("merge", "a.safetensors", "a.safetensors", "--weights", "0.5,x", "-o", "m.safetensors", cwd=tmp_path)
    assert done.returncode == 2 and "--weights '0.5,x': expected numbers" in done.stderr
    done = ckptavg("merge", "a.safetensors", "a.safetensors", "--weights", "1,2,3", "-o", "m.safetensors", cwd=tmp_path)
    assert done.returncode == 2 and "expected 2 weights" in done.stderr
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    done = ckptavg("inspect", "bad.safetensors", cwd=tmp_path)
    assert done.returncode == 2 and "bad.safetensors" in done.stderr
    assert not (tmp_path / "m.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp*"))


def test_help_shows_examples():
    done = subprocess.run(
        [sys.executable, "-m", "ckptavg", "--help"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0 and "ckptavg merge run/ckpts/*.safetensors --last 8" in done.stdout
    assert "ckptavg verify" in done.stdout


def tiny_gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=32))


@pytest.mark.parametrize("sharded", [False, True])
def test_merged_hugging_face_folders_load_in_transformers(tmp_path, sharded):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    models = [tiny_gpt2(seed) for seed in (0, 1)]
    for i, model in enumerate(models):
        model.save_pretrained(tmp_path / f"hf-{i}", max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "hf-0" / "model.safetensors.index.json").exists() == sharded
    done = ckptavg("merge", "hf-0", "hf-1", "-o", "merged", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for file in (tmp_path / "merged").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            assert f.metadata()["format"] == "pt" and f.metadata()["ckptavg"] == "merged"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = {
        k: (a.double() + b.double()) / 2
        for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True)
    }
    for name, tensor in loaded.state_dict().items():
        assert torch.allclose(tensor.double(), expected[name], atol=1e-6), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied


def test_every_safetensors_file_ckptavg_writes_says_format_pt(tmp_path):
    window = CheckpointWindow(window=2, storage="disk", dirpath=tmp_path / "window")
    for s in states(2):
        window.snapshot(s, step=int(s["step"]) + 1)
    window.close()
    assert ckptavg("merge", "window", "-o", "m.safetensors", "-q", cwd=tmp_path).returncode == 0
    files = [*(tmp_path / "window").glob("*.safetensors"), tmp_path / "m.safetensors"]
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert f.metadata()["format"] == "pt", file


def test_a_window_written_before_format_pt_still_opens(tmp_path, monkeypatch):
    from ckptavg import files

    legacy = files._legacy_snapshot_metadata
    monkeypatch.setattr("ckptavg.storage.disk.snapshot_metadata", legacy)  # write as ckptavg 0.1 did
    window = CheckpointWindow(window=3, storage="disk", dirpath=tmp_path / "window")
    snaps = states(3)
    for s in snaps:
        window.snapshot(s, step=int(s["step"]) + 1)
    window.close()
    monkeypatch.undo()
    with safe_open(str(next((tmp_path / "window").glob("*.safetensors"))), "pt") as f:
        assert f.metadata()["format"] == "ckptavg.snapshot"
    with CheckpointWindow.open(tmp_path / "window") as reopened:
        assert reopened.verify() == []
        merged = reopened.merge("sma")
    assert torch.allclose(merged["w"].double(), reference(snaps, [1 / 3] * 3)["w"], atol=1e-6)


def trainer_checkpoints(tmp_path, steps):
    """Hugging Face Trainer output folders (checkpoint-<step>) of tiny GPT-2s, with the training
    state and other weight formats a Trainer and hub downloads leave beside the model."""
    folders = []
    for i, step in enumerate(steps):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        tiny_gpt2(i).save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for junk in (
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "training_args.bin",
            "tf_model.h5",
            "flax_model.msgpack",
            "model.onnx",
            "pytorch_model.bin.index.json",
        ):
            (folder / junk).write_bytes(b"not a model")
        (folder / "tokenizer_config.json").write_text("{}")
        folders.append(folder)
    return folders


def test_last_n_orders_trainer_checkpoints_by_step_and_the_output_holds_only_model_files(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    trainer_checkpoints(tmp_path, [500, 1000, 1500])  # by name, checkpoint-1500 sorts before checkpoint-500
    done = ckptavg("merge", "out/checkpoint-*", "--last", "2", "--method", "wma", "-o", "merged", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "inputs, oldest first: out/checkpoint-1000 (step 1000), out/checkpoint-1500 (step 1500)" in done.stdout
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    newer, older = (load_file(str(tmp_path / "out" / f"checkpoint-{s}" / "model.safetensors")) for s in (1500, 1000))
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.allclose(
        loaded.state_dict()[name].double(), (older[name].double() + 2 * newer[name].double()) / 3, atol=1e-6
    )
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]
    done = ckptavg("merge", "out/checkpoint-*", "--last", "4", "-o", "m.safetensors", cwd=tmp_path)
    assert done.returncode == 2 and "--last 4: only 3 inputs" in done.stderr


def test_a_safetensors_output_is_one_file_whatever_the_inputs(tmp_path):
    pytest.importorskip("transformers")
    for i in range(2):
        tiny_gpt2(i).save_pretrained(tmp_path / f"hf-{i}", max_shard_size="20KB")
    done = ckptavg("merge", "hf-0", "hf-1", "-o", "single.safetensors", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "single.safetensors").is_file() and len(load_file(str(tmp_path / "single.safetensors"))) > 10
    again = ckptavg("merge", "hf-0", "hf-1", "-o", "single.safetensors", "-q", cwd=tmp_path)
    assert again.returncode == 2 and "already exists: give --force" in again.stderr
    assert ckptavg("merge", "hf-0", "hf-1", "-o", "single.safetensors", "-q", "--force", cwd=tmp_path).returncode == 0


def test_the_command_line_never_writes_over_or_into_its_inputs(tmp_path):
    pytest.importorskip("transformers")
    snaps = states(2)
    for i, s in enumerate(snaps):
        save_file(s, tmp_path / f"s{i}.safetensors")
    for i in range(2):
        tiny_gpt2(i).save_pretrained(tmp_path / f"hf-{i}", max_shard_size="20KB")
    before = folder_digest(tmp_path)
    for output in ("s1.safetensors", "hf-0", "hf-1/inner", "."):
        for force in ([], ["--force"]):
            inputs = ("s0.safetensors", "s1.safetensors") if output.endswith(".safetensors") else ("hf-0", "hf-1")
            done = ckptavg("merge", *inputs, "-o", output, *force, cwd=tmp_path)
            assert done.returncode == 2, (output, done.stderr)
            assert "input" in done.stderr
    assert folder_digest(tmp_path) == before


def test_a_failed_folder_merge_leaves_nothing_and_a_forced_one_replaces_whole(tmp_path):
    pytest.importorskip("transformers")
    for i in range(2):
        tiny_gpt2(i).save_pretrained(tmp_path / f"hf-{i}", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf-1" / "model.safetensors.index.json").read_text())
    name = next(
        n
        for n, shard in index["weight_map"].items()
        if shard.endswith("00001-of-00003.safetensors") or shard == sorted(set(index["weight_map"].values()))[-1]
    )
    shard = tmp_path / "hf-1" / index["weight_map"][name]
    data = load_file(str(shard))
    data[name] = torch.full_like(data[name], float("nan"))  # fails only when that shard is merged
    save_file(data, shard, metadata={"format": "pt"})
    done = ckptavg("merge", "hf-0", "hf-1", "-o", "merged", cwd=tmp_path)
    assert done.returncode == 2 and "not finite" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-0", "hf-1"]  # no partial folder, no staging left
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.txt").write_text("from before")
    done = ckptavg("merge", "hf-0", "hf-0", "-o", "merged", "--force", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        not (tmp_path / "merged" / "old.txt").exists()
        and (tmp_path / "merged" / "model.safetensors.index.json").exists()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-0", "hf-1", "merged"]


def test_torch_files_holding_more_than_a_state_dict(tmp_path):
    snaps = states(2)
    for i, s in enumerate(snaps):
        torch.save({"model": s, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, tmp_path / f"run{i}.pt")
    done = ckptavg("merge", "run0.pt", "run1.pt", "-o", "m.safetensors", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_matches(tmp_path / "m.safetensors", reference(snaps, [0.5, 0.5]))
    report = ckptavg("inspect", "run0.pt", "--json", cwd=tmp_path)
    assert report.returncode == 0 and json.loads(report.stdout)["state_dict_key"] == "model"
    torch.save({"weights": {"inner": snaps[0]}, "epoch": 3}, tmp_path / "odd.pt")
    for command in (("merge", "odd.pt", "run1.pt", "-o", "x.safetensors"), ("inspect", "odd.pt")):
        done = ckptavg(*command, cwd=tmp_path)
        assert (
            done.returncode == 2 and "odd.pt holds no state dict: its entries are ['epoch', 'weights']" in done.stderr
        )
        assert "Traceback" not in done.stderr
    done = ckptavg("merge", "odd.pt", "odd.pt", "--key", "weights.inner", "-o", "x.safetensors", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from ckptavg import merge_state_dicts

    merged = merge_state_dicts([tmp_path / "run0.pt", tmp_path / "run1.pt"])
    assert set(merged) == set(snaps[0])
    with pytest.raises(ValueError, match="holds no state dict"):
        merge_state_dicts([tmp_path / "odd.pt", tmp_path / "run1.pt"])


def test_odd_inputs_are_named_errors_never_tracebacks(tmp_path):
    snaps = states(3)
    for i, s in enumerate(snaps):
        save_file(s, tmp_path / f"s{i}.safetensors")
    # integers come from the newest input that is merged, not from one weighted zero
    assert (
        ckptavg(
            "merge",
            "s0.safetensors",
            "s1.safetensors",
            "s2.safetensors",
            "--weights",
            "1,1,0",
            "-o",
            "m.safetensors",
            "-q",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    assert int(load_file(str(tmp_path / "m.safetensors"))["step"]) == 100
    # post-hoc EMA over separate files: numbered 1, 2, 3 when their names give no steps
    for i, name in enumerate("abc"):
        save_file(snaps[i], tmp_path / f"{name}.safetensors")
    done = ckptavg(
        "merge",
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
        "--method",
        "posthoc",
        "--option",
        "sigma_rel=0.1",
        "--option",
        "max_lost=1.0",
        "-o",
        "p.safetensors",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    done = ckptavg(
        "merge",
        "s0.safetensors",
        "s1.safetensors",
        "--method",
        "posthoc",
        "--option",
        "sigma_rel=0.1",
        "-o",
        "q.safetensors",
        cwd=tmp_path,
    )
    assert (
        done.returncode == 2
        and "steps must be positive" in done.stderr
        and "read from the inputs' names" in done.stderr
    )
    # an index that maps a tensor to a shard that does not hold it
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": snaps[0]["w"]}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": snaps[0]["b"]}, folder / "model-00002-of-00002.safetensors")
    weight_map = {"w": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for command in (
        ("merge", "hf", "hf", "-o", "x"),
        ("inspect", "hf"),
        ("inspect", "hf/model.safetensors.index.json"),
    ):
        done = ckptavg(*command, cwd=tmp_path)
        assert (
            done.returncode == 2
            and "maps tensor 'w' to model-00002-of-00002.safetensors, which does not hold it" in done.stderr
        ), done.stderr


def test_last_n_of_a_window_folder(tmp_path):
    snaps = states(4)
    window = CheckpointWindow(window=4, storage="disk", dirpath=tmp_path / "window")
    for s in snaps:
        window.snapshot(s, step=int(s["step"]) + 1)
    window.close()
    done = ckptavg("merge", "window", "--last", "2", "-o", "m.safetensors", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_matches(tmp_path / "m.safetensors", reference(snaps[2:], [0.5, 0.5]))
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["steps"]) == [201, 301]
    assert ckptavg("merge", "window", "--last", "5", "-o", "n.safetensors", cwd=tmp_path).returncode == 2


def test_inspect_shows_a_merges_record_and_a_checkpoints_window_and_verify_reads_any_file(tmp_path):
    snaps = states(2)
    for i, s in enumerate(snaps):
        save_file(s, tmp_path / f"s{i}.safetensors")
    assert (
        ckptavg(
            "merge", "s0.safetensors", "s1.safetensors", "--method", "wma", "-o", "m.safetensors", "-q", cwd=tmp_path
        ).returncode
        == 0
    )
    report = json.loads(ckptavg("inspect", "m.safetensors", "--json", cwd=tmp_path).stdout)
    assert report["metadata"]["method"] == "wma" and report["metadata"]["steps"] == [0, 1]
    assert report["metadata"]["coefficients"] == pytest.approx([1 / 3, 2 / 3])
    text = ckptavg("inspect", "m.safetensors", cwd=tmp_path).stdout
    assert "a ckptavg merge: method wma, steps [0, 1]" in text
    assert ckptavg("verify", "m.safetensors", cwd=tmp_path).returncode == 0
    bad = dict(snaps[0], w=snaps[0]["w"].clone())
    bad["w"][3, 3] = float("nan")
    save_file(bad, tmp_path / "nan.safetensors")
    done = ckptavg("verify", "nan.safetensors", "--json", cwd=tmp_path)
    assert done.returncode == 1 and json.loads(done.stdout)["damaged"] == [
        "nan.safetensors: tensor 'w' holds NaN or Inf"
    ]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "s0.safetensors").read_bytes()[:-100])
    done = ckptavg("verify", "cut.safetensors", cwd=tmp_path)
    assert done.returncode == 1 and "damaged: cut.safetensors" in done.stdout
    assert ckptavg("--version", cwd=tmp_path).stdout.startswith("ckptavg ")
    for command in ("merge", "export", "inspect", "verify"):
        help_text = ckptavg(command, "--help", cwd=tmp_path).stdout
        assert "usage:" in help_text and "-h, --help" in help_text and len(help_text.splitlines()) > 8


def test_inspect_says_a_lightning_checkpoint_carries_a_window_and_how_to_export_it(tmp_path, capsys):
    import lightning as L
    from helpers.lit import Regression, data, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ckptavg import CheckpointAverager
    from ckptavg.cli import main

    L.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    averager = CheckpointAverager(window=3, every_n_steps=4, storage="cpu")
    trainer(tmp_path, [averager, saver], max_epochs=1, enable_checkpointing=True).fit(Regression(), *data())
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ckpt" / "last.ckpt"), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    ((name, state),) = report["averagers"].items()
    assert name.startswith("CheckpointAverager") and state["steps"] == [8, 12, 16] and state["storage"] == "cpu"
    assert "ckptavg export" in report["hint"] and report["step"] == 16
    assert main(["inspect", str(tmp_path / "ckpt" / "last.ckpt")]) == 0
    assert "holds a ckptavg window: ckptavg export" in capsys.readouterr().out
