"""The ranking stage: a labelled candidate dataset and a LightGBM lambdarank model.

Rows are built with the runtime's own candidate generation and feature function on
the state as of the ranking cut-off. Each user's candidates are labelled by what the
user did in the label window (grade by action strength); items logged as shown in
that window are added as rows too, so "shown, not clicked" is a real negative.
Users whose rows hold no positive teach lambdarank nothing and are left out (their
share is reported as the candidate recall of the retrieval stage).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from recsys_assets.training.data import Encoded, impression_slices
from recsys_assets.training.params import TrainingParams
from recsys_serving.model import candidates as cand
from recsys_serving.model.context import user_context
from recsys_serving.model.features import FEATURE_NAMES, assemble_features
from recsys_serving.model.ranker import Blend
from recsys_serving.model.state import ModelState

# The ranking_dataset table in the lake: RankingDataset.frame() plus the cut-off (group)
# each row belongs to and whether that group is a leave-last-out query, added by the
# step that writes it.
RANKING_DATASET_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "item_id": pl.String(),
    "label": pl.Int8(),
    **{name: pl.Float32() for name in FEATURE_NAMES},
    "cutoff": pl.Int16(),
    "lastout": pl.Boolean(),
}


@dataclass
class RankingDataset:
    features: npt.NDArray[np.float32]  # (rows, N_FEATURES)
    labels: npt.NDArray[np.int8]
    groups: npt.NDArray[np.int64]  # rows per user, in order
    users: npt.NDArray[np.int64]  # user row per group
    items: npt.NDArray[np.int64]  # item row per row
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def concat(cls, parts: list[RankingDataset]) -> RankingDataset:
        """Datasets of several cut-offs as one (groups stay separate)."""
        if len(parts) == 1:
            return parts[0]
        found = sum(p.stats["positives_found"] for p in parts)
        total = sum(p.stats["positives_total"] for p in parts)
        stats: dict[str, Any] = {
            name: sum(p.stats[name] for p in parts)
            for name in (
                "rows",
                "users",
                "users_in_label_window",
                "cold_users",
                "positive_rows",
                "positives_found",
                "positives_total",
            )
        }
        stats["candidate_recall"] = found / max(total, 1)
        stats["seconds"] = round(sum(p.stats["seconds"] for p in parts), 3)
        return cls(
            features=np.concatenate([p.features for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            groups=np.concatenate([p.groups for p in parts]),
            users=np.concatenate([p.users for p in parts]),
            items=np.concatenate([p.items for p in parts]),
            stats=stats,
        )

    def frame(self, state: ModelState) -> pl.DataFrame:
        """As a table (for the lake and for inspection)."""
        user_of_row = np.repeat(self.users, self.groups)
        return pl.DataFrame(
            {
                "user_id": state.user_ids[user_of_row],
                "item_id": state.item_ids[self.items],
                "label": self.labels,
                **{name: self.features[:, j] for j, name in enumerate(FEATURE_NAMES)},
            }
        )

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, user_index: dict[str, int]) -> RankingDataset:
        """Back from :meth:`frame` rows; a group is a run of one (cut-off, user)."""
        users = frame["user_id"].to_numpy()
        cutoff = frame["cutoff"].to_numpy() if "cutoff" in frame.columns else np.zeros(users.size)
        change = np.ones(users.size, dtype=bool)
        change[1:] = (users[1:] != users[:-1]) | (cutoff[1:] != cutoff[:-1])
        starts = np.flatnonzero(change)
        groups = np.diff(np.append(starts, users.size)).astype(np.int64)
        return cls(
            features=frame.select(list(FEATURE_NAMES)).to_numpy().astype(np.float32),
            labels=frame["label"].to_numpy().astype(np.int8),
            groups=groups,
            users=np.asarray([user_index[str(u)] for u in users[starts]], dtype=np.int64),
            items=np.zeros(frame.height, dtype=np.int64),
        )


def best_grades(events: pl.DataFrame) -> dict[int, dict[int, int]]:
    """``{user: {item: grade}}`` from ``u, i, g`` rows: each pair's best grade, positive
    grades only."""
    frame = events.group_by("u", "i").agg(pl.col("g").max()).sort("u", "i")
    grades: dict[int, dict[int, int]] = {}
    for u, i, g in frame.iter_rows():
        if g > 0:
            grades.setdefault(int(u), {})[int(i)] = int(g)
    return grades


def label_table(
    enc: Encoded, start: float, end: float
) -> tuple[dict[int, dict[int, int]], dict[int, set[int]]]:
    """Grades per (user, item) in ``[start, end)`` and items shown there per user."""
    return label_grades(enc, start, end), shown_items(enc, start, end)


def label_grades(enc: Encoded, start: float, end: float) -> dict[int, dict[int, int]]:
    """Grades per (user, item) in ``[start, end)``."""
    mask = (enc.ts >= start) & (enc.ts < end)
    return best_grades(
        pl.DataFrame({"u": enc.user[mask], "i": enc.item[mask], "g": enc.grade[mask]})
    )


def shown_items(
    enc: Encoded, start: float, end: float, users: npt.NDArray[np.int64] | None = None
) -> dict[int, set[int]]:
    """Items shown in ``[start, end)`` per user (only ``users`` when given: impressions
    are most of a clickstream, and a set per shown pair for every user in the window
    costs gigabytes at 100M events while the ranking dataset samples 10k users)."""
    pairs: list[pl.DataFrame] = []
    for part in impression_slices(enc.imp_ts.size):
        # One slice of the impressions at a time: whole-array masks are a gigabyte of
        # temporaries at 100M events.
        ts, imp_user = enc.imp_ts[part], enc.imp_user[part]
        imask = (ts >= start) & (ts < end) & (imp_user >= 0)
        if users is not None:
            imask[imask] = np.isin(imp_user[imask], users)
        pairs.append(pl.DataFrame({"u": imp_user[imask], "i": enc.imp_item[part][imask]}).unique())
    if not pairs:
        pairs.append(pl.DataFrame({"u": enc.imp_user[:0], "i": enc.imp_item[:0]}))
    shown_frame = pl.concat(pairs).unique().sort("u", "i")
    shown: dict[int, set[int]] = {}
    for u, i in shown_frame.iter_rows():
        shown.setdefault(int(u), set()).add(int(i))
    return shown


def build_ranking_dataset(
    state: ModelState,
    enc: Encoded,
    label_end: float,
    params: TrainingParams,
    max_users: int | None = None,
    labels: tuple[dict[int, dict[int, int]], dict[int, set[int]]] | None = None,
) -> RankingDataset:
    """Candidates for users active in ``[state.as_of, label_end)``, labelled by their
    actions (or by ``labels``: grades and shown items per user, e.g. the leave-last-out
    held-out events)."""
    started = time.perf_counter()
    if labels is not None:
        grades, shown = labels
    else:
        grades = label_grades(enc, state.as_of, label_end)
    users = np.asarray(sorted(grades), dtype=np.int64)
    rng = np.random.default_rng([params.seed, 0x4A4B, int(state.as_of)])
    limit = max_users if max_users is not None else params.ranking_max_users
    if users.size > limit:
        users = np.sort(rng.choice(users, size=limit, replace=False))
    if labels is None:
        # Shown items of the sampled users only (the only ones looked up below).
        shown = shown_items(enc, state.as_of, label_end, users)
    feats: list[npt.NDArray[np.float32]] = []
    labels: list[npt.NDArray[np.int8]] = []
    items_out: list[npt.NDArray[np.int64]] = []
    groups: list[int] = []
    kept_users: list[int] = []
    positives_total = positives_found = cold_users = 0
    for u in users.tolist():
        ctx = user_context(state, str(state.user_ids[u]))
        allowed = cand.allowed_mask(state, ctx)
        user_grades = {i: g for i, g in grades[u].items() if allowed[i]}
        if not user_grades:
            continue  # only re-interactions with seen items: nothing to rank
        pool = cand.generate(state, ctx, allowed, params.candidate_pool)
        rows = pool.items
        positives_total += len(user_grades)
        positives_found += int(np.isin(np.fromiter(user_grades, np.int64), rows).sum())
        extra = (
            [i for i in sorted(shown.get(u, ())) if allowed[i]]
            if params.ranking_impressions
            else []
        )
        if extra:
            rows = np.unique(np.concatenate([rows, np.asarray(extra, dtype=np.int64)]))
        label = np.asarray([user_grades.get(int(i), 0) for i in rows], dtype=np.int8)
        if not label.any():
            continue
        # Keep positives and logged impressions; sample the other candidates. Pairs
        # (positive, negative) are what lambdarank learns from, and a sample of the
        # unlabelled candidates keeps their ordering signal at a fraction of the rows.
        keep = label > 0
        if extra:
            keep |= np.isin(rows, np.asarray(extra, dtype=np.int64))
        others = np.flatnonzero(~keep)
        if others.size > params.ranking_negatives:
            others = np.sort(rng.choice(others, size=params.ranking_negatives, replace=False))
        chosen = np.sort(np.concatenate([np.flatnonzero(keep), others]))
        rows, label = rows[chosen], label[chosen]
        feats.append(assemble_features(state, ctx, rows))
        labels.append(label)
        items_out.append(rows)
        groups.append(rows.size)
        kept_users.append(u)
        cold_users += int(not ctx.known)
    if not groups:
        raise ValueError(
            "the ranking dataset is empty: no user in the label window has a labelled "
            "candidate (the window may be too small)"
        )
    features = np.concatenate(feats)
    label_arr = np.concatenate(labels)
    return RankingDataset(
        features=features,
        labels=label_arr,
        groups=np.asarray(groups, dtype=np.int64),
        users=np.asarray(kept_users, dtype=np.int64),
        items=np.concatenate(items_out),
        stats={
            "rows": int(features.shape[0]),
            "users": len(groups),
            "users_in_label_window": len(grades),
            "cold_users": cold_users,
            "positive_rows": int((label_arr > 0).sum()),
            "positives_found": positives_found,
            "positives_total": positives_total,
            "candidate_recall": positives_found / max(positives_total, 1),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )


# Similarity features the score may only grow with: a guard against the ranker
# learning noise where its data is thin (it keeps the retrievers' own orderings).
MONOTONE = frozenset(
    {
        "als_score",
        "als_cosine",
        "covis_sum",
        "covis_max",
        "knn_sum",
        "knn_max",
        "knn_history",
        "covis_rel",
        "knn_rel",
        "knn_history_rel",
        "last_item_sim",
        "recent_sim",
        "cat_affinity",
        "cat_affinity_recent",
    }
)


@dataclass
class RankerFit:
    booster: Any
    best_iteration: int
    valid_ndcg: float
    train_ndcg: float
    seconds: float
    feature_importance: dict[str, float]
    valid_groups: npt.NDArray[np.bool_] = field(default_factory=lambda: np.empty(0, bool))
    # NDCG@K per boosting round ("train", "valid"): the learning curve MLflow plots.
    curves: dict[str, list[float]] = field(default_factory=dict)


def _validation_rng(params: TrainingParams) -> np.random.Generator:
    return np.random.default_rng([params.seed, 0x1B6])


def _draw_validation(
    unique: npt.NDArray[Any], params: TrainingParams, rng: np.random.Generator
) -> npt.NDArray[Any]:
    return unique[rng.random(unique.size) < params.ranking_valid_share]


def validation_users(users: npt.NDArray[np.int64], params: TrainingParams) -> npt.NDArray[Any]:
    """The users whose groups validate the ranker (early stopping, gate): a seeded share
    of the distinct users, so all of a user's groups (one per cut-off) land on one side."""
    return _draw_validation(np.unique(users), params, _validation_rng(params))


