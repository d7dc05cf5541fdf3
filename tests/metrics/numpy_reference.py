"""Independent NumPy (float64) values of the weight-space quantities, for the metric and DynamicsMonitor tests."""

from __future__ import annotations

import numpy as np


def np_reference(W: np.ndarray, W0: np.ndarray, v: np.ndarray, mass: float = 0.9) -> dict[str, float | np.ndarray]:
    """Every quantity of docs/metrics.md §1 of ``W`` (rows = neurons), from its definition."""
    W, W0, v = (np.asarray(x, dtype=np.float64) for x in (W, W0, v))
    m = W.shape[0]
    norms = np.array([np.dot(w, w) for w in W])
    dots = np.abs(W @ v)
    cos = dots / (np.linalg.norm(W, axis=1) * np.linalg.norm(v))
    s = np.linalg.svd(W, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    order = np.sort(norms)[::-1]
    k = 1
    while order[:k].sum() < mass * norms.sum():
        k += 1
    return {
        "norm_sq": norms,
        "norm_sq_mean": norms.mean(),
        "frobenius": np.sqrt((W**2).sum()),
        "alignment": dots,
        "alignment_mean": dots.mean(),
        "cosine": cos,
        "cosine_mean": cos.mean(),
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "stable_rank": float((s**2).sum() / s.max() ** 2),
        "norm_fraction": k / m,
        "relative_distance": float(np.linalg.norm(W - W0) / np.linalg.norm(W0)),
        "lazy_distance": float(np.sqrt(m) * np.linalg.norm(W - W0, axis=1).min()),
    }
