"""Real torch.distributed (gloo, 2 processes on CPU): FSDP2 shard-native windows, spread DDP windows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_close_to_reference, reference_merge, run_ranks

from ckptavg import CheckpointWindow, consolidate


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_fsdp2_windows_are_shard_native_and_consistent(tmp_path):
    # Each rank snapshots, merges and restores its own DTensor shards (cpu and disk tiers); the
    # merged model, gathered, equals a single-process merge of the full tensors. A NaN on one rank
    # restores both at the same step, to the same pre-spike merge.
    ranks = run_ranks("workers/fsdp.py", tmp_path, torchrun=True)
    assert ranks[0]["local_shapes"]["0.weight"] == (8, 8)  # half of (16, 8): only the shard is stored
    assert ranks[0]["local_shapes"]["2.weight"] == (3, 16) and ranks[1]["local_shapes"]["2.weight"] == (2, 16)
    sharding = ranks[1]["sharding"]
    assert (sharding["kind"], sharding["rank"], sharding["world_size"]) == ("dtensor", 1, 2)
    assert sharding["placements"]["2.weight"] == {"shape": [5, 16], "offset": [3, 0]}

    # Step 8 (the weights that the NaN loss of step 9 measured) left both windows at the restore.
    assert ranks[0]["steps"] == ranks[1]["steps"] == [7, 10, 11]
    reference = reference_merge(ranks[0]["full_states"], "ema")
    for rank in ranks:
        for tier in ("cpu", "disk"):
            assert_close_to_reference(rank[tier], reference)
    assert_equal_states(ranks[0]["cpu"], ranks[1]["cpu"])
    assert torch.equal(
        torch.cat([ranks[0]["cpu_local"]["0.weight"], ranks[1]["cpu_local"]["0.weight"]]), ranks[0]["cpu"]["0.weight"]
    )

    restored = [r["restored"] for r in ranks]
    assert restored[0]["step"] == restored[1]["step"] == 9
    assert restored[0]["steps_merged"] == [6, 7]  # before the onset - 1
    assert_equal_states(restored[0]["weights"], restored[1]["weights"])
    assert_close_to_reference(restored[0]["weights"], reference_merge(ranks[0]["pre_spike_states"], "sma"))

    # Offline: the per-rank folders consolidate into the full merged state dict.
    assert_close_to_reference(ranks[0]["consolidated"], reference)


def test_ddp_spread_window_equals_the_full_one_bit_for_bit(tmp_path):
    # The full window of rank 0 is the reference: DDP parameters are identical on every rank, and
    # rank 0's buffers (BatchNorm statistics) are the ones DDP broadcasts.
    ranks = run_ranks("workers/ddp_window.py", tmp_path, torchrun=True)
    full = ranks[0]
    assert not torch.equal(ranks[0]["sma_full"]["module.1.running_mean"], ranks[1]["sma_full"]["module.1.running_mean"])
    for rank in ranks:
        assert rank["sharding_kind"] == "spread"
        # Each rank stores half of every dtype group (up to alignment).
        assert rank["stored_numel"]["spread"] <= rank["stored_numel"]["full"] / 2 + 64
        for key in ("sma", "wma", "ema", "before"):
            assert_equal_states(rank[f"{key}_spread"], full[f"{key}_full"])
        assert_equal_states(rank["disk"], full["wma_full"])
        assert_equal_states(rank["reopened"], full["wma_full"])
        assert_equal_states(rank["resumed"], full["ema_full"])
        assert_equal_states(rank["swapped"], {k.removeprefix("module."): v for k, v in full["sma_full"].items()})
        assert_equal_states(rank["loaded"], {k.removeprefix("module."): v for k, v in full["ema_full"].items()})
        assert rank["after_swap_equal"]
        assert_equal_states(*rank["odd_dtypes"])
        # A NaN in rank 1's half: both ranks drop the snapshot at the next merge, and say why.
        assert rank["nan_accepted"] is True and rank["steps_with_nan"] == [4, 5, 6]
        assert rank["steps_after_nan"] == [3, 4, 5]
        assert_equal_states(rank["after_nan"], full["ema_full"])
        assert any("NaN" in m and "step 6" in m for m in rank["nan_warning"])
    assert "module.3.bias" in ranks[1]["nan_warning"][0]
    assert "another rank" in ranks[0]["nan_warning"][0]
    assert_equal_states(ranks[0]["ema_spread"], ranks[1]["ema_spread"])
    assert_equal_states(ranks[0]["consolidated"], ranks[0]["wma_full"])

    # Whole windows join a spread run (spread again), and the ranks' states combine into one
    # whole window that a single process loads: the merges stay bit for bit the same.
    for rank in ranks:
        assert rank["respread_stored"] == rank["stored_numel"]["spread"]
        assert_equal_states(rank["respread_combined"], full["ema_full"])
        assert_equal_states(rank["respread_full"], full["ema_full"])
    alone = CheckpointWindow(window=3)
    alone.load_state_dict(CheckpointWindow.combine_states([ranks[0]["state"], ranks[1]["state"]]))
    assert alone.steps == [3, 4, 5] and alone.sharding is None
    assert_equal_states(alone.merge("wma"), full["wma_full"])
    with pytest.raises(ValueError, match="one state per rank, in rank order"):
        CheckpointWindow.combine_states([ranks[1]["state"], ranks[0]["state"]])
    # A rank's part cannot pass for a whole window: a single process refuses it, naming both.
    with pytest.raises(ValueError, match="rank 1 of 2 .* this process is rank 0 of 1"):
        CheckpointWindow(window=3).load_state_dict(ranks[1]["state"])
    # Opened directly, a rank folder is a window of that rank's slices (no gather, no error).
    with CheckpointWindow.open(tmp_path / "window" / "rank1") as piece:
        assert piece.sharding["kind"] == "spread" and piece.steps == [3, 4, 5]
        part = piece.merge("sma")
        assert "module.0.weight" not in part and part["module.1.bias"].shape == (10,)  # fp32 elements 320..566
    # Rank 0 indexes the folders; a single process cannot mistake the index for a window.
    index = json.loads((tmp_path / "window" / "manifest.json").read_text())
    assert (index["world_size"], index["kind"], index["ranks"]) == (2, "spread", ["rank0", "rank1"])
    with pytest.raises(ValueError, match="folders of a 2-process window"):
        CheckpointWindow.open(tmp_path / "window")
    # Without every rank's folder there is no full merge.
    shutil.rmtree(tmp_path / "window" / "rank1")
    with pytest.raises(FileNotFoundError, match=r"\['rank1'\] are missing"):
        consolidate(tmp_path / "window")


def test_lightning_model_parallel_strategy_keeps_fsdp2_shards(tmp_path):
    # ModelParallelStrategy with fully_shard on CPU: each rank keeps its shards in its own disk
    # folder; a NaN on rank 1 restores both ranks together; the run ends with the merge on every
    # rank, merged.safetensors holds the full tensors, and the folders consolidate offline.
    from safetensors.torch import load_file

    ranks = run_ranks("workers/fsdp_lightning.py", tmp_path)
    assert ranks[0]["local_shapes"]["net.0.weight"] == (16, 8)  # half of (32, 8)
    assert ranks[0]["restores"] == ranks[1]["restores"] == [(12, [4, 6, 8, 10])]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [8, 10, 14, 16]
    assert ranks[0]["merged_val_loss"] is not None and ranks[1]["merged_val_loss"] is not None
    reference = reference_merge([ranks[0]["states"][s] for s in ranks[0]["steps"]], "sma")
    assert_equal_states(ranks[0]["final"], ranks[1]["final"])
    assert_close_to_reference(ranks[0]["final"], reference)
    assert_equal_states(load_file(tmp_path / "out" / "merged.safetensors"), ranks[0]["final"])
    assert sorted(p.name for p in (tmp_path / "out" / "window").iterdir()) == ["manifest.json", "rank0", "rank1"]
    assert_equal_states(consolidate(tmp_path / "out" / "window", "sma"), ranks[0]["final"])


def test_lightning_model_parallel_resume_is_bit_identical(tmp_path):
    # cpu tier under ModelParallelStrategy: Lightning writes a distributed checkpoint (one file per
    # rank plus rank 0's meta.pt, which carries every rank's window shards); a run stopped after 2
    # epochs and resumed by a new Trainer ends exactly like an uninterrupted one.
    ranks = run_ranks("workers/fsdp_lightning.py", tmp_path, "resume")
    assert (tmp_path / "ckpt" / "last.ckpt" / "meta.pt").is_file()
    for rank in ranks:
        assert rank["steps_a"] == rank["steps_b"] == [18, 20, 22, 24]
        assert_equal_states(rank["b"], ranks[0]["a"])
