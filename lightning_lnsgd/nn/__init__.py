"""Modules for any network: :class:`Linearized`, the first-order Taylor model of a network around its weights."""

from .linearized import Linearized

__all__ = ["Linearized"]
