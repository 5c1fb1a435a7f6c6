"""Historic weblogs for a synthetic site: the data every demo and test starts from.

The output looks like what a log shipper would deliver (NDJSON part files that obey
the event contract, with a configurable sprinkle of bad lines) while the ground
truth that generated it is saved alongside, so pipelines can be checked against
answers real data never has.

Generation is vectorised per chunk of sessions and written incrementally, so memory
stays flat however many events are asked for: only the session schedule (a few
bytes per session) is held for the whole run.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import orjson
import polars as pl

from recsys_assets.simulation.policy import MODEL_VERSION, SLATE_SIZE, logging_slates
from recsys_assets.simulation.truth import GroundTruth
from recsys_serving.events.schema import EVENT_TYPES

ProgressCallback = Callable[[int, int], None]

# Event type codes are indices into the contract's EVENT_TYPES; STAGES is the causal
# order within one request, used to break timestamp ties (impression before click).
IMPRESSION, CLICK, VIEW, ADD_TO_CART, PURCHASE, RATING = (
    EVENT_TYPES.index(name)
    for name in ("impression", "click", "view", "add_to_cart", "purchase", "rating")
)
STAGES = (IMPRESSION, CLICK, VIEW, ADD_TO_CART, PURCHASE, RATING)

CHUNK_EVENTS = 100_000
EVENTS_PER_FILE = 2_000_000
# Recommendation requests per session: 1..5, mostly short visits.
REQUESTS_P = np.array([0.35, 0.25, 0.18, 0.12, 0.10])
# Sessions that never send a session id (cookie-less clients); downstream
# sessionization has to rebuild them from user and time gaps.
NO_SESSION_ID_SHARE = 0.10
# Lines whose ts is written as epoch seconds instead of RFC 3339; both are legal.
EPOCH_TS_SHARE = 0.05
# Funnel after a click; add-to-cart and purchase rise with true relevance so
# conversion signals carry preference information, not just noise.
P_VIEW = 0.9
P_CART_BASE, P_CART_REL = 0.08, 0.35
P_BUY_BASE, P_BUY_REL = 0.25, 0.35
P_RATE_AFTER_BUY = 0.4
P_RATE_AFTER_VIEW = 0.03
# Time a request's page stays in focus, and the pause before the next request (ms).
DWELL_MIN_MS, DWELL_MEAN_MS, DWELL_MAX_MS = 20_000, 60_000, 600_000
GAP_MEAN_MS = 20_000
PILOT_SESSIONS = 4_000
CORRUPT_KINDS = ("truncated", "unknown_event_type", "missing_user_id", "wrong_type", "duplicate")
_BAD_EVENT_TYPES = ("hover", "scroll", "Click", "page_view", "impresion")

COUNTRIES = ("US", "DE", "GB", "FR", "IN", "BR", "JP", "NL", "ES", "CA")
COUNTRY_P = np.array([0.3, 0.12, 0.1, 0.08, 0.1, 0.08, 0.07, 0.05, 0.05, 0.05])
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_P = np.array([0.6, 0.33, 0.07])
_ADJECTIVES = (
    "Classic", "Compact", "Deluxe", "Eco", "Essential", "Modern", "Portable", "Pro",
    "Quiet", "Rugged", "Slim", "Smart", "Solid", "Ultra", "Vintage", "Wireless",
)  # fmt: skip
_NOUNS = (
    "Backpack", "Blender", "Camera", "Chair", "Desk Lamp", "Headphones", "Jacket",
    "Kettle", "Keyboard", "Mug", "Notebook", "Novel", "Sneakers", "Speaker", "Tent",
    "Watch", "Board Game", "Cookbook", "Drone", "Yoga Mat",
)  # fmt: skip
_BRANDS = (
    "Acme", "Bolt", "Cobalt", "Driftwood", "Ember", "Fjord", "Granite", "Halcyon",
    "Ionic", "Juniper", "Kestrel", "Lumen", "Maple", "Nimbus", "Orbit", "Pioneer",
    "Quartz", "Ridge", "Sable", "Tundra",
)  # fmt: skip


@dataclass
class SimulationSummary:
    """What was written, for the CLI line, for tests and for demo scripts.

    ``counts`` covers intact lines only; ``n_events`` is every line in the part
    files, of which ``n_corrupt`` were replaced with bad input (``corrupt_kinds``
    says how; duplicates are contract-valid, so ``n_invalid`` excludes them).
    """

    out_dir: Path
    items_path: Path
    users_path: Path
    truth_path: Path
    weblog_paths: list[Path]
    n_users: int
    n_items: int
    n_categories: int
    days: float
    seed: int
    n_events: int
    n_corrupt: int
    corrupt_kinds: dict[str, int]
    counts: dict[str, int]
    n_sessions: int  # sessions simulated (the last ones may be cut off at n_events)
    n_requests: int
    ctr: float
    first_ts: datetime | None
    last_ts: datetime | None
    start: datetime
    end: datetime
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_invalid(self) -> int:
        """Lines a contract validator must reject (corrupt lines except duplicates)."""
        return self.n_corrupt - self.corrupt_kinds.get("duplicate", 0)

    def as_dict(self, relative: bool = False) -> dict[str, Any]:
        """JSON-ready; ``relative`` makes paths relative to ``out_dir`` (portable copies)."""

        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat().replace("+00:00", "Z")

        def path(value: Path) -> str:
            return str(value.relative_to(self.out_dir) if relative else value)

        return {
            "out_dir": "." if relative else str(self.out_dir),
            "items_path": path(self.items_path),
            "users_path": path(self.users_path),
            "truth_path": path(self.truth_path),
            "weblog_paths": [path(p) for p in self.weblog_paths],
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_categories": self.n_categories,
            "days": self.days,
            "seed": self.seed,
            "n_events": self.n_events,
            "n_corrupt": self.n_corrupt,
            "n_invalid": self.n_invalid,
            "corrupt_kinds": self.corrupt_kinds,
            "counts": self.counts,
            "n_sessions": self.n_sessions,
            "n_requests": self.n_requests,
            "ctr": self.ctr,
            "first_ts": iso(self.first_ts),
            "last_ts": iso(self.last_ts),
            "start": iso(self.start),
            "end": iso(self.end),
        }


def default_end() -> datetime:
    """Now, floored to the hour, so repeated runs within an hour agree."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


