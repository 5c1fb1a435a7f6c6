"""The training steps' names: the asset keys, and the lake directories their artifacts
live under (``training/<name>/`` or ``training/runs/<run>/<name>/``).

A module of its own so the step functions, the bundle hand-over and the step table
(:mod:`recsys_assets.training.graph`) share one spelling without importing each other.
"""

from __future__ import annotations

INTERACTIONS = "interactions"
ITEM_FEATURES = "item_features"
USER_FEATURES = "user_features"
RETRIEVAL = "retrieval_model"
CANDIDATE_INDEX = "candidate_index"
RANKING_DATASET = "ranking_dataset"
RANKING_MODEL = "ranking_model"
RECOMMENDER = "recommender_model"
EVALUATION = "model_evaluation"
REGISTERED = "registered_model"
