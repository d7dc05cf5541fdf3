"""Sharpness-aware minimisation as Lightning strategies around the user's own optimizer (both Lightning packages)."""

from .perturbation import sam_perturbation
from .sam import (
    SAMDDPStrategy,
    SAMMixin,
    SAMStrategy,
    is_perturbed_pass,
    is_sam_strategy,
    sam_settings,
    sam_strategy_class,
)

__all__ = [
    "SAMDDPStrategy",
    "SAMMixin",
    "SAMStrategy",
    "is_perturbed_pass",
    "is_sam_strategy",
    "sam_perturbation",
    "sam_settings",
    "sam_strategy_class",
]
