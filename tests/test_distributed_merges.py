"""ckptavg.distributed: DiLoCo, Streaming DiLoCo and SPARTA with 2 real gloo processes, against
float64 references."""

import pytest
import torch
from conftest import run_ranks

from ckptavg.distributed import DiLoCo, Sparta

SIZES = [35, 7, 21, 3]  # the worker's model: Linear(5, 7), Tanh, Linear(7, 3)


def slices(groups):
    bounds = [sum(SIZES[:i]) for i in range(len(SIZES) + 1)]
    return [[(bounds[i], bounds[i + 1]) for i in group] for group in groups]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks("workers/diloco.py", tmp_path_factory.mktemp("diloco"), torchrun=True)


def test_replicas_built_from_different_seeds_start_identical(ranks):
    assert torch.equal(ranks[0]["start"], ranks[1]["start"])


def test_outer_sgd_with_lr_1_is_periodic_averaging(ranks):
    plain = [r["plain"] for r in ranks]
    for step in range(6):
        locals_ = [p["before"][step].double() for p in plain]
        if (step + 1) % 3:
            assert not torch.equal(plain[0]["after"][step], plain[1]["after"][step])  # between syncs: apart
            continue
        mean = (locals_[0] + locals_[1]) / 2
        for p in plain:
            assert torch.allclose(p["after"][step].double(), mean, rtol=0, atol=1e-6)
        assert torch.equal(plain[0]["after"][step], plain[1]["after"][step])
    assert plain[0]["bytes"] == 2 * sum(SIZES) * 4  # two syncs of every float32 parameter


def test_the_nesterov_outer_step_matches_a_float64_reference_and_moves_toward_the_replicas(ranks):
    runs = [r["nesterov"] for r in ranks]
    global_ = ranks[0]["nesterov_start"].double()
    momentum = None
    for step in range(6):
        if (step + 1) % 2:
            continue
        mean = (runs[0]["before"][step].double() + runs[1]["before"][step].double()) / 2
        delta = global_ - mean  # the pseudo-gradient: global - local, averaged
        momentum = delta.clone() if momentum is None else 0.9 * momentum + delta
        new = global_ - 0.7 * (delta + 0.9 * momentum)
        if step == 1:  # the first outer step: Nesterov over-shoots past the mean, in its direction
            assert torch.dot(new - global_, mean - global_) > 0
        global_ = new
        for run in runs:
            assert torch.allclose(run["after"][step].double(), global_, rtol=0, atol=1e-6)


def test_fragments_sync_at_their_staggered_steps(ranks):
    runs = [r["fragments"] for r in ranks]
    first, second = slices(runs[0]["groups"])
    for step, synced, apart in ((2, second, first), (4, first, second), (6, second, first), (8, first, second)):
        a, b = runs[0]["after"][step - 1], runs[1]["after"][step - 1]
        assert all(torch.equal(a[lo:hi], b[lo:hi]) for lo, hi in synced), step
        assert not all(torch.equal(a[lo:hi], b[lo:hi]) for lo, hi in apart), step
    assert runs[0]["bytes"] == 2 * sum(SIZES) * 2  # every element twice, in bfloat16


