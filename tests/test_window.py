import copy
import io

import numpy as np
import pytest
import torch
from conftest import TinyNet, assert_close_to_reference, perturbed_states, reference_merge
from torch.optim.swa_utils import AveragedModel

from ckptavg import CheckpointWindow, CorruptSnapshotError
from ckptavg.layout import Layout


@pytest.fixture(params=["cpu", "disk"])
def make_window(request, tmp_path):
    counter = iter(range(100))

    def make(window=4, **kwargs):
        if request.param == "disk":
            return CheckpointWindow(window=window, storage="disk", dirpath=tmp_path / f"w{next(counter)}", **kwargs)
        return CheckpointWindow(window=window, **kwargs)

    return make


def filled(make_window, tiny_net, count: int, window: int):
    """A window holding ``count`` training-like states taken at steps 0, 1, ..."""
    states = perturbed_states(tiny_net, count)
    win = make_window(window=window)
    for step, state in enumerate(states):
        assert win.snapshot(state, step=step)
    return win, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["sma", "wma", "ema", [0.5, 1.0, 3.0, 0.25]])
def test_every_method_matches_float64_reference(make_window, tiny_net, dtype, method):
    states = perturbed_states(tiny_net, 6, dtype=dtype)
    win = make_window(window=4)
    for step, state in enumerate(states):
        assert win.snapshot(state, step=step * 10)
    assert win.steps == [20, 30, 40, 50]
    merged = win.merge(method, alpha=0.3)
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in states[-1].items()}
    assert_close_to_reference(merged, reference_merge(states[-4:], method, alpha=0.3))
    # Integer buffers are the newest snapshot's, never averaged.
    assert merged["bn.num_batches_tracked"].item() == states[-1]["bn.num_batches_tracked"].item() == 6
    win.close()


def test_sma_over_all_snapshots_equals_torch_swa(tiny_net):
    states = perturbed_states(tiny_net, 7)
    swa = AveragedModel(TinyNet())
    model = TinyNet()
    win = CheckpointWindow(window=7)
    for step, state in enumerate(states):
        model.load_state_dict(state)
        swa.update_parameters(model)
        win.snapshot(model, step=step)
    merged = win.merge("sma")
    for name, param in swa.module.named_parameters():
        torch.testing.assert_close(merged[name], param, rtol=1e-6, atol=1e-6)


def test_bf16_accumulates_in_fp32_and_rounds_once():
    # A bf16 EMA (the timm/fairseq complaint) rounds at every step; ckptavg accumulates in fp32
    # and rounds once, so it is the exact result correctly rounded.
    generator = torch.Generator().manual_seed(0)
    states = [{"w": (1.0 + 0.05 * torch.randn(10_000, generator=generator)).to(torch.bfloat16)} for _ in range(8)]
    win = CheckpointWindow(window=8)
    for step, s in enumerate(states):
        win.snapshot(s, step=step)
    merged = win.merge("ema", alpha=0.2)["w"].double()
    exact = torch.from_numpy(reference_merge(states, "ema", 0.2)["w"])
    assert torch.equal(merged, exact.to(torch.bfloat16).double())
    naive = states[0]["w"].clone()
    for s in states[1:]:
        naive = 0.2 * s["w"] + 0.8 * naive
    assert (naive.double() - exact).abs().mean() > 1.5 * (merged - exact).abs().mean()


def test_tensors_are_paired_by_name_not_position():
    a = {"x": torch.zeros(3), "y": torch.ones(3)}
    b = {"y": torch.full((3,), 3.0), "x": torch.full((3,), 2.0)}  # same names, other order
    win = CheckpointWindow(window=2)
    win.snapshot(a, step=0)
    win.snapshot(b, step=1)
    merged = win.merge("sma")
    assert list(merged) == ["x", "y"]
    assert torch.equal(merged["x"], torch.full((3,), 1.0))
    assert torch.equal(merged["y"], torch.full((3,), 2.0))


