"""``retrain_job``: refresh the catalogue snapshots and run the training graph.

``weblogs`` is not in the selection: it is partitioned and kept fresh by the landing
sensor (and ``recsys retrain`` processes anything landed first), so a retraining
reads whatever processed partitions exist. The tag lets the run coordinator allow
one retraining at a time and lets the closed loop find its runs; the executor holds
the retraining lock for the whole run, so a run never overlaps ``recsys retrain``
either (:mod:`recsys_assets.training.exclusive`).
"""

from __future__ import annotations

import dagster as dg

from recsys_assets.training.assets import TRAINING_ASSETS
from recsys_assets.training.exclusive import exclusive_executor
from recsys_assets.training.graph import REFRESHED_BY_RETRAIN

RETRAIN_TAGS = {"recsys/pipeline": "retrain"}

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=dg.AssetSelection.assets(*REFRESHED_BY_RETRAIN)
    | dg.AssetSelection.assets(*TRAINING_ASSETS),
    tags=RETRAIN_TAGS,
    executor_def=exclusive_executor,
    description=(
        "Catalogue snapshots -> interactions -> features -> retrieval -> index -> ranking "
        "-> bundle -> evaluation -> registry (the first valid model becomes production)."
    ),
)