# --------------------------------------------------------------------------- events
@dataclass
class _Events:
    """Columnar events of one chunk; ``-1`` means absent for optional integer fields."""

    etype: npt.NDArray[np.int8]
    user: npt.NDArray[np.int64]
    item: npt.NDArray[np.int64]
    ts_ms: npt.NDArray[np.int64]
    session: npt.NDArray[np.int64]
    request: npt.NDArray[np.int64]
    position: npt.NDArray[np.int64]
    rating: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.etype.size)

    def take(self, idx: npt.NDArray[np.int64] | slice) -> _Events:
        return _Events(**{name: getattr(self, name)[idx] for name in _EVENT_FIELDS})


_EVENT_FIELDS = ("etype", "user", "item", "ts_ms", "session", "request", "position", "rating")


def _simulate_sessions(
    truth: GroundTruth,
    rng: np.random.Generator,
    start_ms: npt.NDArray[np.int64],
    users: npt.NDArray[np.int64],
    session_numbers: npt.NDArray[np.int64],
    request_base: int,
) -> tuple[_Events, int]:
    """All events of some sessions, sorted by time; returns them and the request count."""
    n_s = start_ms.size
    n_req = rng.choice(len(REQUESTS_P), size=n_s, p=REQUESTS_P) + 1
    has_sid = rng.random(n_s) >= NO_SESSION_ID_SHARE
    req_session = np.repeat(np.arange(n_s), n_req)
    n_r = int(req_session.size)

    dwell = DWELL_MIN_MS + rng.exponential(DWELL_MEAN_MS - DWELL_MIN_MS, size=n_r)
    dwell = np.minimum(dwell, DWELL_MAX_MS).astype(np.int64)
    gap = rng.exponential(GAP_MEAN_MS, size=n_r).astype(np.int64)
    step = dwell + gap
    before = np.cumsum(step) - step  # exclusive cumulative sum over all requests
    first_req = np.cumsum(n_req) - n_req
    t_req = start_ms[req_session] + before - before[first_req][req_session]
    window_end = t_req + dwell  # every follow-up of a request happens before this

    slates = logging_slates(truth, rng, t_req, k=SLATE_SIZE)
    imp_req, imp_pos = np.nonzero(slates >= 0)
    imp_item = slates[imp_req, imp_pos]
    imp_user = users[req_session[imp_req]]
    # Same as truth.click_probability, split because the funnel needs relevance too.
    relevance = truth.relevance(imp_user, imp_item)
    p_click = truth.examination(imp_pos) * relevance
    clicked = np.flatnonzero(rng.random(imp_req.size) < p_click)

    c_req = imp_req[clicked]
    c_rel = relevance[clicked]
    c_end = window_end[c_req]
    click_ts = t_req[c_req] + 1_000 + ((dwell[c_req] - 1_000) * 0.4 * rng.random(c_req.size))
    click_ts = click_ts.astype(np.int64)

    def after(
        prev: npt.NDArray[np.int64], end: npt.NDArray[np.int64], share: float
    ) -> npt.NDArray[np.int64]:
        # Strictly later than the previous funnel step, still inside the request window.
        span = np.maximum(end - prev - 1, 0)
        return prev + 1 + (span * share * rng.random(prev.size)).astype(np.int64)

    v = np.flatnonzero(rng.random(clicked.size) < P_VIEW)
    view_ts = after(click_ts[v], c_end[v], 0.2)
    a = np.flatnonzero(rng.random(v.size) < P_CART_BASE + P_CART_REL * c_rel[v])
    cart_ts = after(view_ts[a], c_end[v][a], 0.5)
    b = np.flatnonzero(rng.random(a.size) < P_BUY_BASE + P_BUY_REL * c_rel[v][a])
    buy_ts = after(cart_ts[b], c_end[v][a][b], 0.5)

    bought = np.zeros(v.size, dtype=bool)
    bought[a[b]] = True
    rate_p = np.where(bought, P_RATE_AFTER_BUY, P_RATE_AFTER_VIEW)
    r = np.flatnonzero(rng.random(v.size) < rate_p)
    prev_ts = view_ts.copy()
    prev_ts[a[b]] = buy_ts
    rate_ts = after(prev_ts[r], c_end[v][r], 0.5)
    noise = rng.normal(0.0, 0.8, size=r.size)
    stars = np.clip(np.rint(1.0 + 4.0 * c_rel[v][r] + noise), 1, 5).astype(np.int64)

    # Follow-up events of the click c (index into ``clicked``) per stage.
    follow = {VIEW: v, ADD_TO_CART: v[a], PURCHASE: v[a][b], RATING: v[r]}
    stage_ts = {VIEW: view_ts, ADD_TO_CART: cart_ts, PURCHASE: buy_ts, RATING: rate_ts}
    imp_of = {IMPRESSION: np.arange(imp_req.size), CLICK: clicked}
    imp_of |= {stage: clicked[idx] for stage, idx in follow.items()}
    ts_of = {IMPRESSION: t_req[imp_req], CLICK: click_ts, **stage_ts}

    imp = np.concatenate([imp_of[s] for s in STAGES])
    stage = np.repeat(np.arange(len(STAGES), dtype=np.int8), [imp_of[s].size for s in STAGES])
    etype = np.asarray(STAGES, dtype=np.int8)[stage]
    ts = np.concatenate([ts_of[s] for s in STAGES])
    req = imp_req[imp]
    sess = req_session[req]
    with_request = (etype == IMPRESSION) | (etype == CLICK)
    rating = np.full(imp.size, -1, dtype=np.int64)
    rating[etype == RATING] = stars

    events = _Events(
        etype=etype,
        user=imp_user[imp],
        item=imp_item[imp],
        ts_ms=ts,
        session=np.where(has_sid[sess], session_numbers[sess], -1),
        request=np.where(with_request, request_base + req, -1),
        position=np.where(with_request, imp_pos[imp], -1),
        rating=rating,
    )
    # Time first; the stage breaks ties so a click never precedes its impression,
    # and the stable sort keeps impressions of one slate in position order.
    order = np.lexsort((stage, ts))
    return events.take(order), n_r


