"""Build a :class:`~recsys_serving.model.state.ModelState` as of one instant.

The same function builds the state for the ranking dataset (as of the cut-off), for
the holdout evaluation (as of the holdout start) and for serving (as of the end of
the window), so features mean the same thing in all three. Only interactions strictly
before ``as_of`` are used; items published after it are unavailable.

The ``user_features`` / ``item_features`` assets write the tables this module
computes (:func:`item_table`, :func:`user_table`, :func:`affinities`); the
``retrieval_model`` asset adds factors and co-visitation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import polars as pl

from recsys_assets.training.artifacts import pack_meta, pack_ragged, unpack_meta, unpack_ragged
from recsys_assets.training.confidence import decay_weights
from recsys_assets.training.data import DAY, Encoded, Vocabulary, impression_slices
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.retrieval import (
    RetrievalSnapshot,
    retrieval_snapshot,
    sum_by_key,
)
from recsys_serving.model.candidates import CATEGORY_FANOUT, DEFAULT_QUOTAS
from recsys_serving.model.features import ITEM_COLUMNS, USER_COLUMNS
from recsys_serving.model.state import ModelState, Ragged

FRESH_MAX = 500


@dataclass(frozen=True)
class Horizons:
    """Resolved time horizons (days) of one state."""

    recent_days: float
    popularity_half_life_days: float
    fresh_days: float

    def as_dict(self) -> dict[str, float]:
        return {
            "recent_days": self.recent_days,
            "popularity_half_life_days": self.popularity_half_life_days,
            "fresh_days": self.fresh_days,
        }


def horizons(ts_before: npt.NDArray[np.float64], as_of: float, params: TrainingParams) -> Horizons:
    """Fixed horizons from params; unset ones span the newest ``recent_share`` of events."""
    if ts_before.size:
        q = float(np.quantile(ts_before, 1.0 - params.recent_share))
        adaptive = max((as_of - q) / DAY, 1.0 / 24.0 / 60.0)
    else:
        adaptive = 1.0
    recent = params.recent_days if params.recent_days is not None else adaptive
    half_life = (
        params.popularity_half_life_days if params.popularity_half_life_days is not None else recent
    )
    fresh = params.fresh_days if params.fresh_days is not None else recent
    return Horizons(recent, half_life, fresh)


def _log1p(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)


def impression_counts(
    enc: Encoded, keys: npt.NDArray[np.int32], as_of: float, n: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Impressions and clicked impressions before ``as_of`` per ``keys`` row
    (``enc.imp_item`` or ``enc.imp_user``; -1, unknown, is skipped), counted one slice
    of the impressions at a time: the exact counts of whole-array masks without their
    gigabyte of temporaries at 100M events."""
    shown = np.zeros(n, dtype=np.int64)
    clicked = np.zeros(n, dtype=np.int64)
    for part in impression_slices(keys.size):
        k = keys[part]
        ok = (enc.imp_ts[part] < as_of) & (k >= 0)
        shown += np.bincount(k[ok], minlength=n)
        clicked += np.bincount(k[ok & enc.imp_clicked[part]], minlength=n)
    return shown.astype(np.float64), clicked.astype(np.float64)


