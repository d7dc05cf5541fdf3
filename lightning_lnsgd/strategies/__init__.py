"""Sharpness-aware minimisation as Lightning strategies around the user's own optimizer."""

from .sam import SAMDDPStrategy, SAMStrategy, is_perturbed_pass, sam_perturbation

__all__ = ["SAMDDPStrategy", "SAMStrategy", "is_perturbed_pass", "sam_perturbation"]