def test_ring_wraps_around_many_times_without_reallocating(tiny_net):
    states = perturbed_states(tiny_net, 23)
    win = CheckpointWindow(window=5)
    win.snapshot(states[0], step=0)
    snapshot_bytes = sum(t.numel() * t.element_size() for t in states[0].values())
    assert win.stored_nbytes == 6 * snapshot_bytes  # the whole ring (window + the spare row), allocated once
    for step, state in enumerate(states[1:], start=1):
        win.snapshot(state, step=step)
        assert len(win) == min(step + 1, 5) and win.stored_nbytes == 6 * snapshot_bytes
    assert win.steps == list(range(18, 23))
    for step in win.steps:  # the read API gives back each stored snapshot exactly
        assert all(torch.equal(value, states[step][key]) for key, value in win.read(step).items())
    assert_close_to_reference(win.merge("wma"), reference_merge(states[-5:], "wma"))


def test_merge_of_big_tensors_crosses_block_boundaries():
    # Tensors larger than a block, and many small ones sharing a block, in a tiny block size.
    torch.manual_seed(1)
    states = [
        {"big": torch.randn(37, 11), "small": torch.randn(3), "tiny": torch.randn(()), "n": torch.tensor(i)}
        for i in range(3)
    ]
    win = CheckpointWindow(window=3)
    win.snapshot(states[0], step=0)
    win.layout.__init__([(e.name, e.dtype, e.shape) for e in win.layout], block_numel=16)  # a tiny block plan
    assert len(win.layout.blocks[torch.float32]) > 20
    for step, s in enumerate(states[1:], start=1):
        win.snapshot(s, step=step)
    assert_close_to_reference(win.merge("ema"), reference_merge(states, "ema"))


def test_weights_vector(make_window, tiny_net):
    win = make_window(window=4)
    for step, s in enumerate(perturbed_states(tiny_net, 3)):
        win.snapshot(s, step=step)
    assert win.weights("sma") == pytest.approx([1 / 3] * 3)
    assert win.weights("ema", alpha=0.2) == pytest.approx([0.64, 0.16, 0.2])
    assert sum(win.weights("wma")) == pytest.approx(1.0)
    win.close()


def test_snapshot_accepts_a_model_and_defaults_the_step(tiny_net):
    win = CheckpointWindow(window=3)
    assert win.snapshot(tiny_net) and win.snapshot(tiny_net, step=7) and win.snapshot(tiny_net)
    assert win.steps == [0, 7, 8]
    with pytest.raises(ValueError, match="not after the newest stored step 8"):
        win.snapshot(tiny_net, step=8)
    with pytest.raises(ValueError, match="non-negative integer"):
        win.snapshot(tiny_net, step=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_snapshot_is_dropped_by_the_first_merge_that_reads_it(make_window, tiny_net, bad):
    states = perturbed_states(tiny_net, 5)
    win = make_window(window=4)
    for step, s in enumerate(states[:4]):
        win.snapshot(s, step=step)
    before = win.merge("sma")
    poisoned = copy.deepcopy(states[4])
    poisoned["fc2.weight"][1, 2] = bad
    assert win.snapshot(poisoned, step=9)  # a plain copy: nothing is checked here
    assert win.steps == [1, 2, 3, 9]
    with pytest.warns(RuntimeWarning, match=r"step 9 \(tensor 'fc2.weight'\); dropped from the window"):
        after = win.merge("sma")
    if win.storage == "cpu":  # the snapshot step 9 evicted comes back: its row was still intact
        assert win.steps == [0, 1, 2, 3]
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:  # its file was deleted when step 9 was written
        assert win.steps == [1, 2, 3]
        assert_close_to_reference(after, reference_merge(states[1:4], "sma"))
    assert win.snapshot(states[4], step=10)  # and the window still works
    assert all(torch.isfinite(t).all() for t in win.merge("ema").values() if t.is_floating_point())
    win.close()


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_every_way_to_merge_drops_non_finite_snapshots_and_never_shows_them(tmp_path, tiny_net, storage):
    states = perturbed_states(tiny_net, 4)
    poisoned = copy.deepcopy(states[3])
    poisoned["fc1.bias"][0] = float("nan")

    def fresh():
        win = CheckpointWindow(
            window=5,
            storage=storage,
            dirpath=tmp_path / f"w{len(list(tmp_path.iterdir()))}" if storage == "disk" else None,
        )
        for step, s in enumerate([*states[:3], poisoned]):
            win.snapshot(s, step=step)
        return win

    expected = reference_merge(states[:3], "wma")
    model = copy.deepcopy(tiny_net)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    uses = {
        "merge": lambda w: w.merge("wma"),
        "load_into": lambda w: (w.load_into(model, "wma"), model.state_dict())[1],
        "swapped": lambda w: _inside_swap(w, model),
        "merge out=": lambda w: w.merge("wma", out={k: torch.empty_like(v) for k, v in states[0].items()}),
    }
    for name, use in uses.items():
        win = fresh()
        with pytest.warns(RuntimeWarning, match=r"step 3 \(tensor 'fc1.bias'\)"):
            merged = use(win)
        assert win.steps == [0, 1, 2], name
        assert_close_to_reference(merged, expected)
        win.close()
    assert all(
        torch.equal(own[k], v) or k.startswith("fc") or k.startswith("bn") for k, v in model.state_dict().items()
    )


def _inside_swap(win, model):
    with win.swapped(model, "wma"):
        return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_merge_of_only_non_finite_snapshots_is_refused_and_changes_no_model(tiny_net):
    win = CheckpointWindow(window=3)
    state = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    state["fc2.weight"][0, 0] = float("inf")
    win.snapshot(state, step=1)
    model = copy.deepcopy(tiny_net)
    with pytest.raises(ValueError, match=r"step 1 \(tensor 'fc2.weight'\).*no finite snapshot"):
        win.load_into(model, "sma")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_net.state_dict().values(), strict=True)
    )
    assert win.steps == []