def item_table(
    enc: Encoded, vocab: Vocabulary, as_of: float, hz: Horizons, params: TrainingParams
) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """Per-item features (columns ITEM_COLUMNS) and the arrays popularity orders need."""
    n = vocab.item_ids.size
    mask = enc.ts < as_of
    item, ts, w = enc.item[mask], enc.ts[mask], enc.weight[mask].astype(np.float64)
    recent = ts >= as_of - hz.recent_days * DAY
    decayed = w * decay_weights(ts, as_of, hz.popularity_half_life_days)
    pop = np.bincount(item, weights=w, minlength=n)
    pop_recent = np.bincount(item[recent], weights=w[recent], minlength=n)
    pop_decayed = np.bincount(item, weights=decayed, minlength=n)
    first = np.full(n, np.inf)
    last = np.full(n, -np.inf)
    np.minimum.at(first, item, ts)
    np.maximum.at(last, item, ts)
    has = pop > 0
    users = (
        pl.DataFrame({"i": item, "u": enc.user[mask]})
        .group_by("i")
        .agg(pl.col("u").n_unique().alias("n"))
    )
    n_users = np.zeros(n)
    n_users[users["i"].to_numpy()] = users["n"].to_numpy()
    rating = enc.rating[mask]
    rated = np.isfinite(rating)
    rating_sum = np.bincount(item[rated], weights=rating[rated], minlength=n)
    rating_n = np.bincount(item[rated], minlength=n)

    impressions, clicks = impression_counts(enc, enc.imp_item, as_of, n)
    prior = float(clicks.sum() / impressions.sum()) if impressions.sum() else 0.0
    m = params.ctr_prior_strength
    ctr = (clicks + m * prior) / (impressions + m)

    total, total_recent = max(pop.sum(), 1e-9), max(pop_recent.sum(), 1e-9)
    trend = np.log((pop_recent + 1.0) / (total_recent + n)) - np.log((pop + 1.0) / (total + n))
    published = vocab.published_at
    age = np.where(np.isfinite(published), np.maximum(as_of - published, 0.0) / DAY, -1.0)
    columns = {
        "log_pop": _log1p(pop),
        "log_pop_recent": _log1p(pop_recent),
        "log_pop_decayed": _log1p(pop_decayed),
        "trend": trend,
        "ctr": ctr,
        "log_impressions": _log1p(impressions),
        "log_users": _log1p(n_users),
        "age_days": age,
        "first_seen_days": np.where(has, (as_of - first) / DAY, -1.0),
        "last_seen_days": np.where(has, (as_of - last) / DAY, -1.0),
        "mean_rating": np.where(rating_n > 0, rating_sum / np.maximum(rating_n, 1), 0.0),
        "has_history": has.astype(np.float32),
    }
    table = np.column_stack([columns[c] for c in ITEM_COLUMNS]).astype(np.float32)
    extra = {
        "pop": pop,
        "pop_recent": pop_recent,
        "pop_decayed": pop_decayed,
        "first": np.where(has, first, np.nan),
        "ctr_prior": prior,
    }
    return table, extra


def user_table(
    enc: Encoded, vocab: Vocabulary, as_of: float, hz: Horizons, params: TrainingParams
) -> tuple[npt.NDArray[np.float32], float]:
    """Per-user features (columns USER_COLUMNS) and the CTR prior used for cold users."""
    n = vocab.user_ids.size
    mask = enc.ts < as_of
    user, ts = enc.user[mask], enc.ts[mask]
    recent = ts >= as_of - hz.recent_days * DAY
    events = np.bincount(user, minlength=n).astype(np.float64)
    events_recent = np.bincount(user[recent], minlength=n).astype(np.float64)
    last = np.full(n, -np.inf)
    np.maximum.at(last, user, ts)
    distinct = (
        pl.DataFrame({"u": user, "i": enc.item[mask]})
        .group_by("u")
        .agg(pl.col("i").n_unique().alias("n"))
    )
    n_items = np.zeros(n)
    n_items[distinct["u"].to_numpy()] = distinct["n"].to_numpy()
    impressions, clicks = impression_counts(enc, enc.imp_user, as_of, n)
    prior = float(clicks.sum() / impressions.sum()) if impressions.sum() else 0.0
    m = params.ctr_prior_strength
    has = events > 0
    columns = {
        "log_events": _log1p(events),
        "log_events_recent": _log1p(events_recent),
        "days_since_last": np.where(has, (as_of - last) / DAY, -1.0),
        "log_items": _log1p(n_items),
        "ctr": (clicks + m * prior) / (impressions + m),
    }
    table = np.column_stack([columns[c] for c in USER_COLUMNS]).astype(np.float32)
    # Users without history must look exactly like a cold user at serving time.
    table[~has] = 0.0
    table[~has, USER_COLUMNS.index("days_since_last")] = -1.0
    table[~has, USER_COLUMNS.index("ctr")] = prior
    return table, prior


