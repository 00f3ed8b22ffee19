"""ckptavg.layout: names, dtypes and shapes, and where each tensor lives in the flat buffers."""

import pytest
import torch

from ckptavg.layout import Layout, accumulation_dtype, dtype_code, dtype_from_code, is_averaged, state_tensors


def test_groups_are_ordered_by_item_size_and_blocks_cover_every_element_once():
    layout = Layout([("a", torch.bfloat16, (5,)), ("b", torch.float64, (2, 3)), ("c", torch.float32, (4,))], 4)
    assert list(layout.group_numel) == [torch.float64, torch.float32, torch.bfloat16]
    offsets = layout.group_byte_offsets()
    assert offsets[torch.float64] == 0 and offsets[torch.float32] == 6 * 8 and offsets[torch.bfloat16] == 6 * 8 + 16
    assert layout.nbytes == 6 * 8 + 4 * 4 + 5 * 2
    for dtype, blocks in layout.blocks.items():
        covered = [
            i for block in blocks for piece in block.pieces for i in range(piece.offset, piece.offset + piece.length)
        ]
        assert covered == list(range(layout.group_numel[dtype]))
        assert all(block.hi - block.lo <= 4 for block in blocks)
    assert Layout.from_json(layout.to_json()).to_json() == layout.to_json()


def test_views_write_through_to_the_group_buffers():
    layout = Layout.from_tensors({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    buffers = layout.new_buffers()
    views = layout.views(buffers)
    views["w"].fill_(1.0)
    views["b"].fill_(2.0)
    assert buffers[torch.float32].tolist() == [1.0] * 6 + [2.0] * 3


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"w": torch.zeros(2, 3)}, "missing key 'b'"),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(3), "x": torch.zeros(1)}, "unexpected key 'x'"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, r"key 'w' has shape \(3, 2\)"),
        ({"w": torch.zeros(2, 3).double(), "b": torch.zeros(3)}, "key 'w' has dtype torch.float64"),
        ({"w": torch.zeros(2, 3, device="meta"), "b": torch.zeros(3)}, "meta device"),
    ],
)
def test_check_names_the_first_key_that_differs(tensors, message):
    layout = Layout.from_tensors({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=message):
        layout.check(tensors)


def test_bad_specs_are_refused_by_name():
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        Layout([("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(ValueError, match="__metadata__"):
        Layout([("__metadata__", torch.float32, (1,))])
    with pytest.raises(ValueError, match="negative dimension"):
        Layout([("a", torch.float32, (-1,))])
    with pytest.raises(ValueError, match="complex64"):
        Layout.from_tensors({"z": torch.zeros(2, dtype=torch.complex64)})


def test_dtype_codes_and_which_dtypes_are_averaged():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool, torch.uint8):
        assert dtype_from_code(dtype_code(dtype)) == dtype
    assert is_averaged(torch.bfloat16) and not is_averaged(torch.int64) and not is_averaged(torch.bool)
    assert accumulation_dtype(torch.bfloat16) == torch.float32 and accumulation_dtype(torch.float64) == torch.float64


def test_state_tensors_of_a_module_are_its_state_dict_detached():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    tensors = state_tensors(model)
    assert set(tensors) == set(model.state_dict())
    assert not any(t.requires_grad for t in tensors.values())
    assert tensors["0.weight"].data_ptr() == model[0].weight.data_ptr()  # views, not copies
