import itertools
import math

import pytest

from ckptavg import coefficients
from ckptavg.methods import ema, normalize, sma, wma


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


# -- the registry and the schedule-matched merge (issue 13) ----------------------------------------


def test_method_modules_doctests():
    import doctest

    from ckptavg import ensembles, learning
    from ckptavg.methods import decay as decay_module
    from ckptavg.methods import moving_averages, posthoc

    for module in (decay_module, moving_averages, posthoc, learning, ensembles):
        assert doctest.testmod(module).failed == 0, module.__name__


def wsm_reference(shape, steps):
    """WSM's rule in float64, written out: c_j = f(t_j) - f(t_{j+1}), t from the steps."""
    from fractions import Fraction

    f = {
        "linear": lambda t: 1 - t,
        "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
        "1-sqrt": lambda t: 1 - math.sqrt(t),
        "1-square": lambda t: 1 - t * t,
    }[shape]
    n = len(steps)
    last = Fraction(steps[-1] - steps[0], n - 1) if n > 1 else Fraction(1)
    span = steps[-1] - steps[0] + last
    t = [float(Fraction(s - steps[0]) / span) for s in steps] + [1.0]
    return [f(t[j]) - f(t[j + 1]) for j in range(n)]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", "1-square"])
@pytest.mark.parametrize("steps", [[100], [10, 20, 30, 40, 50, 60, 70, 80], [0, 10, 30, 40], [5, 6, 100]])
def test_decay_matches_the_wsm_rule(shape, steps):
    got = coefficients("decay", steps, shape=shape)
    assert got == pytest.approx(wsm_reference(shape, steps), abs=1e-12)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-12)


def test_decay_linear_over_even_steps_is_sma_and_even_spacing_uses_j_over_n():
    assert coefficients("decay", [10, 20, 30, 40], shape="linear") == pytest.approx(sma(4), abs=1e-15)
    n = 8
    f = lambda t: 1 - math.sqrt(t)  # noqa: E731
    assert coefficients("decay", n, shape="1-sqrt") == pytest.approx(
        [f(j / n) - f((j + 1) / n) for j in range(n)], abs=1e-12
    )
    assert coefficients("decay", n, shape=lambda t: (1 - t) ** 2) == pytest.approx(
        [(1 - j / n) ** 2 - (1 - (j + 1) / n) ** 2 for j in range(n)]
    )


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("decay", {"shape": "exp"}, r"shape 'exp' is not one of \['1-sqrt', '1-square', 'cosine', 'linear'\]"),
        ("decay", {"shap": "linear"}, r"merge method 'decay' has no option 'shap'; its options: \['shape'\]"),
        ("decay", {"shape": 3}, r"option 'shape' must be str \| Callable"),
        ("decay", {"shape": lambda t: t}, r"f\(0\) = 1 and f\(1\) = 0"),
        ("decay", {"shape": lambda t: {0.0: 1.0, 0.25: 0.5, 0.5: 0.8, 0.75: 0.3, 1.0: 0.0}[t]}, "must not increase"),
        ("sma", {"shape": "linear"}, r"merge method 'sma' has no option 'shape'; its options: none"),
        ("mystery", {}, r"unknown merge method 'mystery'; expected one of \[.*'decay'"),
        ([1, 2], {"shape": "linear"}, "explicit weights take no options"),
    ],
)
def test_bad_methods_and_options_are_named_before_any_arithmetic(method, options, message):
    with pytest.raises(ValueError, match=message):
        coefficients(method, 2 if isinstance(method, list) else 4, **options)


def test_a_method_is_one_function_and_one_decorator_and_names_are_unique():
    from ckptavg.methods import MergeContext, merge_method, method_names

    @merge_method("newest-only-for-test")
    def newest(ctx: MergeContext, *, boost: float = 1.0) -> list[float]:
        """All weight on the newest snapshot."""
        return [0.0] * (ctx.n - 1) + [boost]

    try:
        assert "newest-only-for-test" in method_names()
        assert coefficients("newest-only-for-test", [3, 7, 9]) == [0.0, 0.0, 1.0]
        with pytest.raises(ValueError, match="already registered"):
            merge_method("newest-only-for-test")(newest)
        with pytest.raises(ValueError, match="option 'boost' must be float"):
            coefficients("newest-only-for-test", 2, boost="big")
        with pytest.raises(TypeError, match="options must be keyword-only"):
            merge_method("positional-options-for-test")(lambda ctx, boost=1.0: [1.0])
    finally:
        from ckptavg.methods import registry

        registry._METHODS.pop("newest-only-for-test", None)


