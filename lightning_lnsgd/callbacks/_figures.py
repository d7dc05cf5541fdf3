"""The callbacks' figures as plain functions of the values (matplotlib, Agg backend; the caller closes them)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["curve_figure", "neuron_scatter"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display is needed: figures go to TensorBoard
    import matplotlib.pyplot as plt

    return plt


def neuron_scatter(norm_sq: torch.Tensor, y: torch.Tensor, y_kind: str, title: str) -> Any:
    """The paper's Fig. 2c: one point per neuron, ‖wᵢ‖² horizontally, ``y`` (``y_kind`` ``"cosine"``: |cos(wᵢ, v)|
    in [0, 1]; ``"alignment"``: |⟨wᵢ, v⟩|) vertically."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
    ax.scatter(norm_sq.detach().double().cpu().numpy(), y.detach().double().cpu().numpy(), s=6, alpha=0.6)
    ax.set_xlabel("‖wᵢ‖²")
    ax.set_ylabel("|cos(wᵢ, v)|" if y_kind == "cosine" else "|⟨wᵢ, v⟩|")
    ax.set_title(title)
    if y_kind == "cosine":
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def curve_figure(curve: dict[float, float], ylabel: str, title: str) -> Any:
    """A pruning curve ``{kept fraction: value}``: the kept percentage on a log axis (α = 0 is left out)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
    alphas = sorted(a for a in curve if a > 0)
    ax.plot([100 * a for a in alphas], [curve[a] for a in alphas], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("weights kept (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig
