"""Localization: scale candidate bands, count over-rejection, sweep the bounds (paper §3.4-3.6)."""

from .run import LocateConfig, LocateResult, locate

__all__ = ["LocateConfig", "LocateResult", "locate"]