def test_posthoc_ema_integrates_edm2s_power_profile_over_the_window():
    import numpy as np

    from ckptavg.methods.posthoc import gamma_of, sigma_rel_of

    # EDM2's published pairs (Karras et al. 2024): sigma_rel 0.05 -> gamma 16.97, 0.10 -> 6.94.
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in (0.02, 0.1, 0.25):
        assert sigma_rel_of(gamma_of(sigma)) == pytest.approx(sigma, rel=1e-9)
    steps = [400, 800, 1200, 1600, 2000, 2400, 2800, 3200]
    gamma = gamma_of(0.1)
    got = coefficients("posthoc", steps, sigma_rel=0.1)
    # Independent: the profile t^gamma integrated numerically over each snapshot's midpoint cell.
    edges = [200.0] + [(a + b) / 2 for a, b in itertools.pairwise(steps)] + [3200.0]
    masses = []
    for a, b in itertools.pairwise(edges):
        t = np.linspace(a, b, 20001)
        masses.append(np.trapezoid((t / 3200.0) ** gamma, t))
    assert got == pytest.approx(list(np.array(masses) / sum(masses)), rel=1e-6)
    assert coefficients("posthoc", steps, gamma=gamma) == pytest.approx(got, abs=1e-15)
    with pytest.raises(ValueError, match="give sigma_rel or gamma"):
        coefficients("posthoc", steps)
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.300"):
        coefficients("posthoc", steps, sigma_rel=0.5)


def test_posthoc_warns_when_the_window_is_too_short_for_the_width():
    from ckptavg import CkptavgWarning

    with pytest.warns(CkptavgWarning, match=r"covers only \d+% of the profile.*longer window"):
        coefficients("posthoc", list(range(1000, 1080, 10)), sigma_rel=0.15)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coefficients("posthoc", list(range(100, 900, 100)), sigma_rel=0.05)  # a narrow profile inside the window


def test_merge_spec_checks_once_where_it_is_written_and_merges_bit_for_bit_like_the_name():
    import doctest

    import torch

    from ckptavg import CheckpointWindow, MergeSpec
    from ckptavg.methods import spec as spec_module

    assert doctest.testmod(spec_module).failed == 0
    for bad, message in (
        ({"method": "ema", "alpha": 0.0}, "alpha must be in"),
        ({"method": "ema", "alhpa": 0.3}, "has no option 'alhpa'"),
        ({"method": "decay", "shape": "cosnie"}, "'cosnie' is not one of"),
        ({"method": "nope"}, "unknown merge method 'nope'"),
        ({"method": [0.5, 0.5]}, "must be a registered method's name"),
    ):
        with pytest.raises(ValueError, match=message):
            MergeSpec(**bad)
    spec = MergeSpec("EMA", alpha=0.3)
    assert spec.method == "ema" and dict(spec.options) == {"alpha": 0.3}
    assert spec == MergeSpec("ema", alpha=0.3) and hash(spec) == hash(MergeSpec("ema", alpha=0.3))
    with pytest.raises(AttributeError):
        spec.method = "sma"  # type: ignore[misc]
    with pytest.raises(ValueError, match="carries its own options"):
        coefficients(spec, 3, 0.5)
    with pytest.raises(ValueError, match="carries its own options"):
        MergeSpec.of(spec, alpha=0.5)
    assert MergeSpec.of("decay", shape="cosine") == MergeSpec("decay", shape="cosine")

    torch.manual_seed(0)
    window = CheckpointWindow(4)
    model = torch.nn.Linear(3, 2)
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        window.snapshot(model, step=step)
    for spec, (name, alpha, options) in (
        (MergeSpec("ema", alpha=0.3), ("ema", 0.3, {})),
        (MergeSpec("decay", shape="1-sqrt"), ("decay", 0.2, {"shape": "1-sqrt"})),
    ):
        assert window.weights(spec) == window.weights(name, alpha, **options) == spec.coefficients(window.steps)
        for key, tensor in window.merge(spec).items():
            assert torch.equal(tensor, window.merge(name, alpha, **options)[key])


def test_the_averager_takes_a_merge_spec_as_merge_and_as_candidates():
    from ckptavg import CheckpointAverager, MergeSpec

    averager = CheckpointAverager(
        merge=MergeSpec("ema", alpha=0.3), candidates={"cos": MergeSpec("decay", shape="cosine")}
    )
    assert (averager.merge, averager.alpha, averager.merge_options) == ("ema", 0.3, {})
    assert averager.candidates["cos"].method == "decay" and averager.candidates["cos"].options == {"shape": "cosine"}
    listed = CheckpointAverager(candidates=[MergeSpec("wma")])
    assert list(listed.candidates) == ["wma"]
