"""The acceptance protocols (``/work/shared/evaluation-protocols.md``) and their baselines.

Two splits of a log of events, each giving training events and, per test user, the
positives (test items the user had not interacted with in training):

* **per-user**: each user's events sorted by (``ts``, ``item_id``); the first 80%
  (``floor(0.8 * n)`` events) train, the rest are the test;
* **global**: one instant, the 80% quantile of all event timestamps; events before it
  train, events at or after it are the test.

Test users are the users with training history and at least one positive. NDCG@10 is
binary (every positive counts 1), DCG over the 10 returned items, IDCG over
``min(|positives|, 10)``; a user without an answer scores 0. Recall@10, HitRate@10 and
Precision@10 are reported beside it.

Baselines, each tuned on the split itself (the best of a grid on the test users, so an
upper bound for a tuned baseline, as acceptance tunes them), all excluding the user's
training items: EASE (L2 grid), implicit ALS (factors x regularisation x alpha), item-kNN
(cosine and BM25 x neighbours), RP3beta (alpha x beta), all-time popularity, popularity
over the last N days before the end of training (N from a grid), and, for the per-user
split, popularity over the last N days before each user's own last training event (the
user's "now": the recency a model can know without seeing the test).

``bench/blackbox.py`` (CLI + HTTP) and ``bench/quality.py`` (in-process) both use this
module, so the two benches score exactly the same way.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import scipy.sparse as sp

K = 10
TRAIN_SHARE = 0.8
PROTOCOLS = ("per-user", "global")
DAY = 86_400.0
# Dense item x item models (EASE, RP3beta) are fitted on at most this many of the most
# interacted items (beyond it the dense inverse costs minutes and gigabytes on 2 cores).
DENSE_MAX_ITEMS = 8_000


# ------------------------------------------------------------------------ splits
@dataclass
class ProtocolSplit:
    """One protocol's split of a log: which rows train, and the positives per test user."""

    protocol: str
    train: pl.DataFrame  # the training rows of the frame (same columns)
    truth: dict[str, set[str]]  # test user -> positives
    cut: float | None  # the global instant (None for per-user)

    @property
    def positives(self) -> int:
        return sum(len(v) for v in self.truth.values())


def normalise(frame: pl.DataFrame) -> pl.DataFrame:
    """Columns the splits need: ``n`` (row number), ``event_type``, ``user_id``, ``item_id``
    (strings), ``ts`` (epoch seconds, float) and ``item_key`` (the sort key of ``item_id``:
    numeric when every id is an integer, as in a ratings dump, else the string)."""
    out = frame
    if "n" not in out.columns:
        out = out.with_row_index("n")
    if out["ts"].dtype.is_temporal():
        out = out.with_columns((pl.col("ts").dt.epoch("us").cast(pl.Float64) / 1e6).alias("ts"))
    out = out.with_columns(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("ts").cast(pl.Float64),
    )
    if "event_type" not in out.columns:
        out = out.with_columns(pl.lit("rating").alias("event_type"))
    numeric = out["item_id"].cast(pl.Int64, strict=False)
    key = numeric if numeric.null_count() == 0 else out["item_id"]
    return out.with_columns(key.alias("item_key"))


def _truth(train: pl.DataFrame, test: pl.DataFrame) -> dict[str, set[str]]:
    seen = train.select("user_id", "item_id").unique()
    warm = seen.select("user_id").unique()
    new = (
        test.select("user_id", "item_id")
        .unique()
        .join(seen, on=["user_id", "item_id"], how="anti")
        .join(warm, on="user_id", how="semi")
    )
    truth: dict[str, set[str]] = {}
    for user, item in new.iter_rows():
        truth.setdefault(user, set()).add(item)
    return truth


