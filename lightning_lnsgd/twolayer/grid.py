"""A grid of stacked replicas: the product of named axes, expanded into one column per axis."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

__all__ = ["GRID_AXES", "expand_grid"]

#: The axes a grid may have: the model's own settings (``seed``: an offset added to the model's ``seed``; ``lr`` η;
#: ``init_scale`` α) and the plug-ins' (``sigma`` σ of :class:`~lightning_lnsgd.LabelNoise`, ``rho`` ρ of the SAM
#: strategy), which they take with ``sigma="grid"`` / ``rho="grid"``.
GRID_AXES = ("seed", "lr", "init_scale", "sigma", "rho")


def expand_grid(grid: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """The columns of the product of ``grid``'s axes, one value per replica, the last axis varying fastest.

    Replica ``r`` of a grid with axes ``A, B, C`` of sizes ``|A|, |B|, |C|`` is
    ``(A[r // (|B||C|)], B[(r // |C|) % |B|], C[r % |C|])``. ``seed`` values are ints ≥ 0; the others finite floats
    (``lr``, ``init_scale`` and ``rho`` > 0, ``sigma`` ≥ 0). A ``ValueError`` names a bad axis or value.

    >>> expand_grid({"sigma": [1, 2], "seed": [0, 1, 2]})
    {'sigma': [1.0, 1.0, 1.0, 2.0, 2.0, 2.0], 'seed': [0, 1, 2, 0, 1, 2]}
    """
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"TwoLayerLinear: `grid` must map axis names to lists of values, got {grid!r}.")
    axes: dict[str, list[float]] = {}
    for name, values in grid.items():
        if name not in GRID_AXES:
            raise ValueError(f"TwoLayerLinear: `grid` axis {name!r} is not allowed; allowed: {', '.join(GRID_AXES)}.")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"TwoLayerLinear: `grid.{name}` must be a non-empty list, got {values!r}.")
        if name == "seed":
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v) and v >= 0 for v in values):
                raise ValueError(f"TwoLayerLinear: `grid.seed` must hold ints >= 0, got {list(values)!r}.")
            axes[name] = [int(v) for v in values]
            continue
        low = 0.0 if name == "sigma" else None
        ok = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= 0 if low == 0 else v > 0)
            for v in values
        )
        if not ok:
            allowed = ">= 0" if low == 0 else "> 0"
            raise ValueError(f"TwoLayerLinear: `grid.{name}` must hold finite floats {allowed}, got {list(values)!r}.")
        axes[name] = [float(v) for v in values]
    cells = list(itertools.product(*axes.values()))
    return {name: [cell[i] for cell in cells] for i, name in enumerate(axes)}
