"""One plain function per training step, each reading its inputs from the lake, writing
its artifacts there (``training/<asset>/...``) and returning a frozen record
(:mod:`recsys_assets.training.outputs`); a step that needs another's version is handed
it as an argument.

The step table (:mod:`recsys_assets.training.graph`) wires these into the Dagster assets
and :func:`recsys_assets.training.pipeline.train_bundle` alike, so a test of
``train_bundle`` exercises exactly the code the asset graph runs.

Three snapshots of the world are built by every stateful step:

* ``rank``  as of the ranking cut-off: the ranking dataset's features;
* ``eval``  as of the holdout start: the offline evaluation;
* ``serve`` as of the end of the window: what the bundle serves.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from recsys_assets.training import artifacts as art
from recsys_assets.training.als_selection import select_als
from recsys_assets.training.data import (
    Encoded,
    TrainingDataError,
    TrainingWindow,
    Vocabulary,
    explain_empty_counts,
    read_catalog,
)
from recsys_assets.training.ease import ease_graph, select_lambda
from recsys_assets.training.evaluation import (
    Holdout,
    ListFn,
    PerUserSplit,
    build_holdout,
    evaluate,
    markdown_table,
    model_lists,
    paired_comparison,
    per_user_ndcg,
    per_user_split,
    popularity_lists,
)
from recsys_assets.training.handover import (
    KEEP_BUNDLES,
    fetch_bundle,
    prune_bundles,
    upload_bundle,
)
from recsys_assets.training.lastout import SNAPSHOT as LASTOUT
from recsys_assets.training.lastout import LastOut, leave_last_out
from recsys_assets.training.names import (
    CANDIDATE_INDEX,
    INTERACTIONS,
    ITEM_FEATURES,
    RANKING_DATASET,
    RANKING_MODEL,
    RETRIEVAL,
    USER_FEATURES,
)
from recsys_assets.training.outputs import (
    Bundle,
    CandidateIndex,
    Evaluation,
    Interactions,
    ItemFeatures,
    RankingDatasetStats,
    RankingModel,
    Registration,
    Retrieval,
    UserFeatures,
    finite_json,
)
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.prepare import prepare_interactions, scan_weblogs
from recsys_assets.training.ranking import (
    RankerFit,
    RankingDataset,
    build_ranking_dataset,
    gate_ranker,
    grouped_ndcg,
    served_group_ndcg,
    subset_groups,
    train_ranker,
    validation_users,
)
from recsys_assets.training.retention import publish_with_retention
from recsys_assets.training.retrieval import (
    AlsFit,
    RetrievalSnapshot,
    als_matrix,
    fit_als,
    retrieval_snapshot,
)
from recsys_assets.training.snapshot import (
    ItemSnapshot,
    UserSnapshot,
    assemble_state,
    item_snapshot,
    user_snapshot,
)
from recsys_assets.training.verdict import first_promotion, judge, registration_tags
from recsys_serving.index.base import IndexArtifact, IndexPublisher
from recsys_serving.lake import Lake
from recsys_serving.layout import PRODUCTION, partition_days
from recsys_serving.logging import get_logger
from recsys_serving.machine import usable_cores
from recsys_serving.model.answers import ANSWERS_DIR, precompute_answers
from recsys_serving.model.bundle import (
    BundleError,
    BundleWriter,
    new_version,
    verify_bundle,
)
from recsys_serving.model.features import FEATURE_NAMES, ITEM_COLUMNS, USER_COLUMNS
from recsys_serving.model.ranker import Blend, BlendRanker, RankerCompileError
from recsys_serving.model.recommender import (
    INDEX_DIR,
    RANKER_FILE,
    STATE_DIR,
    Ranker,
    Recommender,
    manifest_blend,
)
from recsys_serving.model.state import ModelState
from recsys_serving.registry import (
    POPULARITY_ANSWERS,
    ModelRegistry,
    PromotionRule,
    serves_popularity,
)

log = get_logger(__name__)


# ------------------------------------------------------------------ shared loading
@dataclass
class Prepared:
    vocab: Vocabulary
    enc: Encoded
    window: TrainingWindow
    meta: dict[str, Any]
    lastouts: list[LastOut] = field(default_factory=list)

    def snapshots(self) -> list[str]:
        """``rank0`` (newest cut-off) .. ``rankN``, then ``eval`` and ``serve``, then
        ``lastout0`` .. (leave-last-out queries, ``lastout.py``) when there are any."""
        names = [f"rank{j}" for j in range(len(self.window.cutoffs))] + ["eval", "serve"]
        return names + [f"{LASTOUT}{j}" for j in range(len(self.lastouts))]

    def as_of(self, snapshot: str) -> float:
        w = self.window
        if snapshot.startswith("rank"):
            return w.cutoffs[int(snapshot[4:])]
        if snapshot.startswith(LASTOUT):
            return w.holdout_start
        return {"eval": w.holdout_start, "serve": w.end}[snapshot]

    def enc_for(self, snapshot: str) -> Encoded:
        """The interactions a snapshot is built from: all, except the held-out events
        for ``lastout``."""
        if snapshot.startswith(LASTOUT):
            return self.lastouts[int(snapshot[len(LASTOUT) :])].kept(self.enc)
        return self.enc


def load_prepared(lake: Lake) -> Prepared:
    arrays = art.get_arrays(lake, art.key(INTERACTIONS, "prepared.npz"))
    vocab = Vocabulary.from_arrays(
        {k.removeprefix("vocab/"): v for k, v in arrays.items() if k.startswith("vocab/")}
    )
    enc = Encoded.from_arrays(
        {k.removeprefix("enc/"): v for k, v in arrays.items() if k.startswith("enc/")}
    )
    meta = art.get_json(lake, art.key(INTERACTIONS, "window.json"))
    window = TrainingWindow.from_bounds(meta["bounds"])
    lastouts = []
    while f"lastout/mask{len(lastouts)}" in arrays:
        j = len(lastouts)
        lastouts.append(
            LastOut(
                mask=arrays[f"lastout/mask{j}"].astype(bool),
                users=arrays[f"lastout/users{j}"].astype(np.int64),
                as_of=window.holdout_start,
            )
        )
    return Prepared(vocab, enc, window, meta, lastouts)


def load_state(lake: Lake, prep: Prepared, snapshot: str, params: TrainingParams) -> ModelState:
    items = ItemSnapshot.from_arrays(
        art.get_arrays(lake, art.key(ITEM_FEATURES, f"{snapshot}.npz"))
    )
    users = UserSnapshot.from_arrays(
        art.get_arrays(lake, art.key(USER_FEATURES, f"{snapshot}.npz"))
    )
    retrieval = RetrievalSnapshot.from_arrays(
        art.get_arrays(lake, art.key(RETRIEVAL, f"{snapshot}.npz"))
    )
    return assemble_state(prep.vocab, items, users, retrieval, params)


def _column_stats(table: np.ndarray, columns: tuple[str, ...]) -> str:
    lines = ["| column | mean | min | max | non-finite |", "|---|---:|---:|---:|---:|"]
    for j, name in enumerate(columns):
        col = table[:, j].astype(np.float64)
        finite = np.isfinite(col)
        ok = col[finite]
        mean = f"{ok.mean():.4g}" if ok.size else "-"
        lo = f"{ok.min():.4g}" if ok.size else "-"
        hi = f"{ok.max():.4g}" if ok.size else "-"
        lines.append(f"| {name} | {mean} | {lo} | {hi} | {int((~finite).sum())} |")
    return "\n".join(lines)


def non_finite(table: np.ndarray, columns: tuple[str, ...]) -> dict[str, int]:
    """Non-finite values per column (empty when all are finite)."""
    bad = ~np.isfinite(table)
    counts = bad.sum(axis=0)
    return {columns[j]: int(c) for j, c in enumerate(counts.tolist()) if c}


# ------------------------------------------------------------------------- steps
def run_interactions(lake: Lake, params: TrainingParams) -> Interactions:
    """Weblogs + catalogue -> weighted interactions, window and vocabulary."""
    first_day = None
    days = partition_days(lake)
    if params.train_window_days is not None and days:
        # Only partitions that can hold events of the window are read: it ends at the
        # last event (on the last day) and starts train_window_days before it.
        last = date.fromisoformat(days[-1])
        first_day = (last - timedelta(days=math.ceil(params.train_window_days))).isoformat()
    days = [d for d in days if first_day is None or d >= first_day]
    items, users = read_catalog(lake)
    # Streaming polars over the partitions (prepare.py): the window is never held as
    # strings, which is what bounds this step's memory at 100M events.
    with scan_weblogs(lake, days) as scanned:
        try:
            prepared = prepare_interactions(scanned, items, params)
        except TrainingDataError as exc:
            if str(exc).startswith("no interactions"):
                raise TrainingDataError(
                    explain_empty_counts(lake, scanned.total_rows, len(scanned.partitions))
                ) from exc
            raise
    vocab, enc, window = prepared.vocab, prepared.enc, prepared.window
    arrays = {f"vocab/{k}": v for k, v in vocab.to_arrays().items()}
    arrays |= {f"enc/{k}": v for k, v in enc.to_arrays().items()}
    lastouts = leave_last_out(enc, window, params)
    for j, lastout in enumerate(lastouts):
        arrays |= {f"lastout/mask{j}": lastout.mask, f"lastout/users{j}": lastout.users}
    size = art.put_arrays(lake, art.key(INTERACTIONS, "prepared.npz"), arrays)
    catalog_users = set(users["user_id"].to_list())
    logged_users = set(vocab.user_ids.tolist())
    stats = {
        **prepared.data,
        "vocabulary": vocab.stats,
        "users_missing_from_store": len(logged_users - catalog_users) if catalog_users else 0,
        "store_users_never_logged": len(catalog_users - logged_users),
        "event_types": prepared.event_types,
        "impressions_clicked": prepared.impressions_clicked,
        "lastout": {
            "rounds": len(lastouts),
            "users": sum(int(lo.users.size) for lo in lastouts),
            "held_out_events": sum(int(lo.mask.sum()) for lo in lastouts),
        },
    }
    meta = {
        "bounds": {**window.bounds(), "widened": list(window.widened)},
        "window": window.as_dict(),
        "data": stats,
        "params": params.as_dict(),
    }
    art.put_json(lake, art.key(INTERACTIONS, "window.json"), meta)
    return Interactions(
        bounds=meta["bounds"], window=meta["window"], data=stats, params=meta["params"], bytes=size
    )


def run_item_features(lake: Lake, params: TrainingParams, now: float | None = None) -> ItemFeatures:
    """Item feature tables of the three snapshots (served one: catalogue up to ``now``)."""
    prep = load_prepared(lake)
    bad: dict[str, dict[str, int]] = {}
    served: ItemSnapshot | None = None
    for snap in prep.snapshots():
        until = (now if now is not None else time.time()) if snap == "serve" else None
        items = item_snapshot(prep.enc_for(snap), prep.vocab, prep.as_of(snap), params, until)
        art.put_arrays(lake, art.key(ITEM_FEATURES, f"{snap}.npz"), items.to_arrays())
        bad[snap] = non_finite(items.table, ITEM_COLUMNS)
        if snap == "serve":
            served = items
    assert served is not None  # prep.snapshots() always ends its window with "serve"
    return ItemFeatures(
        items=int(served.table.shape[0]),
        with_history=int(served.table[:, ITEM_COLUMNS.index("has_history")].sum()),
        horizons=served.horizons.as_dict(),
        table=_column_stats(served.table, ITEM_COLUMNS),
        non_finite=bad,
    )


def run_user_features(lake: Lake, params: TrainingParams) -> UserFeatures:
    prep = load_prepared(lake)
    bad: dict[str, dict[str, int]] = {}
    served: UserSnapshot | None = None
    for snap in prep.snapshots():
        users = user_snapshot(prep.enc_for(snap), prep.vocab, prep.as_of(snap), params)
        art.put_arrays(lake, art.key(USER_FEATURES, f"{snap}.npz"), users.to_arrays())
        bad[snap] = non_finite(users.table, USER_COLUMNS)
        aff = users.affinity.data
        if not np.isfinite(aff).all():
            bad[snap]["category_affinity"] = int((~np.isfinite(aff)).sum())
        if snap == "serve":
            served = users
    assert served is not None
    return UserFeatures(
        users=int(served.table.shape[0]),
        users_with_history=int((np.diff(served.seen.indptr) > 0).sum()),
        table=_column_stats(served.table, USER_COLUMNS),
        non_finite=bad,
    )


def run_retrieval(lake: Lake, params: TrainingParams) -> Retrieval:
    """ALS fitted before each snapshot, user vectors recomputed, session co-visitation,
    item-kNN and EASE (its regularisation chosen on the leave-last-out split)."""
    prep = load_prepared(lake)
    params, selection = select_als(prep.enc, prep.vocab, prep.window, params)
    art.put_json(lake, art.key(RETRIEVAL, "als_selection.json"), selection)
    ease_lambda, ease_selection = select_lambda(
        prep.enc, prep.vocab, prep.lastouts[0] if prep.lastouts else None, params
    )
    art.put_json(lake, art.key(RETRIEVAL, "ease_selection.json"), ease_selection)
    out = Retrieval(
        als={}, covisit={}, ease={}, als_selection=selection, ease_selection=ease_selection
    )
    for snap in prep.snapshots():
        as_of = prep.as_of(snap)
        enc = prep.enc_for(snap)
        # EASE's graph before the ALS matrix and fit: its dense item x item matrices
        # (four of 200 MB at 5k items) are then not alive beside them.
        ease_started = time.perf_counter()
        ease = ease_graph(enc, prep.vocab, as_of, params, ease_lambda)
        ease_s = time.perf_counter() - ease_started
        matrix = als_matrix(enc, prep.vocab, as_of, params)
        fit = fit_als(enc, prep.vocab, as_of, params, matrix=matrix)
        art.put_arrays(lake, art.key(RETRIEVAL, f"als-{snap}.npz"), fit.to_arrays())
        started = time.perf_counter() - ease_s  # the snapshot's seconds include EASE's
        snapshot = retrieval_snapshot(
            enc, prep.vocab, as_of, fit.item_factors, params, matrix=matrix, ease=ease
        )
        del matrix, ease  # not held through the next snapshot's build
        art.put_arrays(lake, art.key(RETRIEVAL, f"{snap}.npz"), snapshot.to_arrays())
        out.als[snap] = fit.stats
        out.ease[snap] = snapshot.ease_stats
        out.covisit[snap] = {
            "pairs": int(snapshot.covisit.indices.size),
            "items_with_neighbours": int((np.diff(snapshot.covisit.indptr) > 0).sum()),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if not np.isfinite(fit.item_factors).all():
            raise ValueError(f"ALS ({snap}) produced non-finite item factors")
        # Freed before the next snapshot's window is encoded, not after: at 100M events
        # one snapshot's window is ~2.7 GB, and holding two at once sets the step's peak.
        del enc, fit, snapshot
    return out


def build_index_artifact(lake: Lake, prep: Prepared, version: str) -> IndexArtifact:
    items = ItemSnapshot.from_arrays(art.get_arrays(lake, art.key(ITEM_FEATURES, "serve.npz")))
    retrieval = RetrievalSnapshot.from_arrays(art.get_arrays(lake, art.key(RETRIEVAL, "serve.npz")))
    names = prep.vocab.categories
    return IndexArtifact(
        version=version,
        item_ids=prep.vocab.item_ids.tolist(),
        vectors=retrieval.item_factors,
        categories=[[str(names[c]) for c in cats] for cats in prep.vocab.item_categories],
        published_at=prep.vocab.published_at,
        popularity=items.table[:, ITEM_COLUMNS.index("log_pop_decayed")].astype(np.float32),
        titles=[],
    )


def run_candidate_index(
    lake: Lake, publisher: IndexPublisher | None = None, version: str | None = None
) -> CandidateIndex:
    """The served index artifact in the lake; published to Elasticsearch when configured."""
    prep = load_prepared(lake)
    version = version or new_version()
    artifact = build_index_artifact(lake, prep, version)
    with tempfile.TemporaryDirectory(prefix="recsys-index-") as tmp:
        for path in artifact.save(Path(tmp)):
            lake.put_bytes(art.key(CANDIDATE_INDEX, path.name), path.read_bytes())
    result = CandidateIndex(
        index_version=version,
        items=len(artifact.item_ids),
        dim=artifact.dim,
        published="embedded (travels in the bundle)",
    )
    if publisher is not None:
        published = publish_with_retention(publisher, artifact, ModelRegistry(lake))
        result = dataclasses.replace(
            result,
            published=published.index,
            kept_indices=published.kept,
            pruned_indices=published.pruned,
        )
    return result


def run_ranking_dataset(lake: Lake, params: TrainingParams) -> RankingDatasetStats:
    """Labelled candidates at every ranking cut-off, one group per (cut-off, user)."""
    prep = load_prepared(lake)
    cutoffs = prep.window.cutoffs
    per_cutoff = max(1, params.ranking_max_users // len(cutoffs))
    parts = []
    frames = []
    for j, cutoff in enumerate(cutoffs):
        state = load_state(lake, prep, f"rank{j}", params)
        try:
            part = build_ranking_dataset(
                state, prep.enc, prep.window.label_end(cutoff), params, max_users=per_cutoff
            )
        except ValueError:
            if j == 0:
                raise
            continue  # an older cut-off without usable labels adds nothing
        parts.append(part)
        frames.append(
            part.frame(state).with_columns(
                pl.lit(j, dtype=pl.Int16).alias("cutoff"), pl.lit(False).alias("lastout")
            )
        )
    lastout_stats: dict[str, Any] = {"users": 0, "rows": 0, "rounds": 0}
    for j, lastout in enumerate(prep.lastouts):
        # Sampled users' own held-out recent past (lastout.py), one group each.
        state = load_state(lake, prep, f"{LASTOUT}{j}", params)
        try:
            part = build_ranking_dataset(
                state,
                prep.enc,
                state.as_of,
                params,
                max_users=params.lastout_users,
                labels=(lastout.labels(prep.enc), {}),
            )
        except ValueError as exc:
            lastout_stats.setdefault("skipped", []).append(str(exc))
            continue
        lastout_stats["users"] += part.stats["users"]
        lastout_stats["rows"] += part.stats["rows"]
        lastout_stats["rounds"] += 1
        parts.append(part)
        frames.append(
            part.frame(state).with_columns(
                pl.lit(len(cutoffs) + j, dtype=pl.Int16).alias("cutoff"),
                pl.lit(True).alias("lastout"),
            )
        )
    dataset = RankingDataset.concat(parts)
    buffer = io.BytesIO()
    pl.concat(frames).write_parquet(buffer)
    lake.put_bytes(art.key(RANKING_DATASET, "dataset.parquet"), buffer.getvalue())
    bad = non_finite(dataset.features, FEATURE_NAMES)
    stats = {
        **dataset.stats,
        "cutoffs": len(parts) - lastout_stats["rounds"],
        "lastout": lastout_stats,
        "non_finite": bad,
    }
    art.put_json(lake, art.key(RANKING_DATASET, "stats.json"), stats)
    return RankingDatasetStats(**stats)


def load_ranking_dataset(lake: Lake) -> RankingDataset:
    return _load_ranking_dataset(lake)[0]


def _load_ranking_dataset(lake: Lake) -> tuple[RankingDataset, npt.NDArray[np.bool_]]:
    """The dataset and, per group, whether it is a leave-last-out query (all False for
    a dataset written before that column existed)."""
    data = lake.get_bytes(art.key(RANKING_DATASET, "dataset.parquet"))
    frame = pl.read_parquet(data)
    users = sorted(frame["user_id"].unique().to_list())
    dataset = RankingDataset.from_frame(frame, {u: n for n, u in enumerate(users)})
    if "lastout" not in frame.columns:
        return dataset, np.zeros(dataset.groups.size, dtype=bool)
    starts = np.cumsum(dataset.groups) - dataset.groups
    return dataset, frame["lastout"].to_numpy()[starts].astype(bool)


def fit_ranking(
    dataset: RankingDataset, lastout: npt.NDArray[np.bool_], params: TrainingParams
) -> tuple[RankerFit, dict[str, Any], RankingDataset]:
    """Ranker, gate decision and the dataset it was trained on.

    With ``lastout_select`` the leave-last-out queries are chosen by ``lastout_rule``:
    ``cutoff_gate`` (:func:`_fit_ranking_cutoff_gate`) keeps them out when a ranker
    trained on the global cut-off queries alone passes the ranker gate; ``both_kinds``
    trains two candidates on the same training users, one on the cut-off queries
    alone, one on the cut-off and leave-last-out queries, and scores each, as it would
    serve (ranker or blend, per its own gate), on the validation users' queries of both
    kinds: cut-off queries ask what the log's end asks (live traffic, a global time
    split), leave-last-out queries what each user's own recent past asks (a per-user
    split). The candidate with the larger mean relative NDCG gain over the validated
    blend on the two kinds serves (:func:`_choose_queries`). Without two kinds of
    queries (or with ``lastout_select`` off) every query is used. The choice and its
    figures are in ``ranking["lastout_choice"]``."""
    if not (params.lastout_select and lastout.any() and (~lastout).any()):
        fit = train_ranker(dataset, params)
        ranking = gate_ranker(dataset, fit, params)
        ranking["lastout_choice"] = {
            "queries": "cutoffs+lastout" if lastout.any() else "cutoffs",
            "reason": "no choice to make"
            if params.lastout_select
            else "lastout_select is off: every query is used",
        }
        return fit, ranking, dataset
    if params.lastout_rule == "cutoff_gate":
        return _fit_ranking_cutoff_gate(dataset, lastout, params)
    valid_users = validation_users(dataset.users, params)
    cut = subset_groups(dataset, ~lastout)
    cut_fit = train_ranker(cut, params, valid_users=valid_users)
    cut_ranking = gate_ranker(cut, cut_fit, params)
    fit = train_ranker(dataset, params, valid_users=valid_users)
    ranking = gate_ranker(dataset, fit, params)
    choice = _choose_queries(
        dataset,
        lastout,
        np.isin(dataset.users, valid_users),
        {"cutoffs_only": (cut_fit, cut_ranking), "with_lastout": (fit, ranking)},
        params,
    )
    if choice["queries"] == "cutoffs":
        cut_ranking["lastout_choice"] = choice
        return cut_fit, cut_ranking, cut
    ranking["lastout_choice"] = choice
    return fit, ranking, dataset


GAIN_KINDS = (("cutoff", False), ("lastout", True))


def _choose_queries(
    dataset: RankingDataset,
    lastout: npt.NDArray[np.bool_],
    is_valid: npt.NDArray[np.bool_],
    candidates: Mapping[str, tuple[RankerFit, dict[str, Any]]],
    params: TrainingParams,
) -> dict[str, Any]:
    """Which queries train the served ranker, and the figures behind it.

    For each candidate and each kind of validation query (cut-off, leave-last-out):
    NDCG@k as served, relative to the validated blend on the same queries (the blend
    fitted on all training queries of both kinds, the with-lastout candidate's). A
    candidate's score is the mean of its two relative gains, so each protocol weighs
    the same whatever the number of queries of its kind; the higher score wins and a
    tie keeps the leave-last-out queries (the per-user side is where a model without
    them falls to popularity). A kind without validation groups is left out of the
    mean; with neither, the cut-off ranker's own gate decides (the earlier rule)."""
    k = params.eval_k
    reference = Blend.from_dict(candidates["with_lastout"][1]["blend"])
    held = {kind: subset_groups(dataset, is_valid & (lastout == flag)) for kind, flag in GAIN_KINDS}
    blend_ndcg = {
        kind: grouped_ndcg(reference.score(h.features), h.labels, h.groups, k)
        for kind, h in held.items()
    }
    out: dict[str, Any] = {
        "rule": "both_kinds: mean over cut-off and leave-last-out validation queries of the NDCG@"
        f"{k} gain over the validated blend; the higher wins, a tie keeps leave-last-out",
        "reference_blend_ndcg": {kind: _rounded(v) for kind, v in blend_ndcg.items()},
        "valid_groups": {kind: int(h.groups.size) for kind, h in held.items()},
    }
    scores: dict[str, float] = {}
    for name, (fit, ranking) in candidates.items():
        figures: dict[str, Any] = {
            "mode": ranking["mode"],
            "ranker_trees": ranking.get("ranker_trees"),
            "ranker_valid_ndcg": ranking.get("ranker_valid_ndcg"),
            "blend_valid_ndcg": ranking.get("blend_valid_ndcg"),
        }
        gains = []
        for kind, h in held.items():
            ndcg = served_group_ndcg(h, fit, ranking, k) if h.groups.size else float("nan")
            base = blend_ndcg[kind]
            gain = ndcg / base - 1.0 if math.isfinite(ndcg) and base > 0 else float("nan")
            figures[f"{kind}_ndcg"] = _rounded(ndcg)
            figures[f"{kind}_gain"] = _rounded(gain)
            if math.isfinite(gain):
                gains.append(gain)
        scores[name] = float(np.mean(gains)) if gains else float("nan")
        figures["score"] = _rounded(scores[name])
        out[name] = figures
    cut_score, lo_score = scores["cutoffs_only"], scores["with_lastout"]
    if not (math.isfinite(cut_score) and math.isfinite(lo_score)):
        verdict = _cutoff_ranker_wins(candidates["cutoffs_only"][1], params)
        out.update(
            queries="cutoffs" if verdict is None else "cutoffs+lastout",
            reason="no validation queries to compare on; the cut-off ranker "
            + ("passes its gate" if verdict is None else verdict),
        )
        return out
    keep = lo_score >= cut_score
    out.update(
        queries="cutoffs+lastout" if keep else "cutoffs",
        reason=f"mean gain over the blend: with leave-last-out queries {lo_score:+.4f}, "
        f"cut-off queries only {cut_score:+.4f}"
        + (": the leave-last-out queries are kept" if keep else ": they are left out"),
    )
    return out


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def _fit_ranking_cutoff_gate(
    dataset: RankingDataset, lastout: npt.NDArray[np.bool_], params: TrainingParams
) -> tuple[RankerFit, dict[str, Any], RankingDataset]:
    """``lastout_rule = cutoff_gate``: the ranker is first trained on the global cut-off
    queries alone (its own validation users); if it passes the gate it serves without
    the leave-last-out queries, otherwise it is trained on all queries. Both attempts'
    validation figures are kept. Judged on cut-off queries only, it cannot see what a
    per-user split asks (bench/RESULTS.md: the bursty and MovieLens-shaped worlds)."""
    cut = subset_groups(dataset, ~lastout)
    cut_fit = train_ranker(cut, params)
    cut_ranking = gate_ranker(cut, cut_fit, params)
    figures = {
        name: cut_ranking.get(name)
        for name in ("ranker_trees", "ranker_valid_ndcg", "blend_valid_ndcg", "valid_groups")
    }
    choice: dict[str, Any] = {
        "rule": "cutoff_gate",
        "cutoffs_only": {**figures, "mode": cut_ranking["mode"]},
    }
    verdict = _cutoff_ranker_wins(cut_ranking, params)
    if verdict is None:
        choice.update(
            queries="cutoffs",
            reason=f"the ranker trained on the global cut-off queries alone has "
            f"{figures['ranker_trees']} trees and beats the blend on validation "
            f"({figures['ranker_valid_ndcg']:.4f} vs {figures['blend_valid_ndcg']:.4f}): "
            "the leave-last-out queries are not added",
        )
        cut_ranking["lastout_choice"] = choice
        return cut_fit, cut_ranking, cut
    fit = train_ranker(dataset, params)
    ranking = gate_ranker(dataset, fit, params)
    choice["with_lastout"] = {
        **{
            name: ranking.get(name)
            for name in ("ranker_trees", "ranker_valid_ndcg", "blend_valid_ndcg", "valid_groups")
        },
        "mode": ranking["mode"],
    }
    choice.update(
        queries="cutoffs+lastout",
        reason=f"the ranker trained on the global cut-off queries alone {verdict}: "
        "the leave-last-out queries are added",
    )
    ranking["lastout_choice"] = choice
    return fit, ranking, dataset


def _cutoff_ranker_wins(ranking: Mapping[str, Any], params: TrainingParams) -> str | None:
    """None when the gate's criterion holds (enough trees, validation NDCG above the
    blend's by the margin), else why not. Applied whatever ``ranker_gate`` says: with
    the gate off the gate's own mode is always "ranker" and would decide nothing."""
    trees = int(ranking.get("ranker_trees") or 0)
    ranker, blend = ranking.get("ranker_valid_ndcg"), ranking.get("blend_valid_ndcg")
    if ranker is None or blend is None:
        return "has no validation users to compare on"
    if trees < params.ranker_min_trees:
        return f"stopped at {trees} trees"
    if not ranker > blend * (1.0 + params.ranker_gate_margin):
        return f"does not beat the blend on validation ({ranker:.4f} vs {blend:.4f})"
    return None


def run_ranking_model(lake: Lake, params: TrainingParams) -> RankingModel:
    dataset, lastout = _load_ranking_dataset(lake)
    bad = non_finite(dataset.features, FEATURE_NAMES)
    if bad:
        raise ValueError(f"the ranking dataset holds non-finite features: {bad}")
    fit, ranking, dataset = fit_ranking(dataset, lastout, params)
    log.info(
        "training.ranker_gate",
        mode=ranking["mode"],
        reason=ranking["reason"],
        trees=fit.best_iteration,
        queries=ranking["lastout_choice"]["queries"],
    )
    art.put_json(lake, art.key(RANKING_MODEL, "ranking.json"), finite_json(ranking))
    path = _tmp_file(".txt")
    try:
        fit.booster.save_model(str(path), num_iteration=fit.best_iteration)
        lake.put_bytes(art.key(RANKING_MODEL, RANKER_FILE), path.read_bytes())
    finally:
        path.unlink(missing_ok=True)
    stats = {
        "best_iteration": fit.best_iteration,
        "valid_ndcg": fit.valid_ndcg,
        "train_ndcg": fit.train_ndcg,
        "seconds": round(fit.seconds, 3),
        "rows": int(dataset.features.shape[0]),
        "groups": int(dataset.groups.size),
        "feature_importance": fit.feature_importance,
        "ranking": ranking,
        "curves": fit.curves,  # NDCG@K per round (MLflow's learning curve)
    }
    art.put_json(lake, art.key(RANKING_MODEL, "ranker.json"), finite_json(stats))
    return RankingModel(**stats)


def load_ranking(lake: Lake) -> dict[str, Any]:
    """The ranker gate's decision (``ranking_model/ranking.json``): mode, blend, why."""
    return art.get_json(lake, art.key(RANKING_MODEL, "ranking.json"))


def load_ranker(lake: Lake) -> Ranker:
    import lightgbm as lgb

    text = lake.get_bytes(art.key(RANKING_MODEL, RANKER_FILE)).decode()
    return Ranker(lgb.Booster(model_str=text))


def run_recommender_model(
    lake: Lake,
    params: TrainingParams,
    staging: Path,
    version: str | None = None,
    prune_staging: bool = False,
) -> Bundle:
    """Evaluate the challenger on the holdout, then write the served bundle, with the
    precomputed answers of its known users (``answer_depth``, :func:`write_answers`):
    the runtime folds no new events into the served state, so a known user's plain
    request (no filter, no exclusion, embedded retrieval, ``k <= answer_depth``) has
    one answer per bundle, computed here once by the function that serves the rest.

    The bundle is written under ``staging`` and copied to the lake at
    ``training/recommender_model/bundles/<version>/`` (manifest last), so the
    evaluation and registration steps, handed its version, fetch it from any process
    (:mod:`recsys_assets.training.handover`). Older training bundles are pruned from the
    lake (and from ``staging`` when ``prune_staging``: the assets' own cache, never a
    caller's directory).
    """
    prep = load_prepared(lake)
    ranking = load_ranking(lake)
    blend = Blend.from_dict(ranking["blend"]) if ranking.get("blend") else None
    ranker: Ranker | BlendRanker = load_ranker(lake)
    if ranking.get("mode") == "blend" and blend is not None:
        ranker = BlendRanker(blend)  # evaluated as it will serve
    eval_state = load_state(lake, prep, "eval", params)
    holdout = build_holdout(eval_state, prep.enc, prep.window.end, params)
    metrics = evaluate(model_lists(Recommender(eval_state, ranker, blend=blend)), holdout, params)
    popularity = evaluate(popularity_lists(eval_state), holdout, params)
    serve_state = load_state(lake, prep, "serve", params)
    index_meta = art.get_json(lake, art.key(CANDIDATE_INDEX, "index.json"))
    interactions = prep.meta
    retrieval = {
        snap: AlsFit.from_arrays(art.get_arrays(lake, art.key(RETRIEVAL, f"als-{snap}.npz"))).stats
        for snap in prep.snapshots()
    }
    manifest: dict[str, Any] = {
        "seed": params.seed,
        "params": params.as_dict(),
        "window": interactions["window"],
        "data": {
            key: interactions["data"][key]
            for key in ("partitions", "rows", "content_hashes", "events", "impressions")
        }
        | {"vocabulary": interactions["data"]["vocabulary"]},
        "metrics": {**metrics, "popularity": popularity, "holdout": holdout.stats},
        "index_version": index_meta["version"],
        "feature_names": list(FEATURE_NAMES),
        # How the bundle ranks: "ranker" (LightGBM, ties by the blend) or "blend" (the
        # ranker lost the gate on validation), with the validated blend and why.
        "ranking": ranking,
        "components": {
            "als": retrieval,
            "als_selection": art.get_json(lake, art.key(RETRIEVAL, "als_selection.json")),
            "ease_selection": art.get_json(lake, art.key(RETRIEVAL, "ease_selection.json")),
            "ease": serve_state.params.get("ease", {}),
            "ranking_dataset": art.get_json(lake, art.key(RANKING_DATASET, "stats.json")),
            "ranker": art.get_json(lake, art.key(RANKING_MODEL, "ranker.json")),
        },
    }
    version = version or new_version()
    staging.mkdir(parents=True, exist_ok=True)
    target = staging / version
    with BundleWriter(target, version=version) as writer:
        serve_state.save(writer.path / STATE_DIR)
        (writer.path / RANKER_FILE).write_bytes(lake.get_bytes(art.key(RANKING_MODEL, RANKER_FILE)))
        index_dir = writer.path / INDEX_DIR
        index_dir.mkdir()
        for name in ("vectors.npy", "items.parquet", "index.json"):
            (index_dir / name).write_bytes(lake.get_bytes(art.key(CANDIDATE_INDEX, name)))
        if params.answer_depth > 0:
            manifest["answers"] = write_answers(writer.path, serve_state, ranker, blend, params)
        writer.manifest.update(manifest)
    upload_bundle(lake, target)
    prune_bundles(lake, staging if prune_staging else None, keep=KEEP_BUNDLES)
    return Bundle(version=version, path=target, manifest=writer.manifest)


def write_answers(
    bundle_dir: Path,
    state: ModelState,
    ranker: Ranker | BlendRanker,
    blend: Blend | None,
    params: TrainingParams,
) -> dict[str, Any]:
    """Precompute every known user's top ``answer_depth`` into the bundle being written
    (``state/answers/``, see ``recsys_serving/model/answers.py``): ranked as the server
    ranks, by ``Recommender.ranked`` with the ranker compiled from the bundle's own
    ``ranker.txt`` (the server compiles it too; a table is used only under a ranker of
    the kind that wrote it). Costs about one request per known user, spread over the
    cores in forked workers; returns what the manifest records about it."""
    started = time.perf_counter()
    recommender = Recommender(state, ranker, path=bundle_dir, blend=blend)
    compile_seconds = 0.0
    if isinstance(ranker, Ranker):
        with tempfile.TemporaryDirectory(prefix="recsys-ranker-") as cache:
            try:
                recommender.compile_ranker(Path(cache))
            except RankerCompileError as exc:
                log.warning("recommender_model.answers_uncompiled", reason=exc.reason)
        compile_seconds = time.perf_counter() - started
    workers = min(params.resolved_threads, usable_cores())

    def progress(done: int, total: int, seconds: float) -> None:
        log.info(
            "recommender_model.answers",
            users=done,
            of=total,
            seconds=round(seconds, 1),
            users_per_second=round(done / max(seconds, 1e-9)),
        )

    table = precompute_answers(recommender, params.answer_depth, workers, progress)
    written = table.save(bundle_dir / STATE_DIR / ANSWERS_DIR)
    out = {
        "depth": table.depth,
        "ranker": table.ranker,
        "users": table.answered_users,
        "workers": workers,
        "bytes": sum(path.stat().st_size for path in written),
        "compile_seconds": round(compile_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
    log.info("recommender_model.answers_written", **out)
    return out


def snapshot_state(
    enc: Encoded,
    vocab: Vocabulary,
    as_of: float,
    params: TrainingParams,
    ease_lambda: float | None = None,
) -> ModelState:
    """A whole runtime state as of ``as_of`` from ``enc`` alone, built the way the
    item_features, user_features and retrieval_model steps build each snapshot
    (``ease_lambda``: the EASE regularisation retrieval_model chose).

    EASE's graph is built first, while nothing else of the snapshot is alive: its
    dense item x item matrices (four of 200 MB at 5k items) are the largest
    temporaries here, and the pieces built after it are independent of it."""
    ease = ease_graph(enc, vocab, as_of, params, ease_lambda)
    items = item_snapshot(enc, vocab, as_of, params)
    users = user_snapshot(enc, vocab, as_of, params)
    matrix = als_matrix(enc, vocab, as_of, params)
    fit = fit_als(enc, vocab, as_of, params, matrix=matrix)
    retrieval = retrieval_snapshot(
        enc, vocab, as_of, fit.item_factors, params, matrix=matrix, ease=ease
    )
    del matrix, fit, ease
    return assemble_state(vocab, items, users, retrieval, params)


def _listed(lists_for: ListFn, holdout: Holdout) -> ListFn:
    """Ask once per user; evaluate() and per_user_ndcg() then read the same lists."""
    k = holdout.k
    lists = {user: list(lists_for(user, k)) for user in holdout.users}
    return lambda user, n: lists[user][:n]


def run_per_user_evaluation(
    lake: Lake,
    split: PerUserSplit | None,
    vocab: Vocabulary,
    end: float,
    params: TrainingParams,
    ranker: Any,
    blend: Blend | None = None,
    started: float | None = None,
) -> dict[str, Any] | None:
    """The challenger and popularity on the per-user holdout (``evaluation.py``): each
    sampled user's last 20% of events left out (``split``: :func:`per_user_split` of
    the window, ``None`` when it has no user), the state rebuilt without them as of
    ``end``, the end of the window (ALS with the settings retrieval_model chose), the
    bundle's ranker. The caller drops the window once it has the split: the split's
    copy of it is all this needs (``started``: when the split began, for its seconds).

    Its cost is one more snapshot of the window plus scoring at most
    ``eval_per_user_users`` users; the production model is not scored here (its state
    has seen those events)."""
    if started is None:
        started = time.perf_counter()
    if split is None:
        return None
    selection = art.get_json(lake, art.key(RETRIEVAL, "als_selection.json"))
    fit_params = params.replace(**(selection.get("selected") or {}))
    ease = art.get_json(lake, art.key(RETRIEVAL, "ease_selection.json")).get("selected")
    state = snapshot_state(split.train, vocab, end, fit_params, ease)
    holdout = Holdout(
        k=params.eval_k,
        truth=split.truth,
        n_candidates=int(state.available.sum()),
        stats=split.stats,
    )
    challenger = _listed(model_lists(Recommender(state, ranker, blend=blend)), holdout)
    popularity = _listed(popularity_lists(state), holdout)
    out = {
        "metrics": {
            "challenger": evaluate(challenger, holdout, params),
            "popularity": evaluate(popularity, holdout, params),
        },
        "comparison": paired_comparison(
            per_user_ndcg(challenger, holdout), per_user_ndcg(popularity, holdout)
        ),
        "holdout": {**holdout.stats, "seconds": round(time.perf_counter() - started, 3)},
    }
    log.info("evaluation.per_user", **out["comparison"], seconds=out["holdout"]["seconds"])
    return out


def _time_holdout(
    lake: Lake, prep: Prepared, params: TrainingParams, ranker: Any, blend: Blend | None
) -> tuple[Holdout, dict[str, float], dict[str, dict[str, float] | None]]:
    """The time holdout: its users and truth, popularity's metrics, and the paired
    comparison of the challenger with popularity. The eval state they are scored on
    is built and dropped here, so that it is not alive beside the per-user holdout's."""
    eval_state = load_state(lake, prep, "eval", params)
    holdout = build_holdout(eval_state, prep.enc, prep.window.end, params)
    popularity_fn = _listed(popularity_lists(eval_state), holdout)
    popularity = evaluate(popularity_fn, holdout, params)
    challenger_fn = _listed(model_lists(Recommender(eval_state, ranker, blend=blend)), holdout)
    comparisons: dict[str, dict[str, float] | None] = {
        "holdout": paired_comparison(
            per_user_ndcg(challenger_fn, holdout), per_user_ndcg(popularity_fn, holdout)
        )
    }
    return holdout, popularity, comparisons


def run_model_evaluation(
    lake: Lake, params: TrainingParams, rule: PromotionRule, cache_dir: Path, bundle: str
) -> Evaluation:
    """The challenger (the training bundle of version ``bundle``) vs production (as
    served) vs popularity on the same holdout, the same on a per-user holdout, and the
    decision.

    While production has no model that beat popularity (the first model, or one kept
    answering with popularity), the first-model rule decides (``decide_first_model``):
    ``first_model`` when the challenger may serve, ``below_popularity`` when it may not.
    Otherwise the promotion rule compares it with production."""
    prep = load_prepared(lake)
    path = fetch_bundle(lake, bundle, cache_dir)
    manifest = verify_bundle(path)
    challenger_metrics = {
        k: v for k, v in manifest.get("metrics", {}).items() if not isinstance(v, dict)
    }
    # As the bundle serves: LightGBM with the blend breaking ties, or the blend alone.
    blend = manifest_blend(manifest)
    ranker: Ranker | BlendRanker
    if (manifest.get("ranking") or {}).get("mode") == "blend" and blend is not None:
        ranker = BlendRanker(blend)
    else:
        ranker = Ranker.load(path / RANKER_FILE, params.resolved_threads)
    holdout, popularity, comparisons = _time_holdout(lake, prep, params, ranker, blend)
    # One whole state at a time: the time holdout's is gone (with its scoring) before
    # the per-user one is built. And once the per-user split has its copy of the
    # window, the window itself is dropped: its mapped pages leave the process.
    started = time.perf_counter()
    split = per_user_split(prep.enc, prep.vocab.user_ids, prep.vocab.item_ids, params)
    vocab, end, impressions = prep.vocab, prep.window.end, int(prep.enc.imp_ts.size)
    del prep
    per_user = run_per_user_evaluation(lake, split, vocab, end, params, ranker, blend, started)
    del split
    comparisons["per_user"] = per_user["comparison"] if per_user is not None else None
    registry = ModelRegistry(lake)
    production = registry.alias(PRODUCTION)
    production_metrics: dict[str, float] | None = None
    production_version = production.version if production is not None else None
    gated = serves_popularity(production)
    unusable: str | None = None
    if production_version is not None and production_version != manifest["version"] and not gated:
        try:
            production_model = Recommender.load(registry.fetch(production_version, cache_dir))
        except BundleError as exc:
            # Trained by an older recsys (other features) or damaged: it cannot be
            # scored here, and a model that cannot be loaded is no bar to clear.
            unusable = str(exc)
            log.warning(
                "evaluation.production_unusable", version=production_version, error=unusable
            )
        else:
            production_metrics = evaluate(model_lists(production_model), holdout, params)
    verdict = judge(
        rule=rule,
        comparisons=comparisons,
        challenger_metrics=challenger_metrics,
        production_metrics=production_metrics,
        production_version=production_version,
        production_gated=gated,
        production_unusable=unusable,
        impressions=impressions,
    )
    first_model = verdict.first_model
    results: dict[str, dict[str, float]] = {
        "challenger": challenger_metrics,
        "popularity": popularity,
    }
    if production_metrics is not None:
        results["production"] = production_metrics
    if per_user is not None:
        results["challenger, per-user holdout"] = per_user["metrics"]["challenger"]
        results["popularity, per-user holdout"] = per_user["metrics"]["popularity"]
    return Evaluation(
        challenger_version=manifest["version"],
        production_version=production_version,
        production_answers=POPULARITY_ANSWERS if gated else ("model" if production else None),
        decision=verdict.decision,
        decision_reason=verdict.reason,
        evidence=verdict.promotion.evidence,
        first_model_rule={
            "applies": verdict.first_model_applies,
            "serve": first_model.serve,
            "reason": first_model.reason,
            "warning": first_model.warning,
            "evidence": first_model.evidence,
        },
        metrics={
            "challenger": challenger_metrics,
            "production": production_metrics,
            "popularity": popularity,
        },
        per_user=per_user,
        holdout=holdout.stats,
        k=params.eval_k,
        table=markdown_table(results, params.eval_k),
    )


def run_registration(lake: Lake, cache_dir: Path, evaluation: Evaluation) -> Registration:
    """Register the bundle ``evaluation`` judged. It becomes production when there is
    none yet, or when production only answers with popularity: serving its own answers
    if the first-model rule allows it, else answering with its popular items (the
    alias's evidence says ``answers: popularity``) until a model beats popularity."""
    bundle = fetch_bundle(lake, evaluation.challenger_version, cache_dir)
    registry = ModelRegistry(lake)
    # As recorded (JSON: NaN figures as null), so tags and evidence read the same
    # whichever process ran the evaluation.
    record = evaluation.to_json()
    tags = {
        "decision": str(evaluation.decision),
        "source": "retrain",
        **registration_tags(record),
    }
    registered = registry.register(bundle, tags=tags)
    registered_as = "registered"
    production = registry.alias(PRODUCTION)
    if production is None or serves_popularity(production):
        first = first_promotion(record)
        registered_as = first.registered_as
        if first.below_popularity:
            log.warning(
                "training.below_popularity",
                version=registered.version,
                reason=evaluation.decision_reason,
            )
        registry.promote(registered.version, reason=first.reason, evidence=first.evidence)
    log.info("training.registered", version=registered.version, registered_as=registered_as)
    return Registration(
        version=registered.version,
        registered_as=registered_as,
        decision=evaluation.decision,
        decision_reason=evaluation.decision_reason,
        uri=registry.uri(registered.version),
    )


# ----------------------------------------------------------------------- helpers
def _tmp_file(suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix="recsys-", suffix=suffix)
    os.close(fd)
    return Path(name)