def test_sparta_with_fraction_1_averages_after_every_step_and_draws_the_same_indices(ranks):
    runs = [r["sparta_full"] for r in ranks]
    for step in range(3):
        mean = (runs[0]["before"][step].double() + runs[1]["before"][step].double()) / 2
        assert torch.allclose(runs[0]["after"][step].double(), mean, rtol=0, atol=1e-6)
        assert torch.equal(runs[0]["after"][step], runs[1]["after"][step])
    for a, b in zip(ranks[0]["sparta_indices"], ranks[1]["sparta_indices"], strict=True):
        assert torch.equal(a, b)
    partial = ranks[0]["sparta_partial"]
    assert partial["step"] == 5 and partial["bytes"] == 5 * sum(-(-n // 10) for n in SIZES) * 4


def test_a_run_stopped_and_resumed_mid_round_ends_bit_identical(ranks):
    for r in ranks:
        assert torch.equal(r["resume"]["whole"], r["resume"]["resumed"])


def test_a_killed_replica_makes_the_other_fail_with_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import HANG_GUARD_S, TESTS

    env = os.environ | {"PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    subprocess.run([*command, str(TESTS / "workers/diloco.py"), str(tmp_path), "killed"], env=env, timeout=HANG_GUARD_S)
    assert not (tmp_path / "rank1.pt").exists()  # it was gone before saving anything
    survivor = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert "a replica stopped or the connection broke" in survivor["lost"]
    assert survivor["seconds"] < 60  # well within the process group's timeout, not a hang


def test_replicas_whose_models_differ_are_refused_on_every_rank(tmp_path):
    ranks = run_ranks("workers/diloco.py", tmp_path, "mismatch", torchrun=True)
    assert (
        "rank 1's model differs from this one's: ('0.weight', (7, 5), 'torch.float32') vs ('0.weight', (8, 5)"
        in ranks[0]["error"]
    )
    assert "rank 0's model differs" in ranks[1]["error"]


def test_bad_configuration_is_refused_before_training():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        DiLoCo(model, optimizer, sync_every=10)
    with pytest.raises(ValueError, match="sync_every=10 must be a multiple of fragments=3"):
        DiLoCo(model, optimizer, sync_every=10, fragments=3)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        Sparta(model, optimizer, fraction=0)
    with pytest.raises(ValueError, match="fraction must be in"):
        Sparta(model, optimizer, fraction=1.5)
    with pytest.raises(ValueError, match="sync_every must be a positive integer"):
        DiLoCo(model, optimizer, sync_every=0)


def test_lightning_diloco_strategy_trains_replicas_apart_and_the_averager_merges_the_global_weights(tmp_path):
    ranks = run_ranks("workers/diloco_lightning.py", tmp_path)
    assert [r["wrapped"] for r in ranks] == ["Regression", "Regression"]  # no DistributedDataParallel
    assert ranks[0]["steps"] == [16, 20, 24] and "merged/val_loss" in ranks[0]["logged"]
    assert ranks[0]["bytes"] > 0
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), name
    # The module ends with the SMA of the global (merged) weights at the snapshot steps.
    snapshots = [ranks[0]["globals"][step] for step in ranks[0]["steps"]]
    for name, tensor in ranks[0]["weights"].items():
        if tensor.is_floating_point():
            reference = sum(s[name].double() for s in snapshots) / len(snapshots)
            assert torch.allclose(tensor.double(), reference, rtol=0, atol=1e-6), name


def test_the_trainer_with_diloco_trains_replicas_apart_and_merges_them_every_sync(tmp_path):
    pytest.importorskip("transformers")
    ranks = run_ranks("workers/hf_diloco.py", tmp_path, torchrun=True)
    assert ranks[0]["wrapped"] == "DistributedDataParallel"  # the Trainer's wrapper, with a hook that sends nothing
    a, b = ranks[0]["seen"], ranks[1]["seen"]
    assert not torch.equal(a[3], b[3])  # between syncs the replicas differ: no gradient all-reduce
    assert torch.equal(a[5], b[5]) and torch.equal(a[20], b[20])  # after each sync they agree
    numel = a[5].numel()
    assert ranks[0]["bytes"] == 4 * numel * 4  # four syncs of every float32 parameter
    assert ranks[0]["steps"] == [15, 20] and torch.equal(ranks[0]["final"], ranks[1]["final"])


def test_the_adapters_refuse_a_bad_configuration_at_construction():
    from ckptavg.hf import DiLoCoCallback
    from ckptavg.lightning import DiLoCoStrategy

    for adapter in (DiLoCoStrategy, DiLoCoCallback):
        with pytest.raises(ValueError, match="sync_every=10 must be a multiple of fragments=3"):
            adapter(sync_every=10, fragments=3)
        with pytest.raises(ValueError, match="fraction must be in"):
            adapter(sync_every=10, sparta_fraction=2.0)