def _session_schedule(
    rng: np.random.Generator, start_ms: int, end_ms: int, n: int
) -> npt.NDArray[np.int64]:
    """Sorted session start times following a daily (and weekly) traffic cycle.

    Stratified inverse-CDF sampling: sorted by construction, so the schedule can be
    consumed chunk by chunk in time order without sorting anything large.
    """
    step = 5 * 60 * 1000
    grid = np.arange(start_ms, end_ms + step, step, dtype=np.int64)
    grid[-1] = end_ms
    hours = (grid % 86_400_000) / 3_600_000
    weekday = ((grid // 86_400_000) + 3) % 7  # 1970-01-01 was a Thursday (3)
    intensity = (1.0 + 0.6 * np.cos(2 * np.pi * (hours - 20.0) / 24.0)) * np.where(
        weekday >= 5, 1.15, 1.0
    )
    mass = (intensity[1:] + intensity[:-1]) / 2 * np.diff(grid)
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    cdf /= cdf[-1]
    u = (np.arange(n) + rng.random(n)) / max(n, 1)
    return np.interp(u, cdf, grid.astype(np.float64)).astype(np.int64)


# ------------------------------------------------------------------------ formatting
def _id(prefix: str, col: str, width: int) -> pl.Expr:
    return pl.concat_str([pl.lit(prefix), pl.col(col).cast(pl.String).str.zfill(width)])


def _format_lines(
    events: _Events,
    first_number: int,
    epoch_ts: npt.NDArray[np.bool_],
    prices_cents: npt.NDArray[np.int64],
    widths: dict[str, int],
) -> pl.Series:
    """Contract-exact JSON lines, built column-wise in polars (no per-event Python)."""
    n = len(events)
    df = pl.DataFrame(
        {
            "n": np.arange(first_number, first_number + n, dtype=np.int64),
            "etype": events.etype,
            "user": events.user,
            "item": events.item,
            "ts": events.ts_ms,
            "epoch": epoch_ts,
            "session": events.session,
            "request": events.request,
            "position": events.position,
            "rating": events.rating,
            "cents": np.where(events.etype == PURCHASE, prices_cents[events.item], -1),
        }
    )
    etype_name = pl.col("etype").replace_strict(
        list(range(len(EVENT_TYPES))), list(EVENT_TYPES), return_dtype=pl.String
    )
    ts_rfc = pl.concat_str(
        [
            pl.lit('"'),
            pl.from_epoch(pl.col("ts"), time_unit="ms").dt.strftime("%Y-%m-%dT%H:%M:%S%.3fZ"),
            pl.lit('"'),
        ]
    )
    ts_epoch = pl.concat_str(
        [
            (pl.col("ts") // 1000).cast(pl.String),
            pl.lit("."),
            (pl.col("ts") % 1000).cast(pl.String).str.zfill(3),
        ]
    )
    price = pl.concat_str(
        [
            (pl.col("cents") // 100).cast(pl.String),
            pl.lit("."),
            (pl.col("cents") % 100).cast(pl.String).str.zfill(2),
        ]
    )
    line = pl.concat_str(
        [
            pl.lit('{"event_id":"'),
            _id("e", "n", widths["event"]),
            pl.lit('","event_type":"'),
            etype_name,
            pl.lit('","user_id":"'),
            _id("u", "user", widths["user"]),
            pl.lit('","item_id":"'),
            _id("i", "item", widths["item"]),
            pl.lit('","ts":'),
            pl.when(pl.col("epoch")).then(ts_epoch).otherwise(ts_rfc),
            pl.when(pl.col("session") >= 0).then(
                pl.concat_str([pl.lit(',"session_id":"'), _id("s", "session", 9), pl.lit('"')])
            ),
            pl.when(pl.col("request") >= 0).then(
                pl.concat_str([pl.lit(',"request_id":"'), _id("r", "request", 10), pl.lit('"')])
            ),
            pl.when(pl.col("position") >= 0).then(
                pl.concat_str([pl.lit(',"position":'), pl.col("position").cast(pl.String)])
            ),
            pl.when(pl.col("cents") >= 0).then(pl.concat_str([pl.lit(',"value":'), price])),
            pl.when(pl.col("rating") >= 0).then(
                pl.concat_str([pl.lit(',"value":'), pl.col("rating").cast(pl.String)])
            ),
            pl.when(pl.col("request") >= 0).then(pl.lit(f',"model_version":"{MODEL_VERSION}"')),
            pl.lit("}"),
        ],
        ignore_nulls=True,
    )
    return df.select(line.alias("line")).to_series()


def _corrupt_line(kind: str, line: str, rng: np.random.Generator) -> str:
    """Realistic damage: what broken shippers, schema drift and partial writes produce."""
    if kind == "truncated":
        return line[: int(rng.integers(1, len(line) - 1))]
    event = orjson.loads(line)
    if kind == "unknown_event_type":
        event["event_type"] = _BAD_EVENT_TYPES[int(rng.integers(len(_BAD_EVENT_TYPES)))]
    elif kind == "missing_user_id":
        del event["user_id"]
    elif kind == "wrong_type":
        options = ["user_id", "ts", "item_id"] + (["position"] if "position" in event else [])
        target = options[int(rng.integers(len(options)))]
        event[target] = {"user_id": True, "ts": "yesterday", "item_id": [event["item_id"]]}.get(
            target, "top"
        )
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return orjson.dumps(event).decode()


def _corrupt(
    lines: pl.Series, n_bad: int, rng: np.random.Generator, kinds: Counter[str]
) -> tuple[pl.Series, npt.NDArray[np.int64]]:
    """Replace ``n_bad`` random lines in place; returns the new lines and their indices."""
    if n_bad <= 0:
        return lines, np.empty(0, dtype=np.int64)
    where = np.sort(rng.choice(lines.len(), size=n_bad, replace=False)).astype(np.int64)
    bad = set(where.tolist())
    originals = lines.gather(where).to_list()
    replaced: list[str] = []
    for pos, line in zip(where.tolist(), originals, strict=True):
        kind = CORRUPT_KINDS[int(rng.integers(len(CORRUPT_KINDS)))]
        if kind == "duplicate":
            source = -1
            for _ in range(8):
                candidate = int(rng.integers(0, pos)) if pos > 0 else -1
                if candidate >= 0 and candidate not in bad:
                    source = candidate
                    break
            if source >= 0:
                replaced.append(lines[source])
                kinds[kind] += 1
                continue
            kind = "truncated"  # nothing earlier to duplicate
        replaced.append(_corrupt_line(kind, line, rng))
        kinds[kind] += 1
    return lines.scatter(where, replaced), where


class _PartWriter:
    """Spreads lines over ``part-NNNNN.ndjson`` files; each appears only when complete."""

    def __init__(self, directory: Path, per_file: int) -> None:
        self.directory = directory
        self.per_file = max(per_file, 1)
        self.paths: list[Path] = []
        self._fh: IO[bytes] | None = None
        self._in_file = 0

    def _open(self) -> IO[bytes]:
        path = self.directory / f"part-{len(self.paths):05d}.ndjson"
        self.paths.append(path)
        self._in_file = 0
        return path.with_name(path.name + ".tmp").open("wb")

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            path = self.paths[-1]
            path.with_name(path.name + ".tmp").replace(path)
            self._fh = None

    def write(self, lines: pl.Series) -> None:
        offset = 0
        while offset < lines.len():
            if self._fh is None or self._in_file >= self.per_file:
                self._close()
                self._fh = self._open()
            take = min(self.per_file - self._in_file, lines.len() - offset)
            # A one-column CSV without quoting is exactly one line per value, and
            # polars writes it straight from Arrow memory (no Python string copies).
            lines.slice(offset, take).to_frame().write_csv(
                self._fh, include_header=False, quote_style="never"
            )
            self._in_file += take
            offset += take

    def close(self) -> list[Path]:
        if self._fh is None and not self.paths:
            self._fh = self._open()  # an empty run still yields one (empty) part file
        self._close()
        return self.paths


# --------------------------------------------------------------------- catalogues
def _iso(ms: npt.NDArray[np.int64]) -> pl.Series:
    series = pl.Series(ms, dtype=pl.Int64)
    return pl.from_epoch(series, time_unit="ms").dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_items(truth: GroundTruth, rng: np.random.Generator, path: Path) -> npt.NDArray[np.int64]:
    """Write the catalogue; returns prices in cents (purchases log them as ``value``)."""
    n = truth.n_items
    primary = truth.item_categories[:, 0]
    # Price level is a property of the category, spread within it is lognormal.
    level = np.exp(rng.uniform(np.log(5.0), np.log(300.0), size=truth.n_categories))
    price = level[primary] * rng.lognormal(0.0, 0.4, size=n)
    cents = np.maximum(np.rint(price * 100).astype(np.int64) // 100 * 100 - 1, 99)
    brand_of_category = rng.integers(0, len(_BRANDS), size=(truth.n_categories, 3))
    brand = brand_of_category[primary, rng.integers(0, 3, size=n)]
    noun_of_category = rng.integers(0, len(_NOUNS), size=truth.n_categories)
    adjective = rng.integers(0, len(_ADJECTIVES), size=n)
    model = rng.integers(100, 1000, size=n)
    titles = [
        f"{_BRANDS[b]} {_ADJECTIVES[a]} {_NOUNS[noun_of_category[c]]} {m}"
        for b, a, c, m in zip(brand, adjective, primary, model, strict=True)
    ]
    cat_ids = np.asarray([*truth.category_ids, ""], dtype=object)
    categories = [[cat_ids[c] for c in row if c >= 0] for row in truth.item_categories.tolist()]
    frame = pl.DataFrame(
        {
            "item_id": truth.item_ids,
            "title": titles,
            "categories": categories,
            "published_at": _iso(truth.item_published_ms),
            "price": cents / 100.0,
            "brand": [_BRANDS[b] for b in brand],
        }
    )
    frame.write_ndjson(path)
    return cents


def _write_users(truth: GroundTruth, rng: np.random.Generator, path: Path) -> None:
    n = truth.n_users
    # Everyone signed up before the period, so no event precedes its user's signup.
    signup = truth.start_ms - 1 - rng.integers(0, 2 * 365 * 86_400_000, size=n)
    frame = pl.DataFrame(
        {
            "user_id": truth.user_ids,
            "country": np.asarray(COUNTRIES)[rng.choice(len(COUNTRIES), size=n, p=COUNTRY_P)],
            "device": np.asarray(DEVICES)[rng.choice(len(DEVICES), size=n, p=DEVICE_P)],
            "signup_at": _iso(signup),
        }
    )
    frame.write_ndjson(path)


# ---------------------------------------------------------------------------- main
def simulate_history(
    out_dir: Path,
    *,
    n_users: int,
    n_items: int,
    n_categories: int,
    days: float,
    n_events: int,
    seed: int,
    end: datetime | None = None,
    corrupt_fraction: float = 0.0,
    files: int | None = None,
    progress_cb: ProgressCallback | None = None,
    chunk_events: int = CHUNK_EVENTS,
) -> SimulationSummary:
    """Simulate ``days`` of traffic ending at ``end`` and write it under ``out_dir``.

    Exactly ``n_events`` lines are written (the final chunk is cut off, as a log
    export at time ``end`` would cut off sessions in flight). Output is a pure
    function of the arguments: same seed and ``end``, same bytes. Previous part
    files in ``out_dir/weblogs`` are removed so reruns never mix two worlds.
    ``progress_cb(written, n_events)`` is called after every chunk.
    """
    if min(n_users, n_items, n_categories) < 1:
        raise ValueError("users, items and categories must each be at least 1")
    if not days > 0:
        raise ValueError("days must be positive")
    if n_events < 0:
        raise ValueError("events must be >= 0")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError("corrupt fraction must be in [0, 1]")
    if files is not None and files < 1:
        raise ValueError("files must be >= 1")

    if end is None:
        end = default_end()
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)
    start = end - timedelta(days=days)
    out_dir = Path(out_dir)
    weblog_dir = out_dir / "weblogs"
    weblog_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*weblog_dir.glob("part-*.ndjson"), *weblog_dir.glob("part-*.ndjson.tmp")]:
        stale.unlink()

    truth = GroundTruth.generate(n_users, n_items, n_categories, seed, start, end)
    truth_path, _ = truth.save(out_dir / "truth")
    prices = _write_items(truth, np.random.default_rng([seed, 11]), out_dir / "items.ndjson")
    _write_users(truth, np.random.default_rng([seed, 12]), out_dir / "users.ndjson")

    start_ms, end_ms = truth.start_ms, truth.end_ms
    # Pilot: how many events a session yields in this world, to size the schedule
    # so that the n_events-th event lands close to ``end``.
    pilot_rng = np.random.default_rng([seed, 13])
    pilot_starts = np.sort(pilot_rng.integers(start_ms, end_ms, size=PILOT_SESSIONS))
    pilot, _ = _simulate_sessions(
        truth,
        pilot_rng,
        pilot_starts,
        truth.sample_users(pilot_rng, PILOT_SESSIONS),
        np.arange(PILOT_SESSIONS, dtype=np.int64),
        0,
    )
    pilot_kept = int((pilot.ts_ms <= end_ms).sum())
    per_session = max(pilot_kept / PILOT_SESSIONS, 1.0)
    n_sessions = max(1, round(n_events / per_session))
    schedule_rng = np.random.default_rng([seed, 14])
    session_start = _session_schedule(schedule_rng, start_ms, end_ms, n_sessions)
    session_user = truth.sample_users(schedule_rng, n_sessions)
    sessions_per_chunk = max(1, int(chunk_events / per_session))

    n_files = files if files is not None else max(1, math.ceil(n_events / EVENTS_PER_FILE))
    writer = _PartWriter(weblog_dir, math.ceil(n_events / n_files) if n_events else 1)
    widths = {
        "event": max(9, len(str(max(n_events - 1, 0)))),
        "user": truth.user_id_width,
        "item": truth.item_id_width,
    }
    written = corrupt_done = sessions_used = requests_used = 0
    counts: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    impressions = clicks = 0
    first_ts: int | None = None
    last_ts: int | None = None
    chunk = 0
    next_session = 0  # global session number of the next session to simulate
    topup_rng = np.random.default_rng([seed, 15])

    while written < n_events:
        if next_session < n_sessions:
            stop = min(next_session + sessions_per_chunk, n_sessions)
            starts = session_start[next_session:stop]
            users = session_user[next_session:stop]
        else:
            # The pilot's estimate fell a little short: add sessions in the last
            # stretch of the period until the count is met.
            remaining = n_events - written
            extra = math.ceil(remaining / per_session * 1.2) + 1
            span = max(600_000, int((end_ms - start_ms) * remaining / max(n_events, 1)))
            starts = np.sort(topup_rng.integers(max(start_ms, end_ms - span), end_ms, size=extra))
            users = truth.sample_users(topup_rng, extra)
            stop = next_session + extra
        rng = np.random.default_rng([seed, 16, chunk])
        numbers = np.arange(next_session, stop, dtype=np.int64)
        events, n_req = _simulate_sessions(truth, rng, starts, users, numbers, requests_used)
        next_session = stop
        requests_used += n_req
        chunk += 1

        events = events.take(np.flatnonzero(events.ts_ms <= end_ms))
        events = events.take(slice(0, n_events - written))
        if not len(events):
            continue
        sessions_used = next_session

        epoch_ts = rng.random(len(events)) < EPOCH_TS_SHARE
        lines = _format_lines(events, written, epoch_ts, prices, widths)
        n_bad = round(corrupt_fraction * (written + len(events))) - corrupt_done
        lines, bad_at = _corrupt(lines, n_bad, rng, kinds)
        corrupt_done += bad_at.size

        intact = np.ones(len(events), dtype=bool)
        intact[bad_at] = False
        type_counts = np.bincount(events.etype[intact], minlength=len(EVENT_TYPES))
        counts.update({name: int(c) for name, c in zip(EVENT_TYPES, type_counts, strict=True)})
        impressions += int((events.etype == IMPRESSION).sum())
        clicks += int((events.etype == CLICK).sum())
        lo, hi = int(events.ts_ms.min()), int(events.ts_ms.max())
        first_ts = lo if first_ts is None else min(first_ts, lo)
        last_ts = hi if last_ts is None else max(last_ts, hi)

        writer.write(lines)
        written += len(events)
        if progress_cb is not None:
            progress_cb(written, n_events)

    paths = writer.close()

    def dt(ms: int | None) -> datetime | None:
        return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)

    summary = SimulationSummary(
        out_dir=out_dir,
        items_path=out_dir / "items.ndjson",
        users_path=out_dir / "users.ndjson",
        truth_path=truth_path,
        weblog_paths=paths,
        n_users=n_users,
        n_items=n_items,
        n_categories=n_categories,
        days=days,
        seed=seed,
        n_events=written,
        n_corrupt=corrupt_done,
        corrupt_kinds={kind: kinds.get(kind, 0) for kind in CORRUPT_KINDS},
        counts={name: counts.get(name, 0) for name in EVENT_TYPES},
        n_sessions=sessions_used,
        n_requests=requests_used,
        ctr=clicks / impressions if impressions else 0.0,
        first_ts=dt(first_ts),
        last_ts=dt(last_ts),
        start=start,
        end=end,
    )
    (out_dir / "simulation.json").write_bytes(
        orjson.dumps(
            summary.as_dict(relative=True), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
    )
    return summary


__all__ = ["SimulationSummary", "default_end", "simulate_history"]