def train_ranker(
    dataset: RankingDataset,
    params: TrainingParams,
    valid_users: npt.NDArray[Any] | None = None,
) -> RankerFit:
    """LightGBM lambdarank with early stopping on a validation split by user.
    ``valid_users`` fixes that split (two rankers fitted on different subsets of one
    dataset are then validated on the same users); by default it is drawn from the
    dataset's own users (:func:`validation_users`)."""
    import lightgbm as lgb

    # The same generator draws the default split and then, if that split leaves one
    # side empty, the one user who validates.
    rng = _validation_rng(params)
    unique = np.unique(dataset.users)
    if valid_users is None:
        valid_users = _draw_validation(unique, params, rng)
    is_valid = np.isin(dataset.users, valid_users)
    if unique.size >= 2 and (is_valid.all() or not is_valid.any()):
        is_valid = dataset.users == unique[rng.integers(0, unique.size)]
    row_valid = np.repeat(is_valid, dataset.groups)
    names = list(FEATURE_NAMES)
    train_set = lgb.Dataset(
        dataset.features[~row_valid],
        label=dataset.labels[~row_valid],
        group=dataset.groups[~is_valid],
        feature_name=names,
        free_raw_data=False,
    )
    lgb_params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [params.eval_k],
        "lambdarank_truncation_level": max(params.eval_k * 2, 20),
        "num_leaves": params.lgb_num_leaves,
        "learning_rate": params.lgb_learning_rate,
        "min_data_in_leaf": params.lgb_min_data_in_leaf,
        "feature_fraction": params.lgb_feature_fraction,
        "bagging_fraction": params.lgb_bagging_fraction,
        "bagging_freq": 1,
        "lambda_l2": params.lgb_lambda_l2,
        **(
            {
                "monotone_constraints": [int(n in MONOTONE) for n in names],
                "monotone_constraints_method": "advanced",
            }
            if params.lgb_monotone
            else {}
        ),
        "num_threads": params.resolved_threads,
        "seed": params.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }
    valid_sets = [train_set]
    valid_names = ["train"]
    if is_valid.any():
        valid_set = lgb.Dataset(
            dataset.features[row_valid],
            label=dataset.labels[row_valid],
            group=dataset.groups[is_valid],
            reference=train_set,
            feature_name=names,
        )
        valid_sets.append(valid_set)
        valid_names.append("valid")
    record: dict[str, Any] = {}
    callbacks = [lgb.record_evaluation(record)]
    if is_valid.any():
        callbacks.append(lgb.early_stopping(params.lgb_early_stopping, verbose=False))
    started = time.perf_counter()
    booster = lgb.train(
        lgb_params,
        train_set,
        num_boost_round=params.lgb_rounds,
        valid_sets=valid_sets,
        valid_names=valid_names,
        callbacks=callbacks,
    )
    best = int(booster.best_iteration or booster.current_iteration())
    if params.ranker_refit and is_valid.any():
        # The validation users only chose the number of rounds: refit on everyone.
        full = lgb.Dataset(
            dataset.features,
            label=dataset.labels,
            group=dataset.groups,
            feature_name=names,
        )
        booster = lgb.train(lgb_params, full, num_boost_round=best)
    seconds = time.perf_counter() - started
    metric = f"ndcg@{params.eval_k}"
    valid_curve = record.get("valid", {}).get(metric, [])
    train_curve = record.get("train", {}).get(metric, [])
    importance = booster.feature_importance(importance_type="gain", iteration=best)
    total = float(importance.sum()) or 1.0
    return RankerFit(
        valid_groups=is_valid,
        booster=booster,
        best_iteration=best,
        valid_ndcg=float(valid_curve[best - 1]) if valid_curve else float("nan"),
        train_ndcg=float(train_curve[best - 1]) if train_curve else float("nan"),
        seconds=seconds,
        feature_importance={
            n: round(float(v) / total, 4)
            for n, v in sorted(zip(names, importance, strict=True), key=lambda x: -x[1])
        },
        curves={
            name: [round(float(v), 6) for v in curve]
            for name, curve in (("train", train_curve), ("valid", valid_curve))
            if curve
        },
    )