def affinities(
    enc: Encoded, vocab: Vocabulary, as_of: float, hz: Horizons, params: TrainingParams
) -> tuple[Ragged, Ragged]:
    """Each user's share of (decayed) interaction weight per category: whole window, recent."""
    n_users = vocab.user_ids.size
    lengths = np.asarray([len(c) for c in vocab.item_categories], dtype=np.int64)
    if vocab.categories.size == 0 or lengths.sum() == 0:
        return Ragged.empty(n_users), Ragged.empty(n_users)
    cat_indptr = np.concatenate([[0], np.cumsum(lengths)])
    cat_flat = np.asarray([c for cats in vocab.item_categories for c in cats], dtype=np.int64)
    mask = enc.ts < as_of
    user, item, ts = enc.user[mask], enc.item[mask], enc.ts[mask]
    w = enc.weight[mask] * decay_weights(ts, as_of, params.interaction_half_life_days)
    recent = ts >= as_of - hz.recent_days * DAY

    def shares(sel: npt.NDArray[np.bool_]) -> Ragged:
        u, i, ww = user[sel], item[sel], w[sel]
        reps = lengths[i]
        if reps.sum() == 0:
            return Ragged.empty(n_users)
        starts = np.repeat(cat_indptr[i], reps)
        offsets = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
        n_cat = int(vocab.categories.size)
        cats = cat_flat[starts + offsets]
        # An item's weight is split over its categories.
        split = np.repeat(ww / np.maximum(reps, 1), reps)
        keys, sums = sum_by_key(np.repeat(u, reps) * np.int64(n_cat) + cats, split)
        users, cat = keys // n_cat, keys % n_cat
        totals = np.bincount(users, weights=sums, minlength=n_users)
        shares = sums / np.maximum(totals[users], 1e-12)
        return Ragged.from_sorted_pairs(
            n_users, users.astype(np.int64), cat.astype(np.int64), shares.astype(np.float32)
        )

    return shares(np.ones(user.size, dtype=bool)), shares(recent)


def seen_and_recent(
    enc: Encoded, n_users: int, as_of: float, params: TrainingParams
) -> tuple[Ragged, Ragged]:
    """Seen items per user with their (decayed, log-damped) weight, and the most recent
    distinct items with recency weights ``recent_decay ** rank``."""
    mask = enc.ts < as_of
    n_items = int(enc.item.max(initial=-1)) + 1
    weight = enc.weight[mask] * decay_weights(
        enc.ts[mask], as_of, params.interaction_half_life_days
    )
    keys, sums = sum_by_key(enc.user[mask] * np.int64(max(n_items, 1)) + enc.item[mask], weight)
    seen_r = Ragged.from_sorted_pairs(
        n_users,
        keys // max(n_items, 1),
        keys % max(n_items, 1),
        np.log1p(sums).astype(np.float32),
    )
    frame = pl.DataFrame({"u": enc.user[mask], "i": enc.item[mask], "t": enc.ts[mask]})
    last = frame.group_by("u", "i").agg(pl.col("t").max())
    recent = (
        last.sort(["u", "t", "i"], descending=[False, True, False])
        .with_columns(pl.int_range(pl.len()).over("u").alias("r"))
        .filter(pl.col("r") < params.recent_items)
    )
    recent_r = Ragged.from_sorted_pairs(
        n_users,
        recent["u"].to_numpy().astype(np.int64),
        recent["i"].to_numpy().astype(np.int64),
        np.power(params.recent_decay, recent["r"].to_numpy()).astype(np.float32),
    )
    return seen_r, recent_r


def time_buckets(
    enc: Encoded, n_items: int, as_of: float, params: TrainingParams
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    """Equal time buckets from the first event to ``as_of`` and each item's
    interaction weight in each (events before ``as_of`` only)."""
    mask = enc.ts < as_of
    ts = enc.ts[mask]
    start = float(ts.min()) if ts.size else as_of - DAY
    start = min(start, as_of - 1.0)
    buckets = params.time_buckets
    edges = np.linspace(start, as_of, buckets + 1)
    bucket = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, buckets - 1)
    counts = np.bincount(
        enc.item[mask] * buckets + bucket,
        weights=enc.weight[mask].astype(np.float64),
        minlength=n_items * buckets,
    )
    return edges, counts.reshape(n_items, buckets).astype(np.float32)


