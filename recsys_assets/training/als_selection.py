"""Choose the ALS settings per dataset on the newest label window before the holdout.

No single ALS setting suits every log: on a clickstream dominated by exposure, BM25
weighting and a high confidence scale work best; on a ratings log like MovieLens, log
weighting with a low confidence scale retrieves roughly twice as well (NDCG@10 of
ALS alone 0.18 vs 0.33 on bench/datasets.py's MovieLens shape). Baselines are tuned
per dataset, so retrieval must be too, or the ranker starts from a weak signal.

Each configuration of ``params.als_grid`` is fitted on interactions before the newest
ranking cut-off and scored, ALS alone, on what users did in that cut-off's label
window (new items only, NDCG@K). The holdout stays untouched, so the evaluation
figures are not flattered by the choice. The configured settings compete as the first
candidate and are only left for one at least ``als_select_margin`` better.

By default (``als_select`` unset) the choice is made only for logs without logged
impressions (ratings, purchases: the MovieLens and RetailRocket shapes). With
impressions the ranker learns exposure and popularity from them, and ALS alone is a
misleading judge: in the closed-loop demo the choice picked a setting that scored ALS
alone 76% higher and served lists with an expected CTR of 6.9% instead of 7.6%
(bench/RESULTS.md).

The grid covers the weighting (BM25 or log) and the confidence scale, not the number
of factors: fewer factors make ALS alone look better on a thin validation window by
leaning towards popular items, which the ranker already has as features; in the
simulated clickstream worlds that choice cost the two-stage model 1-4% NDCG although
ALS alone gained fourfold (bench/RESULTS.md).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from recsys_assets.training.data import Encoded, TrainingWindow, Vocabulary
from recsys_assets.training.metrics import user_metrics
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.ranking import label_table
from recsys_assets.training.retrieval import (
    als_matrix,
    fit_als,
    user_factors,
)

SCORE_CHUNK = 256


def grid_configs(params: TrainingParams) -> list[dict[str, Any]]:
    """The configured ALS settings first, then every other combination of the grid."""
    current = {name: getattr(params, name) for name in params.als_grid}
    names = list(params.als_grid)
    configs = [current]
    for values in itertools.product(*(params.als_grid[n] for n in names)):
        config = dict(zip(names, values, strict=True))
        if config not in configs:
            configs.append(config)
    return configs


@dataclass
class Validation:
    """Sampled users with history before the cut and new items in the label window."""

    users: npt.NDArray[np.int64]
    relevant: list[set[int]]  # their new items in the label window
    history: sp.csr_matrix  # their rows of the interactions before the cut (to exclude)


def validation_users(
    enc: Encoded, vocab: Vocabulary, cut: float, end: float, params: TrainingParams
) -> Validation:
    """Users with history before ``cut`` and new items in ``[cut, end)``, sampled."""
    grades, _ = label_table(enc, cut, end)
    history = als_matrix(enc, vocab, cut, params.replace(als_bm25=False))
    users: list[int] = []
    relevant: list[set[int]] = []
    for user in sorted(grades):
        seen = set(history.indices[history.indptr[user] : history.indptr[user + 1]].tolist())
        new = set(grades[user]) - seen
        if seen and new:
            users.append(user)
            relevant.append(new)
    if len(users) > params.als_select_max_users:
        rng = np.random.default_rng(params.seed)
        keep = np.sort(rng.choice(len(users), params.als_select_max_users, replace=False))
        users = [users[i] for i in keep]
        relevant = [relevant[i] for i in keep]
    rows = np.asarray(users, dtype=np.int64)
    return Validation(rows, relevant, history[rows])


def retrieval_ndcg(
    enc: Encoded, vocab: Vocabulary, cut: float, val: Validation, params: TrainingParams
) -> float:
    """NDCG@K of ALS alone (already-seen items excluded) for the validation users."""
    k = params.eval_k
    matrix = als_matrix(enc, vocab, cut, params)
    fit = fit_als(enc, vocab, cut, params, matrix=matrix)
    vectors = user_factors(enc, vocab, fit.item_factors, cut, params, val.users, matrix)
    total = 0.0
    # Users in chunks: a dense users x items score block stays small with big catalogs.
    for start in range(0, val.users.size, SCORE_CHUNK):
        chunk = slice(start, start + SCORE_CHUNK)
        scores = vectors[chunk] @ fit.item_factors.T
        sub = val.history[chunk]
        rows = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
        scores[rows, sub.indices] = -np.inf
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        total += sum(
            user_metrics(row.tolist(), rel, k)["ndcg"]
            for row, rel in zip(top, val.relevant[chunk], strict=True)
        )
    return total / max(len(val.relevant), 1)


def select_als(
    enc: Encoded, vocab: Vocabulary, window: TrainingWindow, params: TrainingParams
) -> tuple[TrainingParams, dict[str, Any]]:
    """The params with the winning ALS settings, and the evidence (asset metadata)."""
    configs = grid_configs(params)
    if params.als_select is False or len(configs) < 2:
        return params, {"selected": configs[0], "skipped": "selection switched off"}
    if params.als_select is None and enc.imp_ts.size:
        return params, {
            "selected": configs[0],
            "skipped": (
                f"the log has {enc.imp_ts.size:,} logged impressions: the ranker learns "
                "exposure from them and ALS alone would be a misleading judge "
                '(set "als_select": true to choose anyway)'
            ),
        }
    cut = window.cutoffs[0]
    end = window.label_end(cut)
    val = validation_users(enc, vocab, cut, end, params)
    if val.users.size < params.als_select_min_users:
        return params, {
            "selected": configs[0],
            "skipped": (
                f"{val.users.size} validation users (fewer than {params.als_select_min_users}): "
                "kept the configured settings"
            ),
        }
    started = time.perf_counter()
    results = []
    for config in configs:
        score = retrieval_ndcg(enc, vocab, cut, val, params.replace(**config))
        results.append({**config, f"ndcg@{params.eval_k}": round(score, 6)})
    metric = f"ndcg@{params.eval_k}"
    best = max(range(len(configs)), key=lambda i: (results[i][metric], -i))
    if results[best][metric] < results[0][metric] * (1.0 + params.als_select_margin):
        best = 0  # not clearly better: a thin window's noise must not move the settings
    return params.replace(**configs[best]), {
        "selected": configs[best],
        "validation": {"cut": cut, "end": end, "users": int(val.users.size)},
        "results": results,
        "seconds": round(time.perf_counter() - started, 3),
    }