# ------------------------------------------------------------------ blend and gate
# Retrieval scores a blend may use (feature columns; positive weights only).
BLEND_CANDIDATES: tuple[str, ...] = (
    "ease_rel",
    "knn_history_rel",
    "als_cosine",
    "knn_rel",
    "covis_rel",
    "recent_sim",
    "item_log_pop_decayed",
    "item_log_pop_recent",
    "item_share_at_user",
)
BLEND_STEPS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
BLEND_ROUNDS = 4
BLEND_MAX_GROUPS = 2_000


def _padded(values: npt.NDArray[Any], groups: npt.NDArray[np.int64], fill: float) -> np.ndarray:
    """Rows of each group in one (groups, longest) matrix, padded with ``fill``."""
    width = int(groups.max(initial=1))
    out = np.full((groups.size, width), fill, dtype=np.float64)
    starts = np.cumsum(groups) - groups
    owner = np.repeat(np.arange(groups.size), groups)
    out[owner, np.arange(owner.size) - starts[owner]] = values
    return out


class _Groups:
    """Labels of ranking groups padded once into a (groups, longest) matrix, to score
    many candidate orders of the same groups quickly (the blend search)."""

    def __init__(self, labels: npt.NDArray[np.int8], groups: npt.NDArray[np.int64], k: int):
        self.groups = groups
        self.k = k
        self.gain = _padded(np.power(2.0, labels.astype(np.float64)) - 1.0, groups, 0.0)
        self.k_eff = min(k, self.gain.shape[1])
        self.disc = 1.0 / np.log2(np.arange(2, self.k_eff + 2))
        ideal = (-np.sort(-self.gain, axis=1)[:, : self.k_eff] * self.disc).sum(axis=1)
        self.has = ideal > 0
        self.ideal = ideal

    def _mean(self, order: npt.NDArray[np.int64]) -> float:
        dcg = (np.take_along_axis(self.gain, order, axis=1) * self.disc).sum(axis=1)
        if not self.has.any():
            return float("nan")
        return float((dcg[self.has] / self.ideal[self.has]).mean())

    def ndcg(self, scores: npt.NDArray[np.float64]) -> float:
        """NDCG@k ordering by ``scores`` alone (ties in any order)."""
        s = _padded(scores, self.groups, -np.inf)
        if s.shape[1] > self.k_eff:
            top = np.argpartition(-s, self.k_eff - 1, axis=1)[:, : self.k_eff]
        else:
            top = np.broadcast_to(np.arange(s.shape[1]), s.shape).copy()
        inner = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
        return self._mean(np.take_along_axis(top, inner, axis=1))

    def served_ndcg(
        self, scores: npt.NDArray[np.float64], tie: npt.NDArray[np.float64] | None
    ) -> float:
        """NDCG@k as the server orders: ``scores`` to the served precision, then ``tie``."""
        from recsys_serving.model.ranker import TIE_DECIMALS

        s = _padded(np.round(scores, TIE_DECIMALS), self.groups, -np.inf)
        t = _padded(tie if tie is not None else np.zeros(scores.size), self.groups, -np.inf)
        order = np.lexsort((-t, -s), axis=-1)[:, : self.k_eff]
        return self._mean(order)


