"""Student's t quantile, for the 95 % intervals of the report's power-law fits and of the studies' means.

Exact to the 1e-8 of its numerical integration, in pure Python (no SciPy: it is not a dependency).
"""

from __future__ import annotations

import functools
import math

__all__ = ["t_quantile"]


def _t_cdf(x: float, df: int) -> float:
    """Student-t CDF at x ≥ 0 by Simpson's rule on the density (2,000 panels: error far below 1e-8 for x ≤ 700)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 2000
    h = x / n

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    s = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile (0.5 ≤ p < 1) of Student's t distribution with ``df`` degrees of freedom.

    >>> round(t_quantile(0.975, 4), 3), round(t_quantile(0.975, 1), 2)
    (2.776, 12.71)
    """
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile: needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}.")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2