def split_per_user(frame: pl.DataFrame, train_share: float = TRAIN_SHARE) -> ProtocolSplit:
    """Each user's first ``floor(train_share * n)`` events (by ``ts``, ``item_id``) train.

    Impressions (when a log has them) are not events of the protocol: they stay in
    training when they happened before the user's first test event, so a model sees
    what the user saw up to their own test time and nothing after it.
    """
    frame = normalise(frame)
    positive = frame.filter(pl.col("event_type") != "impression")
    ranked = positive.sort("user_id", "ts", "item_key", "n").with_columns(
        pl.int_range(pl.len()).over("user_id").alias("_rank"),
        pl.len().over("user_id").alias("_count"),
    )
    is_train = pl.col("_rank") < (pl.col("_count") * train_share + 1e-9).floor()
    train = ranked.filter(is_train)
    test = ranked.filter(~is_train)
    first_test = test.group_by("user_id").agg(pl.col("ts").min().alias("_first_test"))
    shown = (
        frame.filter(pl.col("event_type") == "impression")
        .join(first_test, on="user_id", how="left")
        .filter(pl.col("_first_test").is_null() | (pl.col("ts") < pl.col("_first_test")))
        .drop("_first_test")
    )
    columns = frame.columns
    train_all = pl.concat([train.select(columns), shown.select(columns)]).sort("n")
    return ProtocolSplit("per-user", train_all, _truth(train, test), None)


def split_global(frame: pl.DataFrame, train_share: float = TRAIN_SHARE) -> ProtocolSplit:
    """Events before the ``train_share`` quantile of all (non-impression) timestamps train."""
    frame = normalise(frame)
    positive = frame.filter(pl.col("event_type") != "impression")
    cut = float(np.quantile(positive["ts"].to_numpy(), train_share))
    train = frame.filter(pl.col("ts") < cut)
    test = positive.filter(pl.col("ts") >= cut)
    truth = _truth(train.filter(pl.col("event_type") != "impression"), test)
    return ProtocolSplit("global", train, truth, cut)


def split(frame: pl.DataFrame, protocol: str, train_share: float = TRAIN_SHARE) -> ProtocolSplit:
    if protocol == "per-user":
        return split_per_user(frame, train_share)
    if protocol == "global":
        return split_global(frame, train_share)
    raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")


# ----------------------------------------------------------------------- metrics
def metrics(
    lists: Mapping[str, Sequence[str]], truth: Mapping[str, set[str]], k: int = K
) -> dict[str, float]:
    """Mean NDCG / Recall / HitRate / Precision @k over the test users (no answer: 0)."""
    if not truth:
        raise ValueError("no test users")
    disc = 1.0 / np.log2(np.arange(k) + 2.0)
    sums = {"ndcg": 0.0, "recall": 0.0, "hit_rate": 0.0, "precision": 0.0}
    for user, relevant in truth.items():
        top = list(lists.get(user, ()))[:k]
        hits = np.asarray([item in relevant for item in top], dtype=float)
        n_hits = float(hits.sum())
        sums["ndcg"] += float((hits * disc[: hits.size]).sum()) / float(
            disc[: min(len(relevant), k)].sum()
        )
        sums["recall"] += n_hits / len(relevant)
        sums["hit_rate"] += 1.0 if n_hits else 0.0
        sums["precision"] += n_hits / k
    n = len(truth)
    out = {f"{name}@{k}": value / n for name, value in sums.items()}
    out["users"] = float(n)
    return out


# --------------------------------------------------------------------- baselines
@dataclass
class Interactions:
    """Binary user x item matrix of the training events (impressions excluded)."""

    users: dict[str, int]
    items: list[str]
    matrix: sp.csr_matrix  # float32 0/1
    ts: npt.NDArray[np.float64]  # event times (sorted) ...
    ev_items: npt.NDArray[np.int64]  # ... and their item columns, one per event
    last_ts: dict[str, float]  # user -> last training event time


def interactions(train: pl.DataFrame) -> Interactions:
    pos = train.filter(pl.col("event_type") != "impression").sort("ts")
    users = sorted(pos["user_id"].unique().to_list())
    items = sorted(pos["item_id"].unique().to_list())
    u_index = {u: i for i, u in enumerate(users)}
    i_index = {it: i for i, it in enumerate(items)}
    rows = np.asarray([u_index[u] for u in pos["user_id"].to_list()], dtype=np.int64)
    cols = np.asarray([i_index[i] for i in pos["item_id"].to_list()], dtype=np.int64)
    matrix = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(len(users), len(items))
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    last = pos.group_by("user_id").agg(pl.col("ts").max())
    return Interactions(
        u_index,
        items,
        matrix,
        pos["ts"].to_numpy().astype(np.float64),
        cols,
        dict(last.iter_rows()),
    )