def grouped_ndcg(
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int8],
    groups: npt.NDArray[np.int64],
    k: int,
    tie: npt.NDArray[np.float64] | None = None,
) -> float:
    """Mean NDCG@k over groups with a positive (gain 2^label - 1, LightGBM's), ranking by
    ``scores`` (to the served tie precision) then ``tie``, as the server orders."""
    if not groups.size:
        return float("nan")
    return _Groups(labels, groups, k).served_ndcg(scores, tie)


def fit_blend(
    features: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int8],
    groups: npt.NDArray[np.int64],
    k: int,
) -> tuple[Blend, float]:
    """Greedy forward selection of a positive linear blend of retrieval scores,
    maximising NDCG@k on the given groups (the ranker's training groups)."""
    from recsys_serving.model.features import FEATURE_NAMES

    cols = [FEATURE_NAMES.index(f) for f in BLEND_CANDIDATES]
    block = features[:, cols].astype(np.float64)
    scale = block.std(axis=0)
    scale[scale <= 1e-12] = 1.0
    block = block / scale

    prepared = _Groups(labels, groups, k)

    def ndcg(w: npt.NDArray[np.float64]) -> float:
        return prepared.ndcg(block @ w)

    n = len(cols)
    singles = [ndcg(np.eye(n)[j]) for j in range(n)]
    first = int(np.nanargmax(singles))
    weights = np.eye(n)[first]
    best = singles[first]
    for _ in range(BLEND_ROUNDS):
        found = None
        for j in range(n):
            for step in BLEND_STEPS:
                trial = weights.copy()
                trial[j] += step
                score = ndcg(trial)
                if score > best + 1e-5 and (found is None or score > found[0]):
                    found = (score, trial)
        if found is None:
            break
        best, weights = found
    keep = np.flatnonzero(weights > 0)
    blend = Blend(
        tuple(BLEND_CANDIDATES[j] for j in keep.tolist()),
        tuple(float(weights[j] / scale[j]) for j in keep.tolist()),
    )
    return blend, best