def _order(score: npt.NDArray[np.float64], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``rows`` by score desc, then row asc (deterministic ties)."""
    return rows[np.lexsort((rows, -score[rows]))].astype(np.int64)


@dataclass
class ItemSnapshot:
    """Item features as of ``as_of`` (what the ``item_features`` asset stores)."""

    as_of: float
    publish_until: float
    horizons: Horizons
    table: npt.NDArray[np.float32]  # ITEM_COLUMNS
    pop: npt.NDArray[np.float64]
    pop_recent: npt.NDArray[np.float64]
    pop_decayed: npt.NDArray[np.float64]
    first: npt.NDArray[np.float64]  # first interaction, NaN when none
    logged_ever: npt.NDArray[np.bool_]  # mentioned anywhere in the window's logs
    ctr_prior: float
    time_edges: npt.NDArray[np.float64]  # (buckets + 1,) epoch seconds
    time_counts: npt.NDArray[np.float32]  # (n_items, buckets) interaction weight

    ARRAYS: ClassVar[tuple[str, ...]] = (
        "table",
        "pop",
        "pop_recent",
        "pop_decayed",
        "first",
        "logged_ever",
        "time_edges",
        "time_counts",
    )

    def to_arrays(self) -> dict[str, np.ndarray]:
        meta = {
            "as_of": self.as_of,
            "publish_until": self.publish_until,
            "horizons": self.horizons.as_dict(),
            "ctr_prior": self.ctr_prior,
        }
        return {**{n: getattr(self, n) for n in self.ARRAYS}, **pack_meta(meta)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ItemSnapshot:
        meta = unpack_meta(arrays)
        return cls(
            as_of=meta["as_of"],
            publish_until=meta["publish_until"],
            horizons=Horizons(**meta["horizons"]),
            ctr_prior=meta["ctr_prior"],
            **{n: arrays[n] for n in cls.ARRAYS},
        )


@dataclass
class UserSnapshot:
    """User features and history as of ``as_of`` (what ``user_features`` stores)."""

    as_of: float
    table: npt.NDArray[np.float32]  # USER_COLUMNS
    ctr_prior: float
    affinity: Ragged
    affinity_recent: Ragged
    seen: Ragged
    recent: Ragged

    RAGGED: ClassVar[tuple[str, ...]] = ("affinity", "affinity_recent", "seen", "recent")

    def to_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"table": self.table}
        for name in self.RAGGED:
            out.update(pack_ragged(name, getattr(self, name)))
        return {**out, **pack_meta({"as_of": self.as_of, "ctr_prior": self.ctr_prior})}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> UserSnapshot:
        meta = unpack_meta(arrays)
        return cls(
            as_of=meta["as_of"],
            ctr_prior=meta["ctr_prior"],
            table=arrays["table"],
            **{n: unpack_ragged(n, arrays) for n in cls.RAGGED},
        )


def item_snapshot(
    enc: Encoded,
    vocab: Vocabulary,
    as_of: float,
    params: TrainingParams,
    publish_until: float | None = None,
) -> ItemSnapshot:
    """Item features as of ``as_of``.

    Catalogue items are available once published; ``publish_until`` (default
    ``as_of``) moves that line later for the served state, so items the catalogue
    published after the last logged event (but before training) can be recommended.
    """
    hz = horizons(enc.ts[enc.ts < as_of], as_of, params)
    table, extra = item_table(enc, vocab, as_of, hz, params)
    logged_ever = np.zeros(vocab.item_ids.size, dtype=bool)
    logged_ever[enc.item] = True
    for part in impression_slices(enc.imp_item.size):
        shown = enc.imp_item[part]
        logged_ever[shown[shown >= 0]] = True
    edges, counts = time_buckets(enc, vocab.item_ids.size, as_of, params)
    return ItemSnapshot(
        as_of=float(as_of),
        publish_until=float(max(as_of, publish_until) if publish_until is not None else as_of),
        horizons=hz,
        table=table,
        pop=extra["pop"],
        pop_recent=extra["pop_recent"],
        pop_decayed=extra["pop_decayed"],
        first=extra["first"],
        logged_ever=logged_ever,
        ctr_prior=float(extra["ctr_prior"]),
        time_edges=edges,
        time_counts=counts,
    )


def user_snapshot(
    enc: Encoded, vocab: Vocabulary, as_of: float, params: TrainingParams
) -> UserSnapshot:
    hz = horizons(enc.ts[enc.ts < as_of], as_of, params)
    table, prior = user_table(enc, vocab, as_of, hz, params)
    aff, aff_recent = affinities(enc, vocab, as_of, hz, params)
    seen, recent = seen_and_recent(enc, vocab.user_ids.size, as_of, params)
    return UserSnapshot(float(as_of), table, prior, aff, aff_recent, seen, recent)


def assemble_state(
    vocab: Vocabulary,
    items: ItemSnapshot,
    users: UserSnapshot,
    retrieval: RetrievalSnapshot,
    params: TrainingParams,
) -> ModelState:
    """The runtime state from its pieces (all as of the same instant)."""
    if not items.as_of == users.as_of == retrieval.as_of:
        raise ValueError(
            f"state pieces disagree on as_of: items {items.as_of}, users {users.as_of}, "
            f"retrieval {retrieval.as_of}"
        )
    as_of = items.as_of
    hz = items.horizons
    published = vocab.published_at
    first = items.first
    has_date = np.isfinite(published)
    # Dated items exist once published; undated ones once they were first seen, or
    # always when the catalogue lists them and the logs never mention them.
    available = np.where(
        has_date,
        published <= items.publish_until,
        np.isfinite(first) | (vocab.in_catalog & ~items.logged_ever),
    )
    rows = np.flatnonzero(available).astype(np.int64)
    popular = _order(items.pop_decayed + 1e-6 * items.pop, rows)
    trending = _order(items.pop_recent + 1e-6 * items.pop_decayed, rows)
    born = np.where(has_date, published, first)
    is_fresh = available & np.isfinite(born) & (born >= as_of - hz.fresh_days * DAY)
    fresh_rows = np.flatnonzero(is_fresh).astype(np.int64)
    fresh = fresh_rows[np.lexsort((fresh_rows, -born[fresh_rows]))][:FRESH_MAX]

    cat_rows: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]] = []
    members: list[list[int]] = [[] for _ in range(vocab.categories.size)]
    for row in popular.tolist():
        for cat in vocab.item_categories[row]:
            members[cat].append(row)
    for cat_members in members:
        arr = np.asarray(cat_members, dtype=np.int64)
        cat_rows.append((arr, items.pop_decayed[arr].astype(np.float32)))
    category_popular = Ragged.from_lists(cat_rows) if cat_rows else Ragged.empty(0)
    cat_weight = np.asarray(
        [float(items.pop_decayed[np.asarray(m, dtype=np.int64)].sum()) for m in members]
    )
    top_categories = np.lexsort((np.arange(cat_weight.size), -cat_weight))[: CATEGORY_FANOUT * 2]

    state = ModelState(
        as_of=float(as_of),
        item_ids=vocab.item_ids,
        user_ids=vocab.user_ids,
        categories=vocab.categories,
        item_factors=np.ascontiguousarray(retrieval.item_factors, dtype=np.float32),
        user_factors=np.ascontiguousarray(retrieval.user_factors, dtype=np.float32),
        item_table=items.table,
        item_columns=ITEM_COLUMNS,
        user_table=users.table,
        user_columns=USER_COLUMNS,
        item_categories=vocab.item_categories_ragged(),
        user_affinity=users.affinity,
        user_affinity_recent=users.affinity_recent,
        seen=users.seen,
        recent=users.recent,
        covisit=retrieval.covisit,
        item_knn=retrieval.item_knn,
        ease=retrieval.ease,
        available=available.astype(bool),
        popular=popular,
        trending=trending,
        fresh=fresh.astype(np.int64),
        category_popular=category_popular,
        published_at=published.astype(np.float64),
        time_edges=np.asarray(items.time_edges, dtype=np.float64),
        item_time_counts=np.ascontiguousarray(items.time_counts, dtype=np.float32),
        params={
            "candidate_pool": params.candidate_pool,
            "candidate_quotas": dict(DEFAULT_QUOTAS),
            "top_categories": [int(c) for c in top_categories.tolist()],
            "user_ctr_prior": users.ctr_prior,
            "item_ctr_prior": items.ctr_prior,
            "horizons": hz.as_dict(),
            "publish_until": items.publish_until,
            "ease": retrieval.ease_stats,
        },
    )
    state.validate()
    return state


def build_state(
    enc: Encoded,
    vocab: Vocabulary,
    as_of: float,
    item_factors: npt.NDArray[np.float32],
    params: TrainingParams,
    publish_until: float | None = None,
    ease_lambda: float | None = None,
) -> ModelState:
    """The full runtime state as of ``as_of`` in one call (user vectors recomputed)."""
    items = item_snapshot(enc, vocab, as_of, params, publish_until)
    users = user_snapshot(enc, vocab, as_of, params)
    retrieval = retrieval_snapshot(enc, vocab, as_of, item_factors, params, ease_lambda=ease_lambda)
    return assemble_state(vocab, items, users, retrieval, params)