def test_huge_finite_values_are_not_rejected():
    # Their block sum overflows to inf; the element-wise confirmation must accept them.
    big = torch.full((100,), 3.0e38)
    win = CheckpointWindow(window=2)
    assert win.snapshot({"w": big}, step=0)
    assert win.snapshot({"w": big.half().float().clamp(max=6e4)}, step=1)
    assert torch.equal(win.merge([1.0, 0.0])["w"], big)
    assert win.steps == [0, 1]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("fc1.bias"), "missing key 'fc1.bias'"),
        (lambda s: s.update(extra=torch.zeros(1)), "unexpected key 'extra'"),
        (lambda s: s.update({"fc1.weight": torch.zeros(3, 3)}), r"key 'fc1.weight' has shape \(3, 3\)"),
        (lambda s: s.update({"fc1.weight": s["fc1.weight"].double()}), "key 'fc1.weight' has dtype torch.float64"),
    ],
)
def test_mismatched_snapshot_names_the_key(make_window, tiny_net, change, message):
    states = perturbed_states(tiny_net, 2)
    win = make_window(window=3)
    win.snapshot(states[0], step=0)
    change(states[1])
    with pytest.raises(ValueError, match=message):
        win.snapshot(states[1], step=1)
    assert win.steps == [0]
    win.close()


