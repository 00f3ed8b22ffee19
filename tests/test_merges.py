import math

import pytest

from ckptavg import coefficients, ema, sma, wma
from ckptavg.merges import normalize


def test_sma_wma_formulas():
    assert sma(4) == [0.25] * 4
    assert wma(4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert sma(1) == [1.0] and wma(1) == [1.0]


@pytest.mark.parametrize("n", [1, 2, 5, 10])
@pytest.mark.parametrize("alpha", [0.1, 0.2, 0.5, 1.0])
def test_ema_matches_pma_recursion(n, alpha):
    # Unroll M^(i) = alpha*M_i + (1-alpha)*M^(i-1) symbolically: track each snapshot's weight.
    weights = [1.0] + [0.0] * (n - 1)
    for i in range(1, n):
        weights = [(1 - alpha) * w for w in weights]
        weights[i] += alpha
    assert ema(n, alpha) == pytest.approx(weights, abs=1e-15)
    assert ema(n, alpha)[0] == pytest.approx((1 - alpha) ** (n - 1))
    assert math.fsum(ema(n, alpha)) == pytest.approx(1.0, abs=1e-12)


def test_default_alpha_is_pma_value():
    assert coefficients("ema", 3) == pytest.approx(ema(3, 0.2))


def test_explicit_weights_are_normalised_and_may_be_negative():
    assert coefficients([1, 1, 2], 3) == pytest.approx([0.25, 0.25, 0.5])
    assert coefficients([-1, 3], 2) == pytest.approx([-0.5, 1.5])
    assert coefficients("SMA", 2) == [0.5, 0.5]


@pytest.mark.parametrize(
    "method, n, alpha, message",
    [
        ("sma", 0, 0.2, "empty window"),
        ("median", 3, 0.2, "unknown merge method 'median'"),
        ("ema", 3, 0.0, r"alpha must be in \(0, 1\]"),
        ("ema", 3, 1.5, r"alpha must be in \(0, 1\]"),
        ("ema", 3, float("nan"), r"alpha must be in \(0, 1\]"),
        ([1.0, 2.0], 3, 0.2, "expected 3 weights"),
        ([1.0, -1.0], 2, 0.2, "sum to a positive number"),
        ([0.0, 0.0], 2, 0.2, "sum to a positive number"),
        ([1.0, float("inf")], 2, 0.2, "finite"),
        (["a", "b"], 2, 0.2, "must be numbers"),
        (3.0, 2, 0.2, "name"),
    ],
)
def test_bad_merge_arguments(method, n, alpha, message):
    with pytest.raises(ValueError, match=message):
        coefficients(method, n, alpha)


def test_normalize_length_error_names_expectation():
    with pytest.raises(ValueError, match="one per stored snapshot"):
        normalize([1.0], 2)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0, -1.0 + 1e-9], "nearly cancel"),
        ([1e308, 1e308], "overflow|sum to a positive"),
        ([float("inf"), 1.0], "finite"),
    ],
)
def test_weights_that_cannot_be_normalised_safely_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        coefficients(weights, 2)
