"""Type checks shared by the constructors' argument validation: plain Python numbers, where a bool never counts."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_int", "is_real"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (``True``/``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (not a bool) with ``low <= value <= high``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high