def test_merge_argument_errors(make_window, tiny_net):
    win = make_window(window=3)
    with pytest.raises(ValueError, match="empty window"):
        win.merge("sma")
    win.snapshot(tiny_net, step=0)
    win.snapshot(tiny_net, step=1)
    with pytest.raises(ValueError, match="unknown merge method 'avg'"):
        win.merge("avg")
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        win.merge("ema", alpha=0)
    with pytest.raises(ValueError, match="expected 2 weights"):
        win.merge([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        win.load_into(tiny_net, [1.0, -1.0])
    win.close()


def test_constructor_errors(tmp_path):
    with pytest.raises(ValueError, match="window must be a positive integer"):
        CheckpointWindow(window=0)
    with pytest.raises(ValueError, match="storage must be 'cpu' or 'disk'"):
        CheckpointWindow(storage="gpu")
    with pytest.raises(ValueError, match="needs a dirpath"):
        CheckpointWindow(storage="disk")


def test_load_into_writes_merged_weights_in_place(make_window, tiny_net):
    win, states = filled(make_window, tiny_net, 3, window=3)
    target = TinyNet()
    param = target.fc1.weight
    win.load_into(target, "wma")
    assert target.fc1.weight is param  # in place: optimizers keep pointing at the same tensors
    ref = reference_merge(states, "wma")
    for name, t in target.state_dict().items():
        np.testing.assert_allclose(t.double().numpy(), ref[name], rtol=1e-6, atol=1e-6)
    win.close()


def test_load_into_checks_the_model_before_writing(tiny_net):
    win = CheckpointWindow(window=2)
    win.snapshot(tiny_net, step=0)
    other = TinyNet(width=5)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="fc1.weight"):
        win.load_into(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_swapped_restores_bit_for_bit_after_an_exception(make_window, tiny_net):
    win, states = filled(make_window, tiny_net, 3, window=3)
    model = TinyNet()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")  # the raw weights may hold anything, NaN included
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    merged = win.merge("ema")
    with pytest.raises(RuntimeError, match="boom"):
        with win.swapped(model, "ema") as inside:
            assert inside is model
            for k, v in model.state_dict().items():
                assert torch.equal(v, merged[k])
            raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(
            v.view(torch.uint8) if v.is_floating_point() else v,
            raw[k].view(torch.uint8) if v.is_floating_point() else raw[k],
        )
    win.close()


def test_state_dict_round_trip_through_torch_save(tiny_net):
    states = perturbed_states(tiny_net, 7, dtype=torch.bfloat16)
    win = CheckpointWindow(window=4)
    for step, s in enumerate(states[:6]):
        win.snapshot(s, step=step * 5)
    buffer = io.BytesIO()
    torch.save(win.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = CheckpointWindow(window=4)
    restored.load_state_dict(state)
    assert restored.steps == win.steps == [10, 15, 20, 25]
    for k, v in win.merge("ema").items():
        assert torch.equal(restored.merge("ema")[k], v) and restored.merge("ema")[k].dtype == v.dtype
    # Both go on identically after the round trip (the ring order was restored, not just the data).
    win.snapshot(states[6], step=30)
    restored.snapshot(states[6], step=30)
    for k, v in win.merge("wma").items():
        assert torch.equal(restored.merge("wma")[k], v)


def test_state_dict_of_empty_window_and_storage_mismatch(tmp_path):
    empty = CheckpointWindow(window=2).state_dict()
    win = CheckpointWindow(window=2)
    win.load_state_dict(empty)
    assert len(win) == 0
    with pytest.raises(ValueError, match="this window stores on 'disk'"):
        CheckpointWindow(storage="disk", dirpath=tmp_path / "d").load_state_dict(empty)
    with pytest.raises(ValueError, match="not a CheckpointWindow state dict"):
        win.load_state_dict({"steps": []})


def test_loading_a_bigger_state_into_a_smaller_window_keeps_the_newest(tiny_net):
    states = perturbed_states(tiny_net, 5)
    big = CheckpointWindow(window=5)
    for step, s in enumerate(states):
        big.snapshot(s, step=step)
    small = CheckpointWindow(window=2)
    small.load_state_dict(big.state_dict())
    assert small.steps == [3, 4]
    assert_close_to_reference(small.merge(), reference_merge(states[-2:], "sma"))


def test_layout_json_round_trip_keeps_order_and_offsets():
    layout = Layout.from_tensors(
        {"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(3), "c": torch.zeros(1, dtype=torch.int64)}
    )
    again = Layout.from_json(layout.to_json())
    assert again == layout and list(again.entries) == ["a", "b", "c"]
    assert list(layout.group_numel) == [torch.int64, torch.float32, torch.bfloat16]  # aligned when packed
    with pytest.raises(ValueError, match="cannot store"):
        Layout.from_tensors({"z": torch.zeros(1, dtype=torch.complex64)})


def test_merge_into_reused_output(make_window, tiny_net):
    win, states = filled(make_window, tiny_net, 3, window=3)
    first = win.merge("sma")
    pointers = {k: v.data_ptr() for k, v in first.items()}
    again = win.merge("ema", out=first)
    assert {k: v.data_ptr() for k, v in again.items()} == pointers
    assert_close_to_reference(again, reference_merge(states, "ema"))
    with pytest.raises(ValueError, match="out: key 'fc1.weight' has dtype torch.float64"):
        win.merge(out=first | {"fc1.weight": first["fc1.weight"].double()})
    with pytest.raises(ValueError, match=r"out\['fc1.weight'\] must be a contiguous CPU tensor"):
        win.merge(out=first | {"fc1.weight": first["fc1.weight"].t().contiguous().t()})
    win.close()


def test_load_into_a_model_in_another_dtype_and_one_requiring_grad(tiny_net):
    states = perturbed_states(tiny_net, 2)
    win = CheckpointWindow(window=2)
    for step, s in enumerate(states):
        win.snapshot(s, step=step)
    half = TinyNet().to(torch.bfloat16)
    win.load_into(half)  # not writable in place: merged, then cast while copying
    ref = reference_merge(states, "sma")
    np.testing.assert_allclose(half.fc1.weight.detach().double().numpy(), ref["fc1.weight"], rtol=1e-2)
    model = TinyNet()
    assert model.fc1.weight.requires_grad
    win.load_into(model)
    np.testing.assert_allclose(model.fc1.weight.detach().double().numpy(), ref["fc1.weight"], rtol=1e-6)
    loss = model(torch.randn(4, 8)).sum()
    loss.backward()  # the autograd graph still works after the in-place write
    assert model.fc1.weight.grad is not None


def test_swapped_with_a_bad_method_leaves_the_model_alone(tiny_net):
    win = CheckpointWindow(window=2)
    win.snapshot(tiny_net, step=0)
    before = copy.deepcopy(tiny_net.state_dict())
    with pytest.raises(ValueError, match="unknown merge method"):
        with win.swapped(tiny_net, "mean"):
            pass
    assert all(torch.equal(before[k], v) for k, v in tiny_net.state_dict().items())


def test_pin_memory_without_cuda_falls_back_with_a_warning(tiny_net):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: pinning works")
    win = CheckpointWindow(window=2, pin_memory=True)
    with pytest.warns(UserWarning, match="pin_memory=True needs CUDA"):
        assert win.snapshot(tiny_net, step=0)


def test_every_storable_dtype_on_both_tiers(make_window):
    # fp16 sums overflow easily (the exact check must confirm), integer/bool tensors come from the
    # newest snapshot, 0-d and empty tensors keep their shapes; the disk tier round-trips every code.
    generator = torch.Generator().manual_seed(0)

    def state(i: int) -> dict[str, torch.Tensor]:
        return {
            "half": (torch.ones(3000) * 30 + torch.randn(3000, generator=generator)).half(),  # sum > fp16 max
            "bf16": torch.randn(5, 7, generator=generator).bfloat16(),
            "f64": torch.randn(4, generator=generator).double(),
            "f32_scalar": torch.tensor(float(i)),
            "empty": torch.zeros(0, 3),
            "i8": torch.tensor([i, -i], dtype=torch.int8),
            "u8": torch.tensor([i, 2 * i], dtype=torch.uint8),
            "i16": torch.tensor([i], dtype=torch.int16),
            "i32": torch.tensor([[i]], dtype=torch.int32),
            "flag": torch.tensor([i % 2 == 0, True]),
        }

    states = [state(i) for i in range(4)]
    win = make_window(window=3)
    for step, s in enumerate(states):
        assert win.snapshot(s, step=step)
    merged = win.merge("wma")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in merged.items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in states[-1].items()
    }
    assert_close_to_reference(merged, reference_merge(states[-3:], "wma"))
    win.close()
    if win.storage == "disk":  # the standard reader agrees on every dtype code
        from safetensors import safe_open

        newest = sorted(win.dirpath.glob("snapshot-*.safetensors"))[-1]
        with safe_open(str(newest), framework="pt") as f:
            for key, value in states[-1].items():
                assert torch.equal(f.get_tensor(key), value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_snapshots_are_asynchronous_pinned_and_exact(make_window):
    # The copy runs on a side stream into pinned buffers; the NaN verdict is read when the copy has
    # completed, so a refused snapshot is dropped (with a warning) at the next window operation.
    torch.manual_seed(0)
    model = TinyNet(width=4096).cuda()
    win = make_window(window=3)
    states = []
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        assert win.snapshot(model, step=step, overlap=True)
        win.before_update()  # the in-place update below must wait for the copy (on the device)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0)  # an in-place write queued right after the snapshot
        states.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    assert win.steps == [2, 3, 4]
    if win.storage == "cpu":
        assert win.pinned_memory
    assert_close_to_reference(win.merge("wma"), reference_merge(states[-3:], "wma"))
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    assert win.snapshot(model, step=5)  # accepted for copying: the check completes later
    with pytest.warns(UserWarning, match="step 5 rejected: tensor 'fc1.weight'"):  # CUDA: checked on the device
        merged = win.merge("sma")
        win.flush()
    assert win.steps == [2, 3, 4]
    assert_close_to_reference(merged, reference_merge(states[-3:], "sma"))


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_before_takes_integer_tensors_from_the_newest_snapshot_it_merges(tmp_path, tiny_net, storage):
    """merge(before=25) over steps 10..40 must not take BatchNorm's counter from step 40."""
    states = perturbed_states(tiny_net, 4)
    win = CheckpointWindow(window=4, storage=storage, dirpath=tmp_path / "w" if storage == "disk" else None)
    for step, s in zip((10, 20, 30, 40), states, strict=True):
        win.snapshot(s, step=step)
    merged = win.merge("sma", before=25)
    assert_close_to_reference(merged, reference_merge(states[:2], "sma"))
    assert int(merged["bn.num_batches_tracked"]) == int(states[1]["bn.num_batches_tracked"])
    win.close()


def test_tensors_that_cannot_be_stored_are_named_before_anything_changes(tiny_net):
    state = dict(tiny_net.state_dict())
    win = CheckpointWindow(window=2)
    with pytest.raises(ValueError, match="'__metadata__' cannot be stored"):
        win.snapshot(state | {"__metadata__": torch.zeros(1)}, step=1)
    with pytest.raises(ValueError, match="'fc1.weight' is on the meta device"):
        win.snapshot(state | {"fc1.weight": torch.empty(16, 8, device="meta")}, step=1)
    with pytest.raises(ValueError, match="'fc1.weight' is torch.sparse_coo"):
        win.snapshot(state | {"fc1.weight": state["fc1.weight"].to_sparse()}, step=1)
    assert win.layout is None and len(win) == 0  # nothing fixed by a refused first snapshot
    assert win.snapshot(state, step=1)
    with pytest.raises(ValueError, match="key 'fc2.weight' is on the meta device"):
        win.snapshot(state | {"fc2.weight": torch.empty(4, 16, device="meta")}, step=2)
    assert win.steps == [1]


def test_an_extrapolation_past_the_dtype_range_is_refused_before_the_model_changes():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    win = CheckpointWindow(window=2)
    with torch.no_grad():
        model.weight.fill_(-3e38)
        win.snapshot(model, step=1)
        model.weight.fill_(3e38)
        win.snapshot(model, step=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: win.load_into(model, [-1.0, 2.0]), lambda: win.merge([-1.0, 2.0])):
        with pytest.raises(ValueError, match=r"overflows torch.bfloat16 in tensor 'weight'"):
            call()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    win.load_into(model, [0.5, 0.5])  # a convex merge is fine
    assert torch.isfinite(model.weight).all()


def test_swapped_inside_autocast_evaluates_the_merged_weights():
    """Issue 12: autocast caches its low-precision copies of the weights for the whole region, so
    weights swapped in place were ignored: the "merged" forward ran the raw weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    win = CheckpointWindow(window=2)
    for _ in range(2):
        win.snapshot(model)
        with torch.no_grad():
            model.weight.add_(1.0)
    twin = torch.nn.Linear(8, 4)
    twin.load_state_dict(win.merge("sma"))
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model(x)  # fills the cache with the raw weights' bf16 copy
        with win.swapped(model, "sma"):
            merged = model(x)
        back = model(x)
        expected = twin(x)
    assert torch.equal(merged, expected) and torch.equal(back, raw)


def test_merged_model_is_a_copy_holding_the_merge(tiny_net):
    states = perturbed_states(tiny_net, 3)
    win = CheckpointWindow(window=3)
    for step, state in enumerate(states, start=1):
        win.snapshot(state, step=step)
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    merged = win.merged_model(tiny_net, "wma")
    assert merged is not tiny_net and type(merged) is type(tiny_net)
    assert_close_to_reference(merged.state_dict(), reference_merge(states, "wma"))
    for key, value in tiny_net.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_every_entry_point_takes_a_method_and_its_options_the_same_way(tmp_path, tiny_net, storage):
    """Issue 13: weights, merge, load_into, swapped, merged_model, merge_state_dicts and
    consolidate all take a registered method plus its options by name."""
    from ckptavg import coefficients, consolidate, merge_state_dicts

    states = perturbed_states(tiny_net, 5)
    steps = [10, 20, 40, 50, 60]  # uneven: a snapshot was skipped at 30
    win = CheckpointWindow(window=5, storage=storage, dirpath=tmp_path / "win" if storage == "disk" else None)
    for step, state in zip(steps, states, strict=True):
        win.snapshot(state, step=step)
    expected = coefficients("decay", steps, shape="1-sqrt")
    assert win.weights("decay", shape="1-sqrt") == expected
    reference = reference_merge(states, expected)
    assert_close_to_reference(win.merge("decay", shape="1-sqrt"), reference)
    assert_close_to_reference(win.merged_model(tiny_net, "decay", shape="1-sqrt").state_dict(), reference)
    with win.swapped(tiny_net, "decay", shape="1-sqrt"):
        assert_close_to_reference(tiny_net.state_dict(), reference)
    before = coefficients("decay", steps[:3], shape="cosine") + [0.0, 0.0]
    assert win.weights("decay", before=45, shape="cosine") == before
    with pytest.raises(ValueError, match="has no option 'shap'"):
        win.merge("decay", shap="1-sqrt")
    assert_close_to_reference(
        merge_state_dicts(states, "decay", shape="cosine"),
        reference_merge(states, coefficients("decay", 5, shape="cosine")),
    )
    if storage == "disk":
        win.flush()
        assert_close_to_reference(consolidate(tmp_path / "win", "decay", shape="1-sqrt"), reference)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_the_read_api_gives_each_stored_snapshot_back(tmp_path, tiny_net, storage):
    """Issue 13: a public read API over stored snapshots (no test reaches into a store)."""
    states = perturbed_states(tiny_net, 4, dtype=torch.bfloat16)
    win = CheckpointWindow(window=3, storage=storage, dirpath=tmp_path / "win" if storage == "disk" else None)
    for step, state in enumerate(states, start=1):
        win.snapshot(state, step=step)
    for step in (2, 3, 4):
        snapshot = win.read(step)
        assert list(snapshot) == list(states[step - 1])
        for key, value in snapshot.items():
            assert value.dtype == states[step - 1][key].dtype and torch.equal(value, states[step - 1][key]), key
    snapshot_bytes = sum(t.numel() * t.element_size() for t in states[0].values())
    assert win.stored_nbytes >= 3 * snapshot_bytes
    with pytest.raises(KeyError, match=r"no snapshot of step 1 is held \(held: \[2, 3, 4\]\)"):
        win.read(1)
    if storage == "disk":
        win.flush()
        path = tmp_path / "win" / "snapshot-000000000003.safetensors"
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF  # one flipped byte in the data section
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptSnapshotError, match="checksum mismatch"):
            win.read(3)
        assert win.steps == [2, 4]  # dropped and named, as in a merge


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_nested_and_repeated_swaps_restore_each_level_exactly(tmp_path, storage):
    """swapped() reuses one host buffer for its copy of the model's weights across calls (a preview
    at every validation allocates nothing); a swap inside a swap gets its own."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    window = CheckpointWindow(window=4, storage=storage, dirpath=tmp_path / "w" if storage == "disk" else None)
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.add_(0.1 * step)
        window.snapshot(model, step=step)
    raw = copy.deepcopy(model.state_dict())
    sma, wma = window.merge("sma"), window.merge("wma")
    for _ in range(3):
        with window.swapped(model, "sma"):
            assert all(torch.equal(model.state_dict()[k], sma[k]) for k in sma)
            with window.swapped(model, "wma"):
                assert all(torch.equal(model.state_dict()[k], wma[k]) for k in wma)
            assert all(torch.equal(model.state_dict()[k], sma[k]) for k in sma)
        assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)
    window.load_into(model, "wma")  # the disk tier merges into its idle staging buffer: the window is unchanged
    assert all(torch.equal(model.state_dict()[k], wma[k]) for k in wma)
    assert all(torch.equal(window.merge("sma")[k], sma[k]) for k in sma)
    window.close()


def test_a_restored_ring_merges_bit_for_bit_like_the_original_after_more_snapshots():
    """A restored window lays its rows out differently from the ring it continues; its merges must
    not depend on that (a gemv over runs of consecutive rows did: reverted)."""
    torch.manual_seed(0)
    states = [{"w": torch.randn(3000, 70), "b": torch.randn(70)} for _ in range(14)]
    original = CheckpointWindow(window=4)
    for step, state in enumerate(states[:7], start=1):  # the ring has wrapped around: rows 2, 3, 4, 0
        original.snapshot(state, step=step)
    restored = CheckpointWindow(window=4)
    restored.load_state_dict(torch.load(io.BytesIO(_saved(original.state_dict())), weights_only=True))
    for step, state in enumerate(states[7:], start=8):
        for window in (original, restored):
            window.snapshot(state, step=step)
        for method in ("sma", "wma", "ema"):
            a, b = original.merge(method), restored.merge(method)
            assert all(torch.equal(a[k], b[k]) for k in a), (step, method)


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
