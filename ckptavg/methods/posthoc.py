"""Post-hoc EMA (EDM2, Karras et al., arXiv 2312.02696), reconstructed from one window.

EDM2's power-function EMA averages every weight the run has had, weighting the weights of step
``t`` by ``t^gamma``: a profile that scales with training time, so its relative width
``sigma_rel`` (the profile's standard deviation over its length) stays fixed. Here the profile
at the newest step ``T`` is integrated over the window by the midpoint rule: snapshot ``j``
stands for the steps closer to it than to its neighbours (the oldest also for half an interval
before it, the newest up to ``T``, itself) and gets the profile's mass there,
``(b/T)^(gamma+1) - (a/T)^(gamma+1)``. This is exact when the weights move linearly between
snapshots, up to a term in the square of the spacing.

The profile's mass before the oldest snapshot's interval, ``(a_0 / T)^(gamma+1)``, cannot be
recovered: it is dropped (the vector is scaled to sum to 1), and a warning says how much was
lost when that is more than ``max_lost`` (default 5%): the window is too short for that width.

>>> from ckptavg.methods import coefficients
>>> [round(c, 4) for c in coefficients("posthoc", [100, 200, 300, 400], gamma=1.0)]
[0.127, 0.254, 0.381, 0.2381]
"""

from __future__ import annotations

import math
import warnings

from ..files import CkptavgWarning
from .registry import MergeContext, merge_method


def sigma_rel_of(gamma: float) -> float:
    """EDM2's relative standard deviation of the power profile ``t^gamma`` (eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def _widest_gamma() -> float:
    """Where ``sigma_rel_of`` peaks (near -0.3): EDM2 uses the branch beyond it, where a larger
    ``gamma`` means a narrower profile."""
    lo, hi = -0.999, 5.0
    for _ in range(200):  # ternary search on a unimodal function
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (a, hi) if sigma_rel_of(a) < sigma_rel_of(b) else (lo, b)
    return (lo + hi) / 2


WIDEST_GAMMA = _widest_gamma()
WIDEST_SIGMA_REL = sigma_rel_of(WIDEST_GAMMA)


def gamma_of(sigma_rel: float) -> float:
    """The exponent whose profile has relative width ``sigma_rel`` (EDM2; bisection on the
    branch where the width decreases with ``gamma``)."""
    if not 0.0 < sigma_rel < WIDEST_SIGMA_REL:
        raise ValueError(f"merge method 'posthoc': sigma_rel must be in (0, {WIDEST_SIGMA_REL:.4f}), got {sigma_rel}")
    lo, hi = WIDEST_GAMMA, 1e9
    for _ in range(300):
        mid = math.sqrt((lo + 1) * (hi + 1)) - 1  # bisect on a log scale of gamma + 1
        lo, hi = (mid, hi) if sigma_rel_of(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


@merge_method("posthoc")
def posthoc(
    ctx: MergeContext, *, sigma_rel: float | None = None, gamma: float | None = None, max_lost: float = 0.05
) -> list[float]:
    """EDM2's power-function EMA at the newest snapshot, from the window's raw snapshots: give
    ``sigma_rel`` (EDM2's width, e.g. 0.05 to 0.15) or ``gamma``. Steps must be positive."""
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("merge method 'posthoc': give sigma_rel or gamma (one of them)")
    g = gamma_of(float(sigma_rel)) if sigma_rel is not None else float(gamma)  # type: ignore[arg-type]
    if not g > -1.0 or not math.isfinite(g):
        raise ValueError(f"merge method 'posthoc': gamma must be > -1, got {g}")
    steps = ctx.steps
    if steps[0] <= 0:
        raise ValueError(
            f"merge method 'posthoc': steps must be positive (the profile starts at step 0), got {list(steps)}"
        )
    if len(steps) == 1:
        return [1.0]
    end, power = float(steps[-1]), g + 1.0
    mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:], strict=True)]
    lows = [max(0.0, steps[0] - (steps[1] - steps[0]) / 2)] + mids
    highs = mids + [end]
    weights = [(b / end) ** power - (a / end) ** power for a, b in zip(lows, highs, strict=True)]
    lost = (lows[0] / end) ** power
    if lost > max_lost:
        warnings.warn(
            f"post-hoc EMA (gamma={g:.3g}, sigma_rel={sigma_rel_of(g):.3g}): the window from step {steps[0]} to {steps[-1]} "
            f"covers only {100 * (1 - lost):.0f}% of the profile; the {100 * lost:.0f}% before it is dropped. Keep a "
            "longer window (more or sparser snapshots) or choose a smaller sigma_rel",
            CkptavgWarning,
            stacklevel=4,
        )
    return weights
