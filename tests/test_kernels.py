"""ckptavg.kernels: the one streaming weighted-sum kernel, against a float64 reference."""

import math

import pytest
import torch

from ckptavg.kernels import all_finite, merge_blocks, weighted_sum_
from ckptavg.layout import BLOCK_NUMEL, Layout


@pytest.mark.parametrize("row_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weighted_sum_accumulates_in_the_accumulators_dtype(row_dtype):
    torch.manual_seed(0)
    rows = [torch.randn(1000).to(row_dtype) for _ in range(4)]
    coefficients = [0.1, -0.2, 0.5, 0.6]
    acc = torch.empty(1000)
    scratch = torch.empty(1000)
    weighted_sum_(acc, zip(rows, coefficients, strict=True), scratch)
    reference = sum(c * r.double() for r, c in zip(rows, coefficients, strict=True))
    assert acc.dtype == torch.float32
    assert torch.allclose(acc.double(), reference, atol=1e-6)
    assert weighted_sum_(torch.ones(3), []).eq(0).all()  # no rows: zero, not the stale contents


def test_merge_blocks_streams_every_block_and_copies_integers_from_the_newest():
    torch.manual_seed(1)
    # A block size smaller than a tensor, so tensors straddle blocks and blocks hold several pieces.
    specs = [("w", torch.float32, (7, 5)), ("h", torch.bfloat16, (9,)), ("count", torch.int64, (3,))]
    layout = Layout(specs, block_numel=8)
    snapshots = [
        {"w": torch.randn(7, 5), "h": torch.randn(9).bfloat16(), "count": torch.tensor([i, i, i])} for i in range(3)
    ]
    coefficients = [0.2, 0.3, 0.5]
    groups = [{d: torch.cat([s[e.name].reshape(-1) for e in layout if e.dtype == d]) for d in layout.group_numel}
              for s in snapshots]  # fmt: skip

    def rows(dtype, lo, hi):
        return [(g[dtype][lo:hi], c) for g, c in zip(groups, coefficients, strict=True)]

    done = []
    merged = merge_blocks(layout, rows, lambda dtype, lo, hi: groups[-1][dtype][lo:hi], progress=done.append)
    for name in ("w", "h"):
        reference = sum(c * s[name].double() for s, c in zip(snapshots, coefficients, strict=True))
        assert merged[name].dtype == snapshots[0][name].dtype
        assert torch.allclose(merged[name].double(), reference, atol=1e-2 if name == "h" else 1e-6)
    assert torch.equal(merged["count"], snapshots[-1]["count"])  # integers are not averaged
    assert sum(done) == 35 + 9 + 3
    assert all(
        t.untyped_storage().data_ptr() != merged["w"].untyped_storage().data_ptr()
        for k, t in merged.items()
        if k != "w"
    )


def test_all_finite_finds_nan_and_inf_in_any_block_of_any_float_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        tensor = torch.zeros(3, BLOCK_NUMEL // 2 + 5, dtype=dtype)  # two blocks and a piece
        assert all_finite(tensor)
        for bad in (math.nan, math.inf, -math.inf):
            tensor[-1, -1] = bad
            assert not all_finite(tensor)
            tensor[-1, -1] = 0
