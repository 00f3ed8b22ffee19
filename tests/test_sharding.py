"""ckptavg.sharding: how a replicated model's window is split over ranks and put back together.
(The same pieces under real torch.distributed, gloo, are in tests/test_distributed.py.)"""

import pytest
import torch

from ckptavg.layout import Layout
from ckptavg.sharding import Spread, assemble, distributed_rank, is_dtensor


def _model_tensors():
    torch.manual_seed(0)
    return {
        "embed": torch.randn(37, 5),
        "norm": torch.randn(5).bfloat16(),
        "steps": torch.arange(3),
        "bias": torch.randn(11),
    }


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_element_is_on_exactly_one_rank_and_the_slices_reassemble_bit_for_bit(world):
    tensors = _model_tensors()
    full = Layout.from_tensors(tensors)
    spreads = [Spread(full, rank, world) for rank in range(world)]
    for dtype, numel in full.group_numel.items():
        owned = [i for s in spreads for i in range(*s.ranges[dtype])]
        assert owned == list(range(numel))  # contiguous, disjoint, in rank order
    pieces = [(s.local_views(tensors), s.placements()) for s in spreads]
    rebuilt = assemble(pieces)
    assert set(rebuilt) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(rebuilt[name], tensor) and rebuilt[name].dtype == tensor.dtype


def test_the_local_layout_is_the_slice_of_the_full_groups():
    tensors = _model_tensors()
    full = Layout.from_tensors(tensors)
    spread = Spread(full, 1, 2)
    flats, views = spread.local_outputs()
    for name, view in spread.local_views(tensors).items():
        views[name].copy_(view)
    full_groups = {d: torch.cat([tensors[e.name].reshape(-1) for e in full if e.dtype == d]) for d in full.group_numel}
    for dtype, (lo, hi) in spread.ranges.items():
        assert torch.equal(flats[dtype][: hi - lo], full_groups[dtype][lo:hi])


def test_a_missing_rank_is_named_not_filled_with_garbage():
    tensors = _model_tensors()
    full = Layout.from_tensors(tensors)
    spreads = [Spread(full, rank, 2) for rank in range(2)]
    with pytest.raises(ValueError, match=r"tensor '\w+' is incomplete: \d+ of \d+ elements are on no rank's files"):
        assemble([(spreads[0].local_views(tensors), spreads[0].placements())])


def test_outside_torch_distributed_this_is_one_process():
    assert distributed_rank() == (0, 1)
    assert not is_dtensor(torch.zeros(2))
