"""Greedy soup (Wortsman et al., arXiv 2203.05482), over the window's snapshots.

Rank the snapshots by their own held-out score, start from the best one, and add each next one
only if the uniform average of the soup with it scores strictly better. Snapshots that score NaN
or infinity alone never join. The result is a uniform
average of the snapshots kept. It costs ``2N - 1`` evaluations: each snapshot alone, then one
per candidate addition.
"""

from __future__ import annotations

import math

from .registry import MergeContext, merge_method


@merge_method("greedy_soup")
def greedy_soup(ctx: MergeContext) -> list[float]:
    """Uniform average of the snapshots a greedy pass keeps (held-out data; ``evaluate=``)."""
    score = ctx.require_score("greedy_soup")

    def uniform(members: list[int]) -> list[float]:
        return [1.0 / len(members) if i in members else 0.0 for i in range(ctx.n)]

    alone = [score(uniform([i])) for i in range(ctx.n)]
    scored = [i for i in range(ctx.n) if math.isfinite(alone[i])]  # a NaN or infinite score is never best
    if not scored:
        raise ValueError(
            f"greedy_soup: every snapshot scored NaN or infinity on the held-out data ({alone}); nothing to choose from"
        )
    order = sorted(scored, key=lambda i: (alone[i], -i))  # ties: the newer snapshot first
    soup, best = [order[0]], alone[order[0]]
    for candidate in order[1:]:
        trial = score(uniform(soup + [candidate]))
        if trial < best:  # False for NaN
            soup, best = soup + [candidate], trial
    return uniform(soup)
