"""Logs shaped like the public datasets a hidden benchmark might use, with a known truth.

Each generator writes a dataset directory in the project's input formats, exactly what
someone converting a public dump would hand to ``recsys``:

* ``items.ndjson``   for ``recsys catalog load --items`` (``item_id``, ``title``,
  ``categories``, ``published_at``, free attributes);
* ``users.ndjson``   for ``recsys catalog load --users`` (only when the shape has users);
* ``events.ndjson``  weblog-contract events for ``recsys ingest``;
* ``dataset.json``   what was generated (shape, size, seed, counts, time span).

Who likes what comes from the simulator's ground truth
(:class:`recsys_assets.simulation.truth.GroundTruth`), so there is a real signal to
find; everything else is reshaped after the public dataset it imitates:

* ``movielens``: explicit 1-5 ``rating`` events with ``value``, integer ids, epoch
  seconds in 1997-2003 (``movielens-early``: 1990-1996, before the default catalogue
  epoch), most of a user's ratings submitted at sign-up (bulk raters put a hundred in
  the same second), a long tail of light users, movies released during the period,
  a few re-ratings and re-sent lines; users with demographic attributes; no sessions,
  no impressions.
* ``retailrocket``: ``view`` / ``add_to_cart`` / ``purchase`` of anonymous visitors
  over 4.5 months in 2015 with millisecond timestamps converted to fractional seconds,
  most visitors seen once, items whose popularity rises and fades, categories from a
  two-level category tree, a few crawler "visitors" with thousands of views (some fast
  enough to look like bots, some not), 5% of the logged items missing from the catalogue.
* ``sessions``: a click log (``click`` only) with explicit session ids and RFC 3339
  timestamps with milliseconds; clicks within a session follow item-to-item
  similarity (the regime of session-based recommenders); cookie-like user ids.
* ``organic``: taste-only ratings at uniformly random times, no exposure, no trends:
  the regime where item-kNN is strongest (the same world as ``bench/quality.py``).
* ``bursty``: the regime of issue 11's real log: 1-5 ``rating`` events with integer
  epoch seconds over seven months (``medium``: a year), each user active in one to a
  few short bursts of a few days at their own times, items released over the whole
  period (``published_at``), choices driven by a hidden taste model (plus some
  popularity and a pull towards fresh releases), no impressions, no sessions. Under a
  per-user time split, taste models (EASE, ALS) beat popularity; under a global split,
  recent popularity is strong because most test users are in a burst at the cut.
* ``ml100k``: **real data**, not generated: MovieLens-100k (943 users, 1,682 movies,
  100,000 ratings 1..5, 1997-09..1998-04), taken from the ``recbole`` wheel on PyPI
  (``recbole/dataset_example/ml-100k``), downloaded once with ``pip download`` into
  ``$RECSYS_BENCH_CACHE`` (default ``~/.cache/recsys-bench``) and converted: ``rating``
  events with ``value`` and integer epoch ``ts``, items with title, genres as
  categories and ``published_at`` from the release year, users with age, gender,
  occupation and zip code. Size and seed are ignored. The data is never committed.

Usage::

    .venv/bin/python bench/datasets.py movielens --size small --seed 1 --out /tmp/ml-small
    .venv/bin/python bench/datasets.py retailrocket --size medium --out /tmp/rr-medium
    .venv/bin/python bench/datasets.py ml100k --out /tmp/ml100k
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys_assets.simulation.truth import GroundTruth  # noqa: E402

DAY = 86_400.0
SHAPES = (
    "movielens",
    "movielens-early",
    "retailrocket",
    "sessions",
    "organic",
    "bursty",
    "ml100k",
)
# Real logs: converted, not generated, so size and seed mean nothing for them.
REAL = ("ml100k",)
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # MovieLens-100K / -1M: ~100k / ~1M ratings.
    "movielens": {
        "small": {"n_users": 950, "n_items": 1_700, "median_ratings": 60},
        "medium": {"n_users": 6_000, "n_items": 3_900, "median_ratings": 100},
    },
    # RetailRocket: ~2 events per visitor, most visitors seen once.
    "retailrocket": {
        "small": {"n_users": 40_000, "n_items": 6_000, "n_leaves": 40},
        "medium": {"n_users": 300_000, "n_items": 25_000, "n_leaves": 120},
    },
    "sessions": {
        "small": {"n_users": 15_000, "n_items": 4_000, "n_categories": 30},
        "medium": {"n_users": 100_000, "n_items": 15_000, "n_categories": 60},
    },
    # Issue 11's regime; small is MovieLens-100K's scale (~100k ratings, 7 months).
    "bursty": {
        "small": {"n_users": 950, "n_items": 1_700, "median_ratings": 70, "days": 212},
        "medium": {"n_users": 6_000, "n_items": 3_900, "median_ratings": 100, "days": 365},
    },
    # bench/quality.py's organic worlds.
    "organic": {
        "small": {"n_users": 2_000, "n_items": 800, "n_categories": 16, "days": 14},
        "medium": {"n_users": 8_000, "n_items": 3_000, "n_categories": 24, "days": 21},
    },
}
GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# Share of MovieLens-1M ratings at 1..5 stars.
STAR_SHARES = np.asarray([0.056, 0.108, 0.261, 0.349, 0.226])
ORGANIC_END = datetime(2024, 6, 1, tzinfo=UTC)


@dataclass
class Dataset:
    """A generated dataset before it is written: frames in the output column order."""

    shape: str
    size: str
    seed: int
    items: pl.DataFrame
    users: pl.DataFrame | None
    events: pl.DataFrame
    notes: dict[str, Any]


def _utc(year: int, month: int = 1, day: int = 1) -> float:
    return datetime(year, month, day, tzinfo=UTC).timestamp()


def _gumbel(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    return -np.log(-np.log(rng.random(n)))


def _top(keys: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.int64]:
    """Indices of the ``n`` largest finite keys (all of them when fewer), best first."""
    finite = np.flatnonzero(np.isfinite(keys))
    if finite.size <= n:
        return finite[np.argsort(-keys[finite], kind="stable")]
    part = finite[np.argpartition(-keys[finite], n - 1)[:n]]
    return part[np.argsort(-keys[part], kind="stable")]


# ------------------------------------------------------------------------ movielens
def movielens(size: str, seed: int, start_year: int = 1997, end_year: int = 2003) -> Dataset:
    """Explicit ratings shaped like MovieLens-100K/1M (see the module docstring)."""
    shape = SIZES["movielens"][size]
    n_users, n_items = shape["n_users"], shape["n_items"]
    start, end = _utc(start_year, 9, 20), _utc(end_year, 2, 28)
    span = end - start
    truth = GroundTruth.generate(
        n_users,
        n_items,
        len(GENRES),
        seed,
        datetime.fromtimestamp(start, UTC),
        datetime.fromtimestamp(end, UTC),
        zipf_exponent=0.9,
        affinity_concentration=0.35,
    )
    rng = np.random.default_rng([seed, 0x4D4C])
    log_pop = np.log(truth.item_popularity)

    # Release dates: most movies are older than the logs, a fifth come out during them.
    new = rng.random(n_items) < 0.2
    age_years = np.minimum(rng.exponential(9.0, size=n_items), start_year - 1919)
    year = np.where(new, 0, start_year - 1 - np.floor(age_years)).astype(int)
    release = np.empty(n_items)
    old_year = year[~new]
    release[~new] = np.asarray([_utc(int(y)) for y in old_year]) + rng.uniform(
        0, 365 * DAY, size=old_year.size
    )
    release[new] = start + rng.uniform(0, span, size=int(new.sum()))
    year[new] = [datetime.fromtimestamp(t, UTC).year for t in release[new]]
    # Ids as in movies.dat: integers with gaps, not in release order.
    item_ids = np.sort(rng.choice(np.arange(1, int(n_items * 1.07) + 1), n_items, replace=False))
    user_ids = np.arange(1, n_users + 1)

    # Sign-ups are front-loaded (the site's launch), then a long trickle.
    signup = start + span * rng.beta(1.1, 3.0, size=n_users)
    counts = np.clip(
        rng.lognormal(np.log(shape["median_ratings"]), 1.05, size=n_users), 1, n_items * 0.6
    ).astype(int)
    bulk = rng.random(n_users) < 0.08  # submit whole pages of ratings in one second
    generous = rng.normal(0.0, 0.6, size=n_users)  # some users rate everything high

    users_col: list[npt.NDArray[np.int64]] = []
    items_col: list[npt.NDArray[np.int64]] = []
    ts_col: list[npt.NDArray[np.int64]] = []
    stars_col: list[npt.NDArray[np.float64]] = []
    for lo in range(0, n_users, 256):
        block = np.arange(lo, min(lo + 256, n_users))
        log_rel = np.log(truth.relevance_matrix(block))
        for row, u in enumerate(block.tolist()):
            n = int(counts[u])
            first = n if rng.random() < 0.5 else max(1, round(n * rng.uniform(0.3, 0.9)))
            later = n - first
            k = 0 if later == 0 else 1 + int(rng.poisson(2.0))
            sess_t = [float(signup[u])]
            sess_n = [first]
            if k:
                gaps = np.cumsum(rng.exponential(45 * DAY, size=k))
                split = rng.multinomial(later, np.full(k, 1.0 / k))
                for g, c in zip(gaps.tolist(), split.tolist(), strict=True):
                    if signup[u] + g < end and c > 0:
                        sess_t.append(float(signup[u] + g))
                        sess_n.append(int(c))
            rated = np.zeros(n_items, dtype=bool)
            for t0, c in zip(sess_t, sess_n, strict=True):
                since = t0 - release
                recent = np.where(
                    (since >= 0) & (since < 365 * DAY), np.exp(-since / (90 * DAY)), 0
                )
                keys = 2.5 * log_rel[row] + 0.6 * log_pop + 1.5 * recent + _gumbel(rng, n_items)
                keys[(since < 0) | rated] = -np.inf
                chosen = _top(keys, c)
                if chosen.size == 0:
                    continue
                rated[chosen] = True
                rng.shuffle(chosen)
                if bulk[u]:
                    # Pages of 20-150 ratings stamped with the same second.
                    page_no = np.arange(chosen.size) // int(rng.integers(20, 151))
                    offsets = page_no * int(rng.integers(30, 120))
                else:
                    gaps_s = rng.exponential(12.0, size=chosen.size)
                    gaps_s[rng.random(chosen.size) < 0.25] = 0.0
                    offsets = np.cumsum(gaps_s)
                when = np.floor(t0 + offsets).astype(np.int64)
                noisy = log_rel[row, chosen] + generous[u] + rng.normal(0, 0.6, size=chosen.size)
                users_col.append(np.full(chosen.size, u, dtype=np.int64))
                items_col.append(chosen.astype(np.int64))
                ts_col.append(when)
                stars_col.append(noisy)
    u_arr = np.concatenate(users_col)
    i_arr = np.concatenate(items_col)
    t_arr = np.concatenate(ts_col)
    score = np.concatenate(stars_col)
    # Stars by the global quantiles of (relevance + user generosity + noise), so the
    # distribution matches MovieLens and a low rating means a worse match.
    cuts = np.quantile(score, np.cumsum(STAR_SHARES)[:-1])
    stars = (np.searchsorted(cuts, score) + 1).astype(np.float64)

    # Real dumps are not clean: a few re-ratings (new value, later) and re-sent lines.
    n = u_arr.size
    again = rng.choice(n, size=max(1, n // 200), replace=False)
    u_arr = np.concatenate([u_arr, u_arr[again]])
    i_arr = np.concatenate([i_arr, i_arr[again]])
    t_arr = np.concatenate([t_arr, t_arr[again] + rng.integers(DAY, 200 * DAY, size=again.size)])
    stars = np.concatenate([stars, np.clip(stars[again] + rng.choice([-1, 1], again.size), 1, 5)])
    keep = t_arr < end
    u_arr, i_arr, t_arr, stars = u_arr[keep], i_arr[keep], t_arr[keep], stars[keep]
    events = pl.DataFrame(
        {
            "event_id": [f"ml-{k}" for k in range(u_arr.size)],
            "event_type": ["rating"] * u_arr.size,
            "user_id": user_ids[u_arr],
            "item_id": item_ids[i_arr],
            "ts": t_arr,
            "value": stars,
        }
    )
    resent = events.sample(n=max(1, events.height // 500), seed=seed)
    events = pl.concat([events, resent]).sort("ts", "event_id")

    items = pl.DataFrame(
        {
            "item_id": item_ids,
            "title": [f"Movie {i} ({y})" for i, y in zip(item_ids, year, strict=True)],
            "categories": [
                [GENRES[c] for c in row if c >= 0] for row in truth.item_categories.tolist()
            ],
            "published_at": [f"{y}-01-01" for y in year],
        }
    )
    occupations = rng.integers(0, 21, size=n_users)
    users = pl.DataFrame(
        {
            "user_id": user_ids,
            "gender": rng.choice(["M", "F"], size=n_users, p=[0.72, 0.28]),
            "age": rng.choice([1, 18, 25, 35, 45, 50, 56], size=n_users),
            "occupation": occupations,
            "zip": [f"{z:05d}" for z in rng.integers(1000, 99999, size=n_users)],
        }
    )
    name = "movielens" if start_year >= 1995 else "movielens-early"
    return Dataset(
        name,
        size,
        seed,
        items,
        users,
        events,
        {"bulk_raters": int(bulk.sum()), "released_during_logs": int(new.sum())},
    )


# --------------------------------------------------------------------- retailrocket
def retailrocket(size: str, seed: int) -> Dataset:
    """An e-commerce funnel shaped like RetailRocket (see the module docstring)."""
    shape = SIZES["retailrocket"][size]
    n_users, n_items, n_leaves = shape["n_users"], shape["n_items"], shape["n_leaves"]
    start, end = _utc(2015, 5, 3), _utc(2015, 9, 18)
    span = end - start
    truth = GroundTruth.generate(
        n_users,
        n_items,
        n_leaves,
        seed,
        datetime.fromtimestamp(start, UTC),
        datetime.fromtimestamp(end, UTC),
        zipf_exponent=1.05,
    )
    rng = np.random.default_rng([seed, 0x5252])
    log_pop = np.log(truth.item_popularity)
    leaf = truth.item_categories[:, 0]
    by_leaf = [np.flatnonzero(leaf == c) for c in range(n_leaves)]
    # Each item sells for a while: popularity rises to a peak and fades.
    peak = rng.uniform(start - 60 * DAY, end + 60 * DAY, size=n_items)
    width = rng.uniform(20 * DAY, 90 * DAY, size=n_items)

    visits = 1 + rng.negative_binomial(0.3, 0.6, size=n_users)
    n_visits = int(visits.sum())
    owner = np.repeat(np.arange(n_users), visits)
    first = start + span * rng.random(n_users)
    later = rng.exponential(12 * DAY, size=n_visits)
    is_first = np.concatenate([[True], owner[1:] != owner[:-1]])
    later[is_first] = 0.0
    # Visit times: the first one anywhere, returns some days later.
    cum = np.cumsum(later)
    starts_at = np.flatnonzero(is_first)
    base = np.repeat(cum[starts_at], np.diff(np.append(starts_at, n_visits)))
    offsets = cum - base
    visit_t = first[owner] + offsets
    ok = visit_t < end
    owner, visit_t = owner[ok], visit_t[ok]

    cols: dict[str, list[Any]] = {"u": [], "i": [], "t": [], "type": []}
    for u, t0 in zip(owner.tolist(), visit_t.tolist(), strict=True):
        n_views = int(rng.geometric(0.45))
        aff = truth.user_affinity[u].astype(np.float64)
        cat = int(rng.choice(n_leaves, p=aff / aff.sum()))
        t = t0
        for step in range(n_views):
            if step and rng.random() < 0.3:
                cat = int(rng.choice(n_leaves, p=aff / aff.sum()))
            pool = by_leaf[cat]
            if pool.size == 0:
                continue
            life = -0.5 * ((t - peak[pool]) / width[pool]) ** 2
            rel = truth.relevance(np.full(pool.size, u), pool)
            keys = (
                1.2 * np.log(rel) + log_pop[pool] + np.maximum(life, -8) + _gumbel(rng, pool.size)
            )
            item = int(pool[int(np.argmax(keys))])
            cols["u"].append(u)
            cols["i"].append(item)
            cols["t"].append(t)
            cols["type"].append("view")
            r = float(truth.relevance(np.asarray([u]), np.asarray([item]))[0])
            if rng.random() < 0.01 + 0.25 * r:
                tc = t + rng.uniform(20, 300)
                cols["u"].append(u)
                cols["i"].append(item)
                cols["t"].append(tc)
                cols["type"].append("add_to_cart")
                if rng.random() < 0.35:
                    cols["u"].append(u)
                    cols["i"].append(item)
                    cols["t"].append(tc + rng.uniform(60, 1800))
                    cols["type"].append("purchase")
            t += rng.exponential(70.0) + 3.0
    u_arr = np.asarray(cols["u"], dtype=np.int64)
    i_arr = np.asarray(cols["i"], dtype=np.int64)
    t_arr = np.asarray(cols["t"], dtype=np.float64)
    types = np.asarray(cols["type"])

    # Crawlers: thousands of views of arbitrary items; two fast enough for the bot
    # filter, two slow enough to pass it (as on the real site).
    bots = [(6_000, 0.3, 2 * DAY), (4_000, 0.25, 1 * DAY), (3_000, 12.0, 40 * DAY)]
    bots.append((2_500, 20.0, 60 * DAY))
    bot_ids: list[int] = []
    extra_u, extra_i, extra_t = [], [], []
    for n_b, gap, _ in bots:
        bid = n_users + len(bot_ids)
        bot_ids.append(bid)
        t0 = start + rng.uniform(0, span * 0.6)
        when = t0 + np.cumsum(rng.exponential(gap, size=n_b))
        when = when[when < end]
        extra_u.append(np.full(when.size, bid))
        extra_i.append(rng.integers(0, n_items, size=when.size))
        extra_t.append(when)
    u_arr = np.concatenate([u_arr, *extra_u])
    i_arr = np.concatenate([i_arr, *extra_i])
    t_arr = np.concatenate([t_arr, *extra_t])
    types = np.concatenate([types, np.full(sum(e.size for e in extra_u), "view")])
    keep = t_arr < end
    u_arr, i_arr, t_arr, types = u_arr[keep], i_arr[keep], t_arr[keep], types[keep]

    # Visitor and item ids are integers (the dump's visitorid / itemid).
    visitor_ids = rng.permutation(n_users + len(bot_ids) + 200_000)[: n_users + len(bot_ids)]
    item_ids = rng.permutation(n_items * 20)[:n_items] + 1
    ms = np.floor(t_arr * 1000.0)
    order = np.argsort(ms, kind="stable")
    n = order.size
    purchase = types[order] == "purchase"
    tx = np.full(n, None, dtype=object)
    tx[purchase] = [{"transactionid": str(k)} for k in range(int(purchase.sum()))]
    events = pl.DataFrame(
        {
            "event_id": [f"rr-{k}" for k in range(n)],
            "event_type": types[order].tolist(),
            "user_id": visitor_ids[u_arr[order]],
            "item_id": item_ids[i_arr[order]],
            "ts": ms[order] / 1000.0,
            "context": tx.tolist(),
        },
        schema_overrides={"context": pl.Struct({"transactionid": pl.String})},
    )

    # A two-level category tree; items list their leaf, then its parent.
    leaf_ids = rng.permutation(1700)[:n_leaves] + 1
    parents = rng.integers(0, max(2, n_leaves // 6), size=n_leaves)
    parent_ids = rng.permutation(np.arange(1700, 1800))[: max(2, n_leaves // 6)]
    missing = rng.random(n_items) < 0.05
    keep_items = np.flatnonzero(~missing)
    items = pl.DataFrame(
        {
            "item_id": item_ids[keep_items],
            "categories": [
                [str(leaf_ids[leaf[i]]), str(parent_ids[parents[leaf[i]]])]
                for i in keep_items.tolist()
            ],
            "available": rng.choice([0, 1], size=keep_items.size, p=[0.3, 0.7]),
            "property_790": [f"n{p:.3f}" for p in rng.lognormal(8, 1, size=keep_items.size)],
        }
    )
    return Dataset(
        "retailrocket",
        size,
        seed,
        items,
        None,
        events,
        {"bots": [int(visitor_ids[b]) for b in bot_ids], "items_missing": int(missing.sum())},
    )


# ------------------------------------------------------------------------- sessions
def sessions(size: str, seed: int) -> Dataset:
    """A click log with session ids, clicks following item-to-item similarity."""
    shape = SIZES["sessions"][size]
    n_users, n_items, n_cats = shape["n_users"], shape["n_items"], shape["n_categories"]
    start, end = _utc(2014, 4, 1), _utc(2014, 5, 1)
    span = end - start
    truth = GroundTruth.generate(
        n_users,
        n_items,
        n_cats,
        seed,
        datetime.fromtimestamp(start, UTC),
        datetime.fromtimestamp(end, UTC),
    )
    rng = np.random.default_rng([seed, 0x5E55])
    log_pop = np.log(truth.item_popularity)
    vecs = truth.item_vectors / np.linalg.norm(truth.item_vectors, axis=1, keepdims=True)
    # Each item's 30 most similar items: where a session goes next.
    neighbours = np.empty((n_items, 30), dtype=np.int64)
    for lo in range(0, n_items, 2048):
        sims = vecs[lo : lo + 2048] @ vecs.T
        sims[np.arange(sims.shape[0]), np.arange(lo, lo + sims.shape[0])] = -np.inf
        neighbours[lo : lo + 2048] = np.argpartition(-sims, 30, axis=1)[:, :30]

    n_sessions = 1 + rng.negative_binomial(0.5, 0.5, size=n_users)
    cols: dict[str, list[Any]] = {"u": [], "i": [], "t": [], "s": []}
    sid = 0
    for u in range(n_users):
        t_first = start + span * rng.random()
        times = t_first + np.cumsum(
            np.concatenate([[0.0], rng.exponential(4 * DAY, size=n_sessions[u] - 1)])
        )
        for t0 in times[times < end].tolist():
            sid += 1
            length = int(rng.geometric(0.22))
            t = t0
            current = -1
            for _ in range(length):
                if current >= 0 and rng.random() < 0.7:
                    pool = neighbours[current]
                else:
                    pool = rng.integers(0, n_items, size=400)
                rel = truth.relevance(np.full(pool.size, u), pool)
                keys = 1.5 * np.log(rel) + 0.8 * log_pop[pool] + _gumbel(rng, pool.size)
                current = int(pool[int(np.argmax(keys))])
                cols["u"].append(u)
                cols["i"].append(current)
                cols["t"].append(t)
                cols["s"].append(sid)
                t += rng.exponential(40.0) + 2.0
    t_arr = np.asarray(cols["t"])
    keep = t_arr < end
    order = np.argsort(t_arr, kind="stable")
    order = order[keep[order]]
    cookies = np.asarray([f"{x:012x}" for x in rng.integers(0, 2**47, size=n_users)])
    item_ids = rng.permutation(n_items * 10)[:n_items] + 214_500_000
    ms = np.floor(t_arr[order] * 1000).astype(np.int64)
    stamps = pl.Series(ms).cast(pl.Datetime("ms", "UTC")).dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
    events = pl.DataFrame(
        {
            "event_id": [f"yc-{k}" for k in range(order.size)],
            "event_type": ["click"] * order.size,
            "user_id": cookies[np.asarray(cols["u"])[order]],
            "item_id": item_ids[np.asarray(cols["i"])[order]],
            "ts": stamps,
            "session_id": np.asarray(cols["s"])[order],
        }
    )
    missing = rng.random(n_items) < 0.1
    keep_items = np.flatnonzero(~missing)
    items = pl.DataFrame(
        {
            "item_id": item_ids[keep_items],
            "categories": [
                [f"{c}" for c in truth.item_categories[i] if c >= 0] for i in keep_items.tolist()
            ],
        }
    )
    return Dataset(
        "sessions", size, seed, items, None, events, {"items_missing": int(missing.sum())}
    )


# -------------------------------------------------------------------------- organic
def organic_frames(size: str, seed: int) -> tuple[pl.DataFrame, pl.DataFrame, GroundTruth]:
    """Users choose what to rate themselves, by taste: no logging policy, no exposure.

    Each user rates a lognormal number of items drawn without replacement with
    probability proportional to ``relevance ** 3`` under the simulator's ground truth
    (taste dominates, popularity only through the item bias), at random times over
    the period, valued 1-5 from relevance. Collaborative signals (ALS, item-kNN) are
    strong here, as on public rating logs, unlike in the exposure-driven clickstream.
    Returns (events: user_id, item_id, ts epoch seconds, value; items; the truth).
    """
    shape = SIZES["organic"][size]
    end = ORGANIC_END.timestamp()
    start = end - shape["days"] * DAY
    truth = GroundTruth.generate(
        shape["n_users"],
        shape["n_items"],
        shape["n_categories"],
        seed,
        datetime.fromtimestamp(start, tz=UTC),
        ORGANIC_END,
    )
    rng = np.random.default_rng([seed, 0x0E6A])
    per_user = np.clip(rng.lognormal(3.0, 0.8, size=truth.n_users), 5, 300).astype(int)
    users, items, ts, values = [], [], [], []
    for lo in range(0, truth.n_users, 512):
        block = np.arange(lo, min(lo + 512, truth.n_users))
        rel = truth.relevance_matrix(block)
        gumbel = -np.log(-np.log(rng.random(rel.shape)))
        keys = 3.0 * np.log(rel) + gumbel
        for row, user in enumerate(block.tolist()):
            n = min(int(per_user[user]), truth.n_items)
            chosen = np.argpartition(-keys[row], n - 1)[:n]
            when = np.sort(rng.uniform(start, end, size=n))
            noise = rng.normal(0.0, 0.7, size=n)
            stars = np.clip(np.rint(1 + 4 * rel[row, chosen] + noise), 1, 5)
            users += [user] * n
            items += chosen.tolist()
            ts += when.tolist()
            values += stars.tolist()
    events = pl.DataFrame(
        {
            "user_id": truth.format_user_ids(np.asarray(users)).tolist(),
            "item_id": truth.format_item_ids(np.asarray(items)).tolist(),
            "ts": ts,
            "value": values,
        }
    )
    cat_ids = truth.category_ids
    items_frame = pl.DataFrame(
        {
            "item_id": truth.item_ids,
            "title": [f"item {i}" for i in range(truth.n_items)],
            "categories": [[cat_ids[c] for c in row if c >= 0] for row in truth.item_categories],
        }
    )
    return events, items_frame, truth


def organic(size: str, seed: int) -> Dataset:
    events, items, truth = organic_frames(size, seed)
    events = (
        events.with_row_index("n")
        .select(
            pl.format("o{}", pl.col("n")).alias("event_id"),
            pl.lit("rating").alias("event_type"),
            "user_id",
            "item_id",
            "ts",
            "value",
        )
        .sort("ts", "event_id")
    )
    users = pl.DataFrame({"user_id": truth.user_ids})
    return Dataset("organic", size, seed, items, users, events, {})


# --------------------------------------------------------------------------- bursty
BURSTY_END = datetime(2021, 9, 1, tzinfo=UTC)


def bursty_world(
    n_users: int,
    n_items: int,
    median_ratings: float,
    days: float,
    seed: int,
    *,
    end: datetime = BURSTY_END,
    size: str = "custom",
) -> Dataset:
    """Users rate in short bursts at their own times; items come out over the whole log.

    Why this shape: a per-user time split then tests each user at their own time
    (taste must be learnt from other users' bursts, long before or after), while a
    global split tests the few users who happen to be active at the cut, where recent
    popularity is hard to beat. A model must be good at both. Any size works (tests
    use a few hundred users); ``SIZES["bursty"]`` holds the benchmark ones.
    """
    end_s = end.timestamp()
    start_s = end_s - days * DAY
    truth = GroundTruth.generate(
        n_users,
        n_items,
        len(GENRES),
        seed,
        datetime.fromtimestamp(start_s, UTC),
        end,
        zipf_exponent=0.9,
        affinity_concentration=0.3,
    )
    rng = np.random.default_rng([seed, 0xB055])
    log_pop = np.log(truth.item_popularity)

    # A quarter of the catalogue predates the log (up to 3 years), the rest is released
    # uniformly during it; a release is rateable from its date on.
    old = rng.random(n_items) < 0.25
    release = np.where(
        old,
        start_s - rng.uniform(0, 3 * 365 * DAY, size=n_items),
        start_s + rng.uniform(0, days * DAY * 0.97, size=n_items),
    )
    item_ids = np.sort(rng.choice(np.arange(1, int(n_items * 1.1) + 1), n_items, replace=False))
    user_ids = np.arange(1, n_users + 1)

    counts = np.clip(
        rng.lognormal(np.log(median_ratings), 0.9, size=n_users), 5, n_items * 0.5
    ).astype(int)
    n_bursts = np.minimum(1 + rng.poisson(0.7, size=n_users), 4)
    generous = rng.normal(0.0, 0.5, size=n_users)

    users_col: list[npt.NDArray[np.int64]] = []
    items_col: list[npt.NDArray[np.int64]] = []
    ts_col: list[npt.NDArray[np.int64]] = []
    score_col: list[npt.NDArray[np.float64]] = []
    for lo in range(0, n_users, 256):
        block = np.arange(lo, min(lo + 256, n_users))
        log_rel = np.log(truth.relevance_matrix(block))
        for row, u in enumerate(block.tolist()):
            k = int(n_bursts[u])
            length = rng.uniform(0.5, 5.0, size=k) * DAY
            begin = np.sort(start_s + rng.uniform(0, days * DAY - length.max(), size=k))
            share = rng.dirichlet(np.full(k, 2.0)) if k > 1 else np.ones(1)
            per_burst = np.maximum(1, np.round(share * counts[u])).astype(int)
            rated = np.zeros(n_items, dtype=bool)
            for b0, dur, c in zip(begin.tolist(), length.tolist(), per_burst.tolist(), strict=True):
                since = b0 - release
                fresh = np.where(since >= 0, np.exp(-np.maximum(since, 0) / (30 * DAY)), 0.0)
                keys = 3.0 * log_rel[row] + 0.5 * log_pop + 1.2 * fresh + _gumbel(rng, n_items)
                keys[(since < 0) | rated] = -np.inf
                chosen = _top(keys, c)
                if chosen.size == 0:
                    continue
                rated[chosen] = True
                rng.shuffle(chosen)
                when = np.floor(np.sort(b0 + rng.uniform(0, dur, size=chosen.size)))
                users_col.append(np.full(chosen.size, u, dtype=np.int64))
                items_col.append(chosen.astype(np.int64))
                ts_col.append(when.astype(np.int64))
                score_col.append(
                    log_rel[row, chosen] + generous[u] + rng.normal(0, 0.5, size=chosen.size)
                )
    u_arr = np.concatenate(users_col)
    i_arr = np.concatenate(items_col)
    t_arr = np.concatenate(ts_col)
    score = np.concatenate(score_col)
    cuts = np.quantile(score, np.cumsum(STAR_SHARES)[:-1])
    stars = (np.searchsorted(cuts, score) + 1).astype(np.int64)
    order = np.lexsort((i_arr, t_arr))
    n = order.size
    events = pl.DataFrame(
        {
            "event_id": [f"b-{k}" for k in range(n)],
            "event_type": ["rating"] * n,
            "user_id": user_ids[u_arr[order]],
            "item_id": item_ids[i_arr[order]],
            "ts": t_arr[order],
            "value": stars[order],
        }
    )
    published = [datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d") for t in release.tolist()]
    items = pl.DataFrame(
        {
            "item_id": item_ids,
            "title": [f"Title {i}" for i in item_ids.tolist()],
            "categories": [
                [GENRES[c] for c in row if c >= 0] for row in truth.item_categories.tolist()
            ],
            "published_at": published,
        }
    )
    users = pl.DataFrame(
        {
            "user_id": user_ids,
            "gender": rng.choice(["M", "F"], size=n_users, p=[0.7, 0.3]),
            "age": rng.choice([18, 25, 35, 45, 50, 56], size=n_users),
        }
    )
    return Dataset(
        "bursty",
        size,
        seed,
        items,
        users,
        events,
        {
            "bursts_per_user": round(float(n_bursts.mean()), 2),
            "released_during_logs": int((~old).sum()),
        },
    )


def bursty(size: str, seed: int) -> Dataset:
    shape = SIZES["bursty"][size]
    return bursty_world(
        shape["n_users"],
        shape["n_items"],
        shape["median_ratings"],
        shape["days"],
        seed,
        size=size,
    )


# ------------------------------------------------------------------ ml100k (real)
RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


def cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_BENCH_CACHE", Path.home() / ".cache" / "recsys-bench"))


def _recbole_wheel() -> Path:
    """The recbole wheel, downloaded once with pip (the only route to the data here:
    PyPI is reachable, grouplens.org is not; the licence forbids redistributing it, so it
    stays in a local cache and is never committed)."""
    cache = cache_dir()
    found = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", RECBOLE_WHEEL, "--no-deps", "-d", str(cache)],
            check=True,
        )
        found = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {RECBOLE_WHEEL} left no wheel in {cache}")
    return found[0]


def _atomic(wheel: zipfile.ZipFile, suffix: str) -> list[list[str]]:
    """Rows of one RecBole atomic file (tab-separated, a typed header line first)."""
    text = wheel.read(f"{ML100K_PREFIX}.{suffix}").decode("utf-8", errors="replace")
    return [line.split("\t") for line in text.splitlines()[1:] if line]


def ml100k(size: str = "small", seed: int = 0) -> Dataset:
    """MovieLens-100k as the project's inputs (see the module docstring)."""
    del size, seed
    with zipfile.ZipFile(_recbole_wheel()) as wheel:
        inter = _atomic(wheel, "inter")
        item_rows = _atomic(wheel, "item")
        user_rows = _atomic(wheel, "user")
    events = pl.DataFrame(
        {
            "event_id": [f"ml100k-{k}" for k in range(len(inter))],
            "event_type": ["rating"] * len(inter),
            "user_id": [r[0] for r in inter],
            "item_id": [r[1] for r in inter],
            "ts": [int(float(r[3])) for r in inter],
            "value": [float(r[2]) for r in inter],
        }
    ).sort("ts", "event_id")
    # Two rows of the dump have no usable year ("unkonwn", "V"): no published_at then.
    years = [r[2] if len(r) > 2 and r[2].isdigit() else None for r in item_rows]
    items = pl.DataFrame(
        {
            "item_id": [r[0] for r in item_rows],
            "title": [r[1] if len(r) > 1 else "" for r in item_rows],
            "categories": [r[3].split(" ") if len(r) > 3 and r[3] else [] for r in item_rows],
            "published_at": [f"{y}-01-01T00:00:00Z" if y else None for y in years],
        }
    )
    users = pl.DataFrame(
        {
            "user_id": [r[0] for r in user_rows],
            "age": [int(r[1]) for r in user_rows],
            "gender": [r[2] for r in user_rows],
            "occupation": [r[3] for r in user_rows],
            "zip": [r[4] for r in user_rows],
        }
    )
    return Dataset("ml100k", "real", 0, items, users, events, {"source": RECBOLE_WHEEL})


# --------------------------------------------------------------------------- output
GENERATORS: dict[str, Callable[[str, int], Dataset]] = {
    "movielens": movielens,
    "movielens-early": lambda size, seed: movielens(size, seed, start_year=1990, end_year=1996),
    "retailrocket": retailrocket,
    "sessions": sessions,
    "organic": organic,
    "bursty": bursty,
    "ml100k": ml100k,
}


def write(dataset: Dataset, out: Path) -> dict[str, Any]:
    """Write the NDJSON files and ``dataset.json``; returns the description."""
    out.mkdir(parents=True, exist_ok=True)
    dataset.items.write_ndjson(out / "items.ndjson")
    if dataset.users is not None:
        dataset.users.write_ndjson(out / "users.ndjson")
    else:
        (out / "users.ndjson").unlink(missing_ok=True)
    _write_events(dataset.events, out / "events.ndjson")
    ts = dataset.events["ts"]
    if ts.dtype == pl.String:
        ts = ts.str.to_datetime(time_zone="UTC").dt.epoch("ms") / 1000.0
    info = {
        "shape": dataset.shape,
        "size": dataset.size,
        "seed": dataset.seed,
        "events": dataset.events.height,
        "event_types": dict(
            dataset.events.group_by("event_type").len().sort("event_type").iter_rows()
        ),
        "users": dataset.events["user_id"].n_unique(),
        "items_logged": dataset.events["item_id"].n_unique(),
        "catalog_items": dataset.items.height,
        "catalog_users": dataset.users.height if dataset.users is not None else 0,
        "first_event": datetime.fromtimestamp(float(ts.min()), UTC).isoformat(),  # type: ignore[arg-type]
        "last_event": datetime.fromtimestamp(float(ts.max()), UTC).isoformat(),  # type: ignore[arg-type]
        **dataset.notes,
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _write_events(events: pl.DataFrame, path: Path) -> None:
    """NDJSON without null fields (a converter leaves absent fields out)."""
    nullable = [c for c in events.columns if events[c].null_count()]
    if not nullable:
        events.write_ndjson(path)
        return
    import orjson

    with path.open("wb") as fh:
        for row in events.iter_rows(named=True):
            fh.write(orjson.dumps({k: v for k, v in row.items() if v is not None}) + b"\n")


def generate(shape: str, size: str, seed: int, out: Path) -> dict[str, Any]:
    if shape not in GENERATORS:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    base = "movielens" if shape.startswith("movielens") else shape
    if shape not in REAL and size not in SIZES[base]:
        raise ValueError(f"unknown size {size!r} for {shape}; one of {', '.join(SIZES[base])}")
    return write(GENERATORS[shape](size, seed), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=SHAPES)
    parser.add_argument("--size", default="small", choices=("small", "medium"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    info = generate(args.shape, args.size, args.seed, args.out)
    label = args.shape if args.shape in REAL else f"{args.shape}-{args.size}-s{args.seed}"
    print(
        f"{label}: {info['events']:,} events, {info['users']:,} "
        f"users, {info['items_logged']:,} items ({info['first_event'][:10]}.."
        f"{info['last_event'][:10]}) in {args.out} ({time.perf_counter() - started:.1f}s)"
    )


if __name__ == "__main__":
    main()