def _top_k(
    scores: npt.NDArray[np.float64], seen: sp.csr_matrix, k: int = K
) -> npt.NDArray[np.int64]:
    """Top-k columns per row, seen items excluded (dense scores, one block of users)."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    rows, cols = seen.nonzero()
    scores[rows, cols] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    return np.where(np.isfinite(np.take_along_axis(vals, order, axis=1)), top, -1)


def _blocks(users: list[str], m: Interactions, size: int = 512) -> Iterator[tuple[list[str], Any]]:
    for lo in range(0, len(users), size):
        chunk = users[lo : lo + size]
        yield chunk, np.asarray([m.users[u] for u in chunk], dtype=np.int64)


def _dense_lists(
    m: Interactions,
    users: list[str],
    score: Callable[[npt.NDArray[np.int64]], npt.NDArray[np.float64]],
    columns: npt.NDArray[np.int64] | None = None,
) -> dict[str, list[str]]:
    """Lists from a dense scorer of user rows (over ``columns`` of the matrix, or all)."""
    out: dict[str, list[str]] = {}
    seen_all = m.matrix if columns is None else m.matrix[:, columns]
    for chunk, rows in _blocks(users, m):
        top = _top_k(score(rows), seen_all[rows])
        for u, row in zip(chunk, top, strict=True):
            ids = row[row >= 0] if columns is None else columns[row[row >= 0]]
            out[u] = [m.items[i] for i in ids]
    return out


def _dense_columns(m: Interactions) -> npt.NDArray[np.int64] | None:
    if len(m.items) <= DENSE_MAX_ITEMS:
        return None
    counts = np.asarray(m.matrix.sum(axis=0)).ravel()
    return np.sort(np.argsort(-counts, kind="stable")[:DENSE_MAX_ITEMS])


Config = dict[str, Any]
Lists = dict[str, list[str]]
Fitter = Callable[["Interactions", list[str], list[Config]], Iterator[tuple[Config, Lists]]]


def ease_lists(
    m: Interactions, users: list[str], grid: list[Config]
) -> Iterator[tuple[Config, dict[str, list[str]]]]:
    """EASE (Steck 2019): B = I - P diag(1/diag P), P = (X'X + lambda I)^-1, diag B = 0.

    One eigendecomposition of X'X serves the whole lambda grid."""
    cols = _dense_columns(m)
    x = m.matrix if cols is None else m.matrix[:, cols]
    gram = (x.T @ x).toarray().astype(np.float64)
    evals, evecs = np.linalg.eigh(gram)
    for cfg in grid:
        p = (evecs / (evals + cfg["l2"])) @ evecs.T
        b = p / (-np.diag(p))[None, :]
        np.fill_diagonal(b, 0.0)
        yield cfg, _dense_lists(m, users, lambda rows, b=b: x[rows] @ b, cols)


def rp3beta_lists(
    m: Interactions, users: list[str], grid: list[Config]
) -> Iterator[tuple[Config, dict[str, list[str]]]]:
    """RP3beta (Paudel et al. 2017): W = (P_iu^a P_ui^a) / pop^b, diag 0, score = X W."""
    cols = _dense_columns(m)
    x = (m.matrix if cols is None else m.matrix[:, cols]).tocsr()
    pop = np.asarray(x.sum(axis=0)).ravel()
    user_deg = np.asarray(x.sum(axis=1)).ravel()
    p_ui = sp.diags(1.0 / np.maximum(user_deg, 1.0)) @ x
    p_iu = sp.diags(1.0 / np.maximum(pop, 1.0)) @ x.T.tocsr()
    for cfg in grid:
        a_ui = p_ui.tocsr(copy=True)
        a_ui.data = a_ui.data ** cfg["alpha"]
        a_iu = p_iu.tocsr(copy=True)
        a_iu.data = a_iu.data ** cfg["alpha"]
        w = (a_iu @ a_ui).toarray()
        w /= np.maximum(pop, 1.0)[None, :] ** cfg["beta"]
        np.fill_diagonal(w, 0.0)
        yield cfg, _dense_lists(m, users, lambda rows, w=w: x[rows] @ w, cols)


def _implicit_lists(model: Any, m: Interactions, users: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for chunk, rows in _blocks(users, m, 2048):
        ids, _ = model.recommend(rows, m.matrix[rows], N=K, filter_already_liked_items=True)
        for u, row in zip(chunk, ids, strict=True):
            out[u] = [m.items[i] for i in row if i >= 0]
    return out


def als_lists(
    m: Interactions, users: list[str], grid: list[Config]
) -> Iterator[tuple[Config, dict[str, list[str]]]]:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    for cfg in grid:
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=cfg["factors"],
                regularization=cfg["regularization"],
                alpha=cfg["alpha"],
                iterations=15,
                random_state=7,
            )
            model.fit(m.matrix, show_progress=False)
        yield cfg, _implicit_lists(model, m, users)


def knn_lists(
    m: Interactions, users: list[str], grid: list[Config]
) -> Iterator[tuple[Config, dict[str, list[str]]]]:
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender
    from implicit.utils import ParameterWarning

    for cfg in grid:
        if cfg["similarity"] == "bm25":
            model: Any = BM25Recommender(K=cfg["k"], K1=1.2, B=0.75)
        else:
            model = CosineRecommender(K=cfg["k"])
        with warnings.catch_warnings():
            # implicit's own BM25 weighting hands its kNN a COO matrix and warns about it.
            warnings.simplefilter("ignore", ParameterWarning)
            model.fit(m.matrix, show_progress=False)
        yield cfg, _implicit_lists(model, m, users)


def _popular_lists(
    m: Interactions, users: list[str], key: Callable[[str], npt.NDArray[np.float64]]
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for u in users:
        out[u] = _top_unseen(m, u, key(u))
    return out


def _top_unseen(m: Interactions, user: str, scores: npt.NDArray[np.float64]) -> list[str]:
    """The K best-scored items the user has not seen (partial sort: catalogues can be big)."""
    row = m.users[user]
    seen = m.matrix.indices[m.matrix.indptr[row] : m.matrix.indptr[row + 1]]
    scores = scores.copy()
    scores[seen] = -np.inf
    n = min(K, scores.size)
    part = np.argpartition(-scores, n - 1)[:n] if n < scores.size else np.arange(scores.size)
    top = part[np.lexsort((part, -scores[part]))]
    return [m.items[i] for i in top if np.isfinite(scores[i])]


def _counts(m: Interactions) -> npt.NDArray[np.float64]:
    return np.asarray(m.matrix.sum(axis=0)).ravel().astype(np.float64)


def popularity_lists(
    m: Interactions, users: list[str], grid: list[Config]
) -> Iterator[tuple[Config, dict[str, list[str]]]]:
    """All-time popularity: users per item over the whole training period."""
    counts = _counts(m)
    yield {}, _popular_lists(m, users, lambda _u: counts)


def _window_counts(m: Interactions, lo: float, hi: float) -> npt.NDArray[np.float64]:
    a, b = np.searchsorted(m.ts, [lo, hi], side="right")
    return np.bincount(m.ev_items[a:b], minlength=len(m.items)).astype(np.float64)


def recent_popularity_lists(
    m: Interactions, users: list[str], grid: list[Config]
) -> Iterator[tuple[Config, dict[str, list[str]]]]:
    """Events per item in the last N days before the end of training (ties: all-time)."""
    counts = _counts(m)
    tie = counts / (counts.max() + 1.0)
    end = float(m.ts.max())
    for cfg in grid:
        recent = _window_counts(m, end - cfg["days"] * DAY, end) + tie
        yield cfg, _popular_lists(m, users, lambda _u, r=recent: r)


def user_recent_popularity_lists(
    m: Interactions, users: list[str], grid: list[Config]
) -> Iterator[tuple[Config, dict[str, list[str]]]]:
    """Events per item in the N days before each user's own last training event.

    Users are visited in the order of that instant with a sliding window of counts
    (each event enters and leaves once), so the cost grows with the log, not with
    users x log."""
    counts = _counts(m)
    tie = counts / (counts.max() + 1.0)
    order = sorted(users, key=lambda u: m.last_ts[u])
    for cfg in grid:
        span = cfg["days"] * DAY
        window = np.zeros(len(m.items), dtype=np.float64)
        lo = hi = 0
        lists: dict[str, list[str]] = {}
        for u in order:
            now = m.last_ts[u]
            while hi < m.ts.size and m.ts[hi] <= now:
                window[m.ev_items[hi]] += 1.0
                hi += 1
            while lo < hi and m.ts[lo] <= now - span:
                window[m.ev_items[lo]] -= 1.0
                lo += 1
            lists[u] = _top_unseen(m, u, window + tie)
        yield cfg, lists


FULL_GRIDS: dict[str, list[Config]] = {
    "ease": [{"l2": v} for v in (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0)],
    "als": [
        {"factors": f, "regularization": r, "alpha": a}
        for f, r, a in itertools.product((32, 64, 128), (0.01, 0.1, 1.0), (1.0, 5.0, 20.0, 40.0))
    ],
    "item_knn": [
        {"similarity": s, "k": k}
        for s, k in itertools.product(("cosine", "bm25"), (20, 50, 100, 200, 400))
    ],
    "rp3beta": [
        {"alpha": a, "beta": b}
        for a, b in itertools.product((0.5, 0.75, 1.0, 1.25), (0.0, 0.2, 0.35, 0.5, 0.7))
    ],
    "popularity": [{}],
    "recent_popularity": [{"days": d} for d in (1, 3, 7, 14, 30, 60, 90, 180)],
    "user_recent_popularity": [{"days": d} for d in (1, 3, 7, 14, 30, 60, 90, 180)],
}
QUICK_GRIDS: dict[str, list[Config]] = {
    "ease": [{"l2": v} for v in (50.0, 200.0, 500.0)],
    "als": [
        {"factors": f, "regularization": 0.1, "alpha": a}
        for f, a in itertools.product((64, 128), (5.0, 20.0))
    ],
    "item_knn": [{"similarity": s, "k": 100} for s in ("cosine", "bm25")],
    "rp3beta": [{"alpha": a, "beta": b} for a, b in itertools.product((0.75, 1.0), (0.2, 0.5))],
    "popularity": [{}],
    "recent_popularity": [{"days": d} for d in (3, 7, 14, 30)],
    "user_recent_popularity": [{"days": d} for d in (3, 7, 14, 30)],
}
FITTERS: dict[str, Fitter] = {
    "ease": ease_lists,
    "als": als_lists,
    "item_knn": knn_lists,
    "rp3beta": rp3beta_lists,
    "popularity": popularity_lists,
    "recent_popularity": recent_popularity_lists,
    "user_recent_popularity": user_recent_popularity_lists,
}


def baselines_for(protocol: str) -> list[str]:
    """The per-user-anchored recent popularity only exists for the per-user split (in a
    global split every user's "now" is the cut, which ``recent_popularity`` covers)."""
    names = list(FITTERS)
    if protocol != "per-user":
        names.remove("user_recent_popularity")
    return names


def run_baselines(
    sp_: ProtocolSplit, quick: bool = False, names: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Every baseline at its best grid point on this split: metrics, config, seconds."""
    m = interactions(sp_.train)
    users = sorted(u for u in sp_.truth if u in m.users)
    grids = QUICK_GRIDS if quick else FULL_GRIDS
    out: dict[str, dict[str, Any]] = {}
    for name in names or baselines_for(sp_.protocol):
        started = time.perf_counter()
        best: tuple[float, Config, dict[str, float]] | None = None
        tried = 0
        for cfg, lists in FITTERS[name](m, users, grids[name]):
            tried += 1
            score = metrics(lists, sp_.truth)
            if best is None or score["ndcg@10"] > best[0]:
                best = (score["ndcg@10"], cfg, score)
        assert best is not None
        out[name] = {
            **best[2],
            "config": best[1],
            "configs_tried": tried,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if name in ("ease", "rp3beta") and len(m.items) > DENSE_MAX_ITEMS:
            out[name]["items_modelled"] = DENSE_MAX_ITEMS
    return out


def best_baseline(results: Mapping[str, Mapping[str, Any]]) -> tuple[str, float]:
    name = max(results, key=lambda n: results[n]["ndcg@10"])
    return name, float(results[name]["ndcg@10"])


def lift(model_ndcg: float, best: float) -> float | None:
    """Relative NDCG@10 of the model over the best baseline (None when that is 0)."""
    return model_ndcg / best - 1.0 if best > 0 and math.isfinite(best) else None
