"""A synthetic shop with known preferences: historic weblogs now, live traffic later.

``truth`` holds the hidden preference model, ``policy`` the pre-model logging policy
and ``history`` writes contract-valid weblogs (plus catalogue) drawn from both.
"""

from __future__ import annotations

from recsys_assets.simulation.history import SimulationSummary, simulate_history
from recsys_assets.simulation.policy import logging_slates
from recsys_assets.simulation.truth import GroundTruth

__all__ = ["GroundTruth", "SimulationSummary", "logging_slates", "simulate_history"]
