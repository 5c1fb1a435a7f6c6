"""The hidden world behind the synthetic weblogs: who likes what, and who looks where.

Everything the simulator emits is drawn from a :class:`GroundTruth`, and the same
object later drives simulated live traffic against the served model. Keeping the
truth explicit (and saved next to the logs) is what lets tests and demos ask
questions real logs can never answer: how good is the oracle ranking, how much
of the click-through rate is position bias, how far did preferences drift.

The model is deliberately simple and documented, so a reader can predict the
effect of every knob:

* categories have unit-norm centroids in a ``dim``-dimensional taste space;
* an item belongs to one to three categories (primary first) and its vector is
  its primary centroid, plus half the mean of its secondary centroids, plus noise;
* a user has a sparse affinity over categories (a Dirichlet draw); the user
  vector is ``taste_scale * affinity @ centroids`` plus the user's own noise;
* ``relevance = sigmoid(u . v + item_bias + offset)`` where ``item_bias`` follows
  the Zipf-like item popularity, and ``offset`` is calibrated so the popularity-ish
  logging policy of :mod:`recsys_assets.simulation.policy` sees ``target_ctr``;
* ``P(click) = examination(position) * relevance`` with the cascade-style
  examination curve ``(1 / log2(position + 2)) ** position_eta``.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

FORMAT_VERSION = 1
DEFAULT_DIM = 16
DEFAULT_TARGET_CTR = 0.05
# Share of the catalogue already published when the simulated period starts; the
# rest appears during the period so freshness matters to the models.
PREEXISTING_SHARE = 0.7
# How far back the pre-existing catalogue was published.
BACKLOG = timedelta(days=365)
# How many categories an item has (1, 2 or 3) and with which probability.
CATEGORY_COUNT_P = (0.6, 0.3, 0.1)
CALIBRATION_REQUESTS = 20_000
USER_BLOCK = 65_536
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

IntArray = npt.NDArray[np.integer[Any]]
FloatArray = npt.NDArray[np.floating[Any]]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _to_ms(value: datetime) -> int:
    return round(_utc(value).timestamp() * 1000)


def _sigmoid(x: FloatArray) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-x))


def _format_ids(prefix: str, width: int, idx: IntArray) -> npt.NDArray[np.str_]:
    idx = np.asarray(idx)
    if idx.size and idx.min() < 0:
        raise ValueError(f"negative index for {prefix!r} ids")
    digits = np.char.zfill(idx.astype(np.int64).astype(str), width)
    return np.char.add(prefix, digits)


def _parse_ids(prefix: str, ids: Sequence[str], limit: int) -> npt.NDArray[np.int64]:
    out = np.empty(len(ids), dtype=np.int64)
    for n, value in enumerate(ids):
        if not value.startswith(prefix) or not value[len(prefix) :].isdigit():
            raise KeyError(f"not a simulated {prefix!r} id: {value!r}")
        out[n] = int(value[len(prefix) :])
        if out[n] >= limit:
            raise KeyError(f"unknown id {value!r}")
    return out


def _draw_categories(
    rng: np.random.Generator, n: int, category_share: FloatArray
) -> npt.NDArray[np.int32]:
    """One to three distinct categories per item, primary first, ``-1`` padded."""
    n_categories = len(category_share)
    cats = np.full((n, 3), -1, dtype=np.int32)
    cats[:, 0] = rng.choice(n_categories, size=n, p=category_share)
    counts = rng.choice(3, size=n, p=CATEGORY_COUNT_P) + 1
    counts = np.minimum(counts, n_categories)
    for slot in (1, 2):
        rows = np.flatnonzero(counts > slot)
        # Secondary categories are uniform: popularity skew is a property of the
        # primary category, which is what browsing and titles are about.
        draw = rng.integers(0, n_categories, size=rows.size).astype(np.int32)
        clash = (draw[:, None] == cats[rows, :slot]).any(axis=1)
        while clash.any():
            draw[clash] = rng.integers(0, n_categories, size=int(clash.sum()))
            clash = (draw[:, None] == cats[rows, :slot]).any(axis=1)
        cats[rows, slot] = draw
    return cats


def _item_vectors(
    rng: np.random.Generator, cats: npt.NDArray[np.int32], centroids: FloatArray
) -> npt.NDArray[np.float32]:
    dim = centroids.shape[1]
    vecs = centroids[cats[:, 0]].astype(np.float64)
    secondary = cats[:, 1:]
    n_secondary = (secondary >= 0).sum(axis=1)
    padded = np.vstack([centroids, np.zeros((1, dim))])  # index -1 -> zero row
    sec_sum = padded[secondary].sum(axis=1)
    vecs += 0.5 * sec_sum / np.maximum(n_secondary, 1)[:, None]
    vecs += rng.normal(0.0, 0.35 / np.sqrt(dim), size=vecs.shape)
    return vecs.astype(np.float32)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-for-byte reproducible.

    numpy stamps each member with the current time, which would make two runs with
    the same seed differ; fixed timestamps keep simulator outputs diffable. Members
    are stored uncompressed: random floats barely compress and deflate is slow.
    """
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(
                    member, np.ascontiguousarray(arrays[name]), allow_pickle=False
                )


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Latent preferences of a synthetic population; immutable, cheap to copy.

    Indices (``user_idx``, ``item_idx``) are row numbers in the arrays below; the
    string ids used in logs are derived from them (``u000123``, ``i00042``,
    ``c07``) so any log line can be mapped back to the truth without a lookup table.
    Times are epoch milliseconds (UTC) so they compare directly with log arithmetic.
    """

    user_vectors: npt.NDArray[np.float32]  # (n_users, dim)
    user_affinity: npt.NDArray[np.float32]  # (n_users, n_categories), rows sum to 1
    user_activity: npt.NDArray[np.float64]  # (n_users,), sampling weights, sums to 1
    item_vectors: npt.NDArray[np.float32]  # (n_items, dim)
    item_categories: npt.NDArray[np.int32]  # (n_items, 3), primary first, -1 padded
    item_bias: npt.NDArray[np.float32]  # (n_items,), logit added to every user
    item_popularity: npt.NDArray[np.float64]  # (n_items,), Zipf-like weights, sums to 1
    item_published_ms: npt.NDArray[np.int64]  # (n_items,)
    category_centroids: npt.NDArray[np.float32]  # (n_categories, dim), unit norm
    start: datetime
    end: datetime
    offset: float = 0.0
    position_eta: float = 1.0
    taste_scale: float = 4.0
    seed: int = 0
    user_id_width: int = 6
    item_id_width: int = 5
    category_id_width: int = 2
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Drifted copies share unchanged arrays with their parent; read-only arrays
        # make "the original stays untouched" a guarantee rather than a convention.
        for name in self.ARRAY_FIELDS:
            getattr(self, name).flags.writeable = False

    # ------------------------------------------------------------------ shape
    @property
    def n_users(self) -> int:
        return int(self.user_vectors.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_vectors.shape[0])

    @property
    def n_categories(self) -> int:
        return int(self.category_centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.user_vectors.shape[1])

    @property
    def start_ms(self) -> int:
        return _to_ms(self.start)

    @property
    def end_ms(self) -> int:
        return _to_ms(self.end)

    # -------------------------------------------------------------------- ids
    def format_user_ids(self, user_idx: IntArray) -> npt.NDArray[np.str_]:
        return _format_ids("u", self.user_id_width, user_idx)

    def format_item_ids(self, item_idx: IntArray) -> npt.NDArray[np.str_]:
        return _format_ids("i", self.item_id_width, item_idx)

    def format_category_ids(self, category_idx: IntArray) -> npt.NDArray[np.str_]:
        return _format_ids("c", self.category_id_width, category_idx)

    @cached_property
    def user_ids(self) -> list[str]:
        return self.format_user_ids(np.arange(self.n_users)).tolist()

    @cached_property
    def item_ids(self) -> list[str]:
        return self.format_item_ids(np.arange(self.n_items)).tolist()

    @cached_property
    def category_ids(self) -> list[str]:
        return self.format_category_ids(np.arange(self.n_categories)).tolist()

    def user_index(self, user_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        """Map log ids back to rows; raises ``KeyError`` for ids this world never made."""
        return _parse_ids("u", user_ids, self.n_users)

    def item_index(self, item_ids: Sequence[str]) -> npt.NDArray[np.int64]:
        return _parse_ids("i", item_ids, self.n_items)

    # ---------------------------------------------------------------- catalog
    @cached_property
    def publish_order(self) -> npt.NDArray[np.int64]:
        """Items sorted by publish time, so "published by t" is a prefix of this order."""
        return np.argsort(self.item_published_ms, kind="stable")

    def published_count(self, at_ms: IntArray | int) -> npt.NDArray[np.int64]:
        """How many items exist at each time: the first n of :attr:`publish_order`."""
        sorted_ms = self.item_published_ms[self.publish_order]
        return np.searchsorted(sorted_ms, np.asarray(at_ms), side="right").astype(np.int64)

    # ------------------------------------------------------------- behaviour
    def sample_users(self, rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
        """Draw users in proportion to their activity (heavy users appear more often)."""
        cum = np.cumsum(self.user_activity)
        idx = np.searchsorted(cum, rng.random(n) * cum[-1], side="right")
        return np.minimum(idx, self.n_users - 1).astype(np.int64)

    def examination(self, position: IntArray) -> npt.NDArray[np.float64]:
        """Probability that a user looks at a 0-based slot at all (position bias)."""
        pos = np.asarray(position, dtype=np.float64)
        return (1.0 / np.log2(pos + 2.0)) ** self.position_eta

    def logits(self, user_idx: IntArray, item_idx: IntArray) -> npt.NDArray[np.float64]:
        """``u . v + item_bias + offset``; broadcasts like numpy indexing does."""
        u = self.user_vectors[np.asarray(user_idx)]
        v = self.item_vectors[np.asarray(item_idx)]
        dot = np.einsum("...d,...d->...", u, v, dtype=np.float64)
        return dot + self.item_bias[np.asarray(item_idx)] + self.offset

    def relevance(self, user_idx: IntArray, item_idx: IntArray) -> npt.NDArray[np.float64]:
        """Probability of a click if the item is examined: what a perfect model ranks by."""
        return _sigmoid(self.logits(user_idx, item_idx))

    def click_probability(
        self, user_idx: IntArray, item_idx: IntArray, position: IntArray
    ) -> npt.NDArray[np.float64]:
        """``examination(position) * relevance(user, item)``, elementwise."""
        return self.examination(position) * self.relevance(user_idx, item_idx)

    def relevance_matrix(self, user_idx: IntArray) -> npt.NDArray[np.float64]:
        """Relevance of every item for some users, shape ``(len(user_idx), n_items)``.

        Meant for oracle rankings and offline evaluation on a few hundred users at a
        time; it is dense, so callers should batch large user sets.
        """
        u = self.user_vectors[np.asarray(user_idx)].astype(np.float64)
        scores = u @ self.item_vectors.T.astype(np.float64)
        return _sigmoid(scores + self.item_bias[None, :] + self.offset)

    # -------------------------------------------------------------- creation
    @classmethod
    def generate(
        cls,
        n_users: int,
        n_items: int,
        n_categories: int,
        seed: int,
        start: datetime,
        end: datetime,
        *,
        dim: int = DEFAULT_DIM,
        target_ctr: float = DEFAULT_TARGET_CTR,
        position_eta: float = 1.0,
        zipf_exponent: float = 1.0,
        activity_sigma: float = 1.0,
        affinity_concentration: float = 0.25,
        taste_scale: float = 4.0,
        bias_scale: float = 0.35,
    ) -> GroundTruth:
        """Draw a world from ``seed``; the same arguments always give the same world.

        ``target_ctr`` is met for the reference logging policy by solving for the
        global ``offset``, so sizes and skews can change without CTR drifting into
        unrealistic territory (real recommendation CTRs are a few percent).
        """
        if min(n_users, n_items, n_categories, dim) < 1:
            raise ValueError("n_users, n_items, n_categories and dim must be at least 1")
        if not 0.0 < target_ctr < 1.0:
            raise ValueError("target_ctr must be in (0, 1)")
        start, end = _utc(start), _utc(end)
        if end <= start:
            raise ValueError("end must be after start")
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7247]))

        centroids = rng.normal(size=(n_categories, dim))
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

        # Some categories are simply bigger than others.
        category_share = 1.0 / np.arange(1, n_categories + 1) ** 0.5
        category_share = rng.permutation(category_share / category_share.sum())
        cats = _draw_categories(rng, n_items, category_share)
        item_vectors = _item_vectors(rng, cats, centroids)

        rank = rng.permutation(n_items)
        popularity = 1.0 / (rank + 1.0) ** zipf_exponent
        popularity /= popularity.sum()
        log_pop = np.log(popularity)
        item_bias = (bias_scale * (log_pop - log_pop.mean())).astype(np.float32)

        start_ms, end_ms = _to_ms(start), _to_ms(end)
        n_old = max(min(n_items, 20), round(PREEXISTING_SHARE * n_items))
        published = np.empty(n_items, dtype=np.int64)
        old = rng.permutation(n_items)[:n_old]
        is_new = np.ones(n_items, dtype=bool)
        is_new[old] = False
        backlog_ms = int(BACKLOG.total_seconds() * 1000)
        published[~is_new] = start_ms - 1 - rng.integers(0, backlog_ms, size=n_old)
        published[is_new] = rng.integers(start_ms, end_ms, size=int(is_new.sum()))

        # Blockwise, so a million users never need float64 (users x categories) arrays.
        affinity = np.empty((n_users, n_categories), dtype=np.float32)
        user_vectors = np.empty((n_users, dim), dtype=np.float32)
        alpha = np.full(n_categories, affinity_concentration)
        for lo in range(0, n_users, USER_BLOCK):
            hi = min(lo + USER_BLOCK, n_users)
            block = rng.dirichlet(alpha, size=hi - lo)
            noise = rng.normal(0.0, 0.3 / np.sqrt(dim), size=(hi - lo, dim))
            affinity[lo:hi] = block
            user_vectors[lo:hi] = taste_scale * block @ centroids + noise
        activity = rng.lognormal(0.0, activity_sigma, size=n_users)
        activity /= activity.sum()

        truth = cls(
            user_vectors=user_vectors,
            user_affinity=affinity,
            user_activity=activity,
            item_vectors=item_vectors,
            item_categories=cats,
            item_bias=item_bias,
            item_popularity=popularity,
            item_published_ms=published,
            category_centroids=centroids.astype(np.float32),
            start=start,
            end=end,
            offset=0.0,
            position_eta=position_eta,
            taste_scale=taste_scale,
            seed=seed,
            user_id_width=max(6, len(str(n_users - 1))),
            item_id_width=max(5, len(str(n_items - 1))),
            category_id_width=max(2, len(str(n_categories - 1))),
            meta={
                "target_ctr": target_ctr,
                "zipf_exponent": zipf_exponent,
                "activity_sigma": activity_sigma,
                "affinity_concentration": affinity_concentration,
                "bias_scale": bias_scale,
            },
        )
        offset = truth._calibrate_offset(np.random.default_rng([seed, 0xCA1]), target_ctr)
        return dataclasses.replace(truth, offset=offset)

    def _calibrate_offset(self, rng: np.random.Generator, target_ctr: float) -> float:
        """Solve ``mean P(click) == target_ctr`` for the offset under the logging policy."""
        from recsys_assets.simulation.policy import logging_slates

        users = self.sample_users(rng, CALIBRATION_REQUESTS)
        at = rng.integers(self.start_ms, self.end_ms, size=CALIBRATION_REQUESTS)
        slates = logging_slates(self, rng, at)
        req, pos = np.nonzero(slates >= 0)
        items = slates[req, pos]
        base = self.logits(users[req], items) - self.offset
        exam = self.examination(pos)
        lo, hi = -30.0, 30.0
        for _ in range(60):  # CTR is monotone in the offset, so bisection is exact enough
            mid = (lo + hi) / 2.0
            if float(np.mean(exam * _sigmoid(base + mid))) < target_ctr:
                lo = mid
            else:
                hi = mid
        return round((lo + hi) / 2.0, 6)

    def drifted(
        self,
        strength: float,
        seed: int,
        *,
        new_items: int = 0,
        published_at: datetime | None = None,
    ) -> GroundTruth:
        """The same world some time later: tastes moved, maybe new items arrived.

        Each user's category affinity is blended toward a per-user random
        re-assignment of categories, ``(1 - strength) * old + strength * shuffled``,
        so ``strength=0`` changes nothing and ``strength=1`` makes a user love
        categories unrelated to their history, which is exactly what a model trained
        on old logs cannot anticipate. Users keep their idiosyncratic noise.

        ``new_items`` are appended (existing indices and ids stay valid) and are
        published at ``published_at`` (default: the end of this world's period),
        with popularity borrowed from random existing items. Offset and position
        bias are unchanged: the world changed, not the way people look at a page.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError("strength must be in [0, 1]")
        if new_items < 0:
            raise ValueError("new_items must be >= 0")
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD71F]))
        centroids = self.category_centroids.astype(np.float64)
        new_aff = np.empty_like(self.user_affinity)
        user_vectors = np.empty_like(self.user_vectors)
        categories = np.arange(self.n_categories, dtype=np.int32)
        for lo in range(0, self.n_users, USER_BLOCK):
            hi = min(lo + USER_BLOCK, self.n_users)
            old = self.user_affinity[lo:hi].astype(np.float64)
            perms = rng.permuted(np.tile(categories, (hi - lo, 1)), axis=1)
            moved = (1.0 - strength) * old + strength * np.take_along_axis(old, perms, axis=1)
            new_aff[lo:hi] = moved
            user_vectors[lo:hi] = (
                self.user_vectors[lo:hi] + self.taste_scale * (moved - old) @ centroids
            )

        changes: dict[str, Any] = {
            "user_vectors": user_vectors,
            "user_affinity": new_aff,
            "meta": {
                **self.meta,
                "drift": [*self.meta.get("drift", []), {"strength": strength, "seed": seed}],
            },
        }
        if new_items:
            primary = self.item_categories[:, 0]
            share = np.bincount(primary, minlength=self.n_categories).astype(np.float64) + 1.0
            cats = _draw_categories(rng, new_items, share / share.sum())
            vecs = _item_vectors(rng, cats, centroids)
            template = rng.integers(0, self.n_items, size=new_items)
            popularity = np.concatenate([self.item_popularity, self.item_popularity[template]])
            when = _to_ms(published_at) if published_at is not None else self.end_ms
            changes |= {
                "item_vectors": np.vstack([self.item_vectors, vecs]),
                "item_categories": np.vstack([self.item_categories, cats]),
                "item_bias": np.concatenate([self.item_bias, self.item_bias[template]]),
                "item_popularity": popularity / popularity.sum(),
                "item_published_ms": np.concatenate(
                    [self.item_published_ms, np.full(new_items, when, dtype=np.int64)]
                ),
            }
        # replace() goes through __init__, so cached ids and publish order are rebuilt.
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------- persistence
    # Everything save() puts in the .npz; the scalars go to the .json.
    ARRAY_FIELDS: ClassVar[tuple[str, ...]] = (
        "user_vectors",
        "user_affinity",
        "user_activity",
        "item_vectors",
        "item_categories",
        "item_bias",
        "item_popularity",
        "item_published_ms",
        "category_centroids",
    )

    def save(self, path: Path | str) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (arrays) and ``<path>.json`` (scalars); reproducible bytes."""
        npz_path, json_path = _paths(path)
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        _write_npz(npz_path, {name: getattr(self, name) for name in self.ARRAY_FIELDS})
        doc = {
            "format": FORMAT_VERSION,
            "start": self.start.isoformat().replace("+00:00", "Z"),
            "end": self.end.isoformat().replace("+00:00", "Z"),
            "offset": self.offset,
            "position_eta": self.position_eta,
            "taste_scale": self.taste_scale,
            "seed": self.seed,
            "user_id_width": self.user_id_width,
            "item_id_width": self.item_id_width,
            "category_id_width": self.category_id_width,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_categories": self.n_categories,
            "dim": self.dim,
            "meta": self.meta,
        }
        json_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return npz_path, json_path

    @classmethod
    def load(cls, path: Path | str) -> GroundTruth:
        npz_path, json_path = _paths(path)
        doc = json.loads(json_path.read_text())
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(f"{json_path}: unsupported ground-truth format {doc.get('format')}")
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in cls.ARRAY_FIELDS}
        return cls(
            **arrays,
            start=datetime.fromisoformat(doc["start"].replace("Z", "+00:00")),
            end=datetime.fromisoformat(doc["end"].replace("Z", "+00:00")),
            offset=float(doc["offset"]),
            position_eta=float(doc["position_eta"]),
            taste_scale=float(doc["taste_scale"]),
            seed=int(doc["seed"]),
            user_id_width=int(doc["user_id_width"]),
            item_id_width=int(doc["item_id_width"]),
            category_id_width=int(doc["category_id_width"]),
            meta=doc.get("meta", {}),
        )


def _paths(path: Path | str) -> tuple[Path, Path]:
    base = Path(path)
    if base.suffix in (".npz", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


__all__ = ["GroundTruth"]