def subset_groups(dataset: RankingDataset, chosen: npt.NDArray[np.bool_]) -> RankingDataset:
    rows = np.repeat(chosen, dataset.groups)
    return RankingDataset(
        features=dataset.features[rows],
        labels=dataset.labels[rows],
        groups=dataset.groups[chosen],
        users=dataset.users[chosen],
        items=dataset.items[rows] if dataset.items.size == rows.size else dataset.items,
    )


def gate_ranker(dataset: RankingDataset, fit: RankerFit, params: TrainingParams) -> dict[str, Any]:
    """Blend fitted on the ranker's training groups, then ranker vs blend on its
    validation groups (both ordered as served). The ranker serves only with at least
    ``ranker_min_trees`` trees and a validation NDCG above the blend's by
    ``ranker_gate_margin``; otherwise the bundle ranks by the blend. The returned
    dict is the manifest's ``ranking`` section."""
    k = params.eval_k
    valid = fit.valid_groups if fit.valid_groups.size == dataset.groups.size else None
    train_groups = (
        ~valid if valid is not None and (~valid).any() else np.ones_like(dataset.groups, dtype=bool)
    )
    if train_groups.sum() > BLEND_MAX_GROUPS:
        rng = np.random.default_rng([params.seed, 0xB1E])
        picked = rng.choice(np.flatnonzero(train_groups), BLEND_MAX_GROUPS, replace=False)
        train_groups = np.zeros_like(train_groups)
        train_groups[picked] = True
    train = subset_groups(dataset, train_groups)
    blend, blend_train = fit_blend(train.features, train.labels, train.groups, k)
    trees = int(fit.best_iteration)
    out: dict[str, Any] = {
        "blend": blend.as_dict(),
        "blend_train_ndcg": round(blend_train, 6),
        "ranker_trees": trees,
        "min_trees": params.ranker_min_trees,
        "metric": f"ndcg@{k}",
    }
    if valid is None or not valid.any():
        use = trees >= params.ranker_min_trees or not params.ranker_gate
        out.update(
            mode="ranker" if use else "blend",
            reason=(
                "no validation users to compare on; "
                + (f"the ranker has {trees} trees" if use else f"only {trees} trees")
            ),
        )
        return out
    held = subset_groups(dataset, valid)
    ranker_scores = np.asarray(
        fit.booster.predict(held.features, num_iteration=fit.best_iteration), dtype=np.float64
    )
    tie = blend.score(held.features)
    ranker_ndcg = grouped_ndcg(ranker_scores, held.labels, held.groups, k, tie)
    blend_ndcg = grouped_ndcg(tie, held.labels, held.groups, k)
    out.update(
        ranker_valid_ndcg=round(ranker_ndcg, 6),
        blend_valid_ndcg=round(blend_ndcg, 6),
        valid_groups=int(valid.sum()),
    )
    if not params.ranker_gate:
        out.update(mode="ranker", reason="the ranker gate is off (ranker_gate=false)")
    elif trees < params.ranker_min_trees:
        out.update(mode="blend", reason=f"the ranker stopped at {trees} trees")
    elif not ranker_ndcg > blend_ndcg * (1.0 + params.ranker_gate_margin):
        out.update(
            mode="blend",
            reason=f"the ranker ({ranker_ndcg:.4f}) does not beat the blend ({blend_ndcg:.4f}) "
            "on validation",
        )
    else:
        out.update(
            mode="ranker",
            reason=f"the ranker ({ranker_ndcg:.4f}) beats the blend ({blend_ndcg:.4f}) "
            "on validation",
        )
    return out


def served_group_ndcg(
    held: RankingDataset, fit: RankerFit, ranking: dict[str, Any], k: int
) -> float:
    """NDCG@k of ``held``'s groups ordered the way a bundle with this ranker and gate
    decision (``ranking``, :func:`gate_ranker`'s dict) would serve them: by the ranker
    with its blend breaking ties when the gate let it serve, else by the blend alone."""
    blend = Blend.from_dict(ranking["blend"])
    tie = blend.score(held.features)
    if ranking["mode"] != "ranker":
        return grouped_ndcg(tie, held.labels, held.groups, k)
    scores = np.asarray(
        fit.booster.predict(held.features, num_iteration=fit.best_iteration), dtype=np.float64
    )
    return grouped_ndcg(scores, held.labels, held.groups, k, tie)
