"""Live traffic: simulated users asking the running service for recommendations.

Each simulated request is a real HTTP round trip: ``GET /recommendations/{user}``,
then clicks decided by the ground truth saved by ``recsys simulate``
(``examination(position) * relevance(user, item)``, so position bias applies to
whatever order the model chose), then ``POST /events`` with the clicks (carrying the
response's ``request_id``, ``position`` and ``model_version`` so the monitor can join
them to the impressions the server logged) and the downstream funnel (view,
add-to-cart, purchase) that later retrainings learn from.

At ``drift_at`` the world changes: user tastes rotate to other categories
(:meth:`GroundTruth.drifted`, optionally with new items) and, with ``trend_shift``,
yesterday's hits fade while other items become hits (:func:`shift_trends`: the
popularity every user shares is reassigned). A model trained on old logs goes stale
and online CTR drops, which is what the closed loop must notice and repair.

Users also find items *outside* the recommendations (search, category pages): per
request a user views on average ``browse`` items (Poisson) drawn from their current
preferences (and may add them to the cart and buy them). Those events carry no
``request_id``, so they never count in the recommendations' CTR, but they are in the
weblogs like any other, which is how a retraining can learn what changed even about
items the stale model never shows.

Because the truth is known, every request also records what the served slate was
*worth* (its expected clicks under the current truth) and what the best possible
slate would have been worth (the oracle), so the demo can tell model quality from
click noise and measure how much of a recovery is the model's doing.

Load is open-loop at ``rps`` with at most ``concurrency`` requests in flight; a slow
server lowers the achieved rate instead of piling up requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx
import numpy as np
import orjson
import polars as pl

from recsys_assets.simulation.history import (
    P_BUY_BASE,
    P_BUY_REL,
    P_CART_BASE,
    P_CART_REL,
    P_VIEW,
    _write_items,
)
from recsys_assets.simulation.truth import GroundTruth
from recsys_serving.logging import get_logger

log = get_logger(__name__)

# Organic discovery is drawn with probability relevance ** BROWSE_SHARPNESS.
BROWSE_SHARPNESS = 4.0

LineCallback = Callable[[str], None]
DriftCallback = Callable[[GroundTruth, Path | None], None]


@dataclass(frozen=True)
class LiveConfig:
    base_url: str
    users: int
    rps: float
    duration: float
    api_key: str | None = None
    k: int = 10
    drift_at: float | None = None
    drift_strength: float = 0.8
    drift_new_items: int = 0
    trend_shift: float = 0.0
    browse: float = 0.0
    seed: int = 0
    concurrency: int = 16
    interval: float = 5.0
    flush_seconds: float = 1.0
    batch_events: int = 1000
    timeout: float = 10.0
    downstream: bool = True
    timeline_path: Path | None = None

    def __post_init__(self) -> None:
        if self.users < 1 or self.rps <= 0 or self.duration <= 0:
            raise ValueError("users, rps and duration must be positive")
        if self.drift_at is not None and not 0 <= self.drift_at <= self.duration:
            raise ValueError("drift_at must lie within the run (0 <= drift_at <= duration)")
        if not 0.0 <= self.drift_strength <= 1.0:
            raise ValueError("drift_strength must be in [0, 1]")
        if not 0.0 <= self.trend_shift <= 1.0:
            raise ValueError("trend_shift must be in [0, 1]")
        if not 0.0 <= self.browse <= 10.0:
            raise ValueError("browse (organic views per request) must be in [0, 10]")
        if not 1 <= self.k <= 100:
            raise ValueError("k must be in 1..100")
        if self.concurrency < 1 or self.interval <= 0:
            raise ValueError("concurrency and interval must be positive")


@dataclass
class _VersionStats:
    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    expected_clicks: float = 0.0  # sum of click probabilities of the served slates
    oracle_clicks: float = 0.0  # the same for the best slate the truth allows

    def add(self, other: _VersionStats) -> None:
        self.requests += other.requests
        self.impressions += other.impressions
        self.clicks += other.clicks
        self.expected_clicks += other.expected_clicks
        self.oracle_clicks += other.oracle_clicks

    def as_dict(self) -> dict[str, Any]:
        n = self.impressions
        return {
            "requests": self.requests,
            "impressions": n,
            "clicks": self.clicks,
            "ctr": round(self.clicks / n, 6) if n else None,
            "expected_ctr": round(self.expected_clicks / n, 6) if n else None,
            "oracle_ctr": round(self.oracle_clicks / n, 6) if n else None,
        }


@dataclass
class _Interval:
    by_version: dict[str, _VersionStats] = field(default_factory=lambda: defaultdict(_VersionStats))
    served_by: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(v.requests for v in self.by_version.values())

    def total(self) -> _VersionStats:
        total = _VersionStats()
        for stats in self.by_version.values():
            total.add(stats)
        return total


@dataclass
class LiveSummary:
    requests: int
    errors: int
    elapsed: float
    impressions: int
    clicks: int
    events_posted: int
    events_rejected: int
    events_unsent: int
    event_failures: dict[str, int]
    organic_views: int
    drifted_at: float | None
    before: dict[str, Any]
    after: dict[str, Any]
    by_version: dict[str, dict[str, Any]]
    served_by: dict[str, int]
    timeline_path: Path | None

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.impressions if self.impressions else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "elapsed": round(self.elapsed, 2),
            "rps": round(self.rps, 2),
            "impressions": self.impressions,
            "clicks": self.clicks,
            "ctr": None if self.ctr is None else round(self.ctr, 6),
            "events_posted": self.events_posted,
            "events_rejected": self.events_rejected,
            "events_unsent": self.events_unsent,
            "event_failures": self.event_failures,
            "organic_views": self.organic_views,
            "drifted_at": self.drifted_at,
            "before_drift": self.before,
            "after_drift": self.after,
            "by_version": self.by_version,
            "served_by": self.served_by,
            "timeline": None if self.timeline_path is None else str(self.timeline_path),
        }

    def describe(self) -> str:
        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2%}"

        text = (
            f"live: {self.requests:,} requests in {self.elapsed:.0f}s ({self.rps:.1f} rps), "
            f"{self.errors} errors, {self.impressions:,} impressions, {self.clicks:,} clicks, "
            f"CTR {pct(self.ctr)}"
        )
        if self.drifted_at is not None:
            text += (
                f" (before drift {pct(self.before.get('ctr'))}, after {pct(self.after.get('ctr'))})"
            )
        return text


def shift_trends(truth: GroundTruth, strength: float, seed: int) -> GroundTruth:
    """Yesterday's hits fade and other items become hits.

    An item's bias (the part of its appeal every user shares, which the simulator
    derives from popularity) is blended toward the bias of a randomly chosen other
    item, ``(1 - strength) * own + strength * other``; popularity follows the same
    reassignment. Tastes, position bias and the catalogue stay as they are.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError("strength must be in [0, 1]")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E4D]))
    other = rng.permutation(truth.n_items)
    bias = (1.0 - strength) * truth.item_bias + strength * truth.item_bias[other]
    popularity = (1.0 - strength) * truth.item_popularity + strength * truth.item_popularity[other]
    meta = {**truth.meta, "trend_shift": [*truth.meta.get("trend_shift", []), strength]}
    return dataclasses.replace(
        truth,
        item_bias=bias.astype(truth.item_bias.dtype),
        item_popularity=popularity / popularity.sum(),
        meta=meta,
    )


def new_items_catalog(truth: GroundTruth, first_new: int, path: Path, seed: int) -> Path:
    """Write catalog documents (``recsys catalog load`` shape) for items ``first_new..``."""
    with tempfile.TemporaryDirectory() as tmp:
        everything = Path(tmp) / "items.ndjson"
        _write_items(truth, np.random.default_rng([seed, 0x17E5]), everything)
        frame = pl.read_ndjson(everything).slice(first_new)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_ndjson(path)
    return path


class LiveSimulator:
    """Plays ``config.users`` users against a running server; see the module docstring."""

    def __init__(
        self,
        truth: GroundTruth,
        config: LiveConfig,
        *,
        on_line: LineCallback | None = None,
        on_drift: DriftCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.truth = truth
        self.config = config
        self.on_line = on_line
        self.on_drift = on_drift
        self.should_stop = should_stop
        self.transport = transport
        self.rng = np.random.default_rng([config.seed, 0x11FE])
        n = min(config.users, truth.n_users)
        self.user_idx = self.rng.choice(truth.n_users, size=n, replace=False, p=truth.user_activity)
        self.run_id = uuid.uuid4().hex[:8]
        self._seq = 0
        self._pending: list[bytes] = []
        self._interval = _Interval()
        self._phases: dict[str, _Interval] = {"before": _Interval(), "after": _Interval()}
        self._totals = _Interval()
        self._drifted_at: float | None = None
        self._posted = 0
        self._rejected = 0
        self._event_failures: Counter[str] = Counter()
        self._organic = 0
        self._last_report = 0.0
        self._timeline: IO[bytes] | None = None
        self._start = 0.0
        self._oracle_cache: dict[int, float] = {}

    # ------------------------------------------------------------------ world
    def _elapsed(self) -> float:
        return time.monotonic() - self._start

    def _drift(self) -> None:
        cfg = self.config
        first_new = self.truth.n_items
        self.truth = self.truth.drifted(
            cfg.drift_strength,
            seed=cfg.seed,
            new_items=cfg.drift_new_items,
            published_at=datetime.now(UTC),
        )
        if cfg.trend_shift:
            self.truth = shift_trends(self.truth, cfg.trend_shift, seed=cfg.seed)
        self._drifted_at = self._elapsed()
        self._oracle_cache.clear()
        items_path = None
        if cfg.drift_new_items and cfg.timeline_path is not None:
            items_path = new_items_catalog(
                self.truth,
                first_new,
                cfg.timeline_path.with_name(cfg.timeline_path.stem + ".new-items.ndjson"),
                cfg.seed,
            )
        record = {
            "type": "drift",
            "t": round(self._drifted_at, 3),
            "ts": time.time(),
            "strength": cfg.drift_strength,
            "trend_shift": cfg.trend_shift,
            "new_items": cfg.drift_new_items,
            "items_path": None if items_path is None else str(items_path),
        }
        self._write(record)
        self._say(
            f"t={self._drifted_at:5.0f}s  DRIFT: user tastes moved (strength "
            f"{cfg.drift_strength:g}), trends shifted ({cfg.trend_shift:g}), "
            f"{cfg.drift_new_items} new items"
        )
        log.info("live.drift", **record)
        if self.on_drift is not None:
            self.on_drift(self.truth, items_path)

    def _oracle(self, user: int, k: int) -> float:
        """Expected clicks of the best slate of ``k`` published items for ``user``."""
        cached = self._oracle_cache.get(user * 1000 + k)
        if cached is not None:
            return cached
        published = self.truth.publish_order[: self.truth.published_count(_now_ms())]
        rel = self.truth.relevance(np.full(published.size, user), published)
        top = np.sort(rel)[::-1][:k]
        value = float(np.sum(self.truth.examination(np.arange(top.size)) * top))
        self._oracle_cache[user * 1000 + k] = value
        return value

    # ------------------------------------------------------------------ output
    def _say(self, line: str) -> None:
        if self.on_line is not None:
            self.on_line(line)

    def _write(self, record: dict[str, Any]) -> None:
        if self._timeline is not None:
            self._timeline.write(orjson.dumps(record) + b"\n")
            self._timeline.flush()

    def _report(self) -> None:
        interval, self._interval = self._interval, _Interval()
        t = self._elapsed()
        seconds = max(t - self._last_report, 1e-6)  # the last interval may be short
        self._last_report = t
        total = interval.total()
        errors = sum(interval.errors.values())
        answered = sum(interval.served_by.values())
        lat = np.asarray(interval.latencies_ms) if interval.latencies_ms else None
        record = {
            "type": "interval",
            "t": round(t, 3),
            "ts": time.time(),
            "seconds": round(seconds, 3),
            "drifted": self._drifted_at is not None,
            "requests": interval.requests,
            "errors": dict(interval.errors),
            "rps": round((interval.requests + errors) / seconds, 3),
            "served_by": dict(interval.served_by),
            "latency_ms": None
            if lat is None
            else {
                "p50": round(float(np.percentile(lat, 50)), 2),
                "p95": round(float(np.percentile(lat, 95)), 2),
                "p99": round(float(np.percentile(lat, 99)), 2),
            },
            "all": total.as_dict(),
            "by_version": {v: s.as_dict() for v, s in sorted(interval.by_version.items())},
        }
        self._write(record)
        parts = [
            f"{_short(v)} {s['ctr']:.1%} ({s['impressions']})"
            for v, s in record["by_version"].items()
            if s["ctr"] is not None
        ]
        shares = " ".join(
            f"{name} {n / answered:.0%}" for name, n in sorted(interval.served_by.items())
        )
        self._say(
            f"t={t:5.0f}s  {record['rps']:5.1f} rps  CTR "
            + (", ".join(parts) or "-")
            + (f"  | served_by {shares}" if shares else "")
            + (f"  | errors {dict(interval.errors)}" if errors else "")
        )

    # ---------------------------------------------------------------- traffic
    def _event(self, kind: str, user: str, item: str, **extra: Any) -> bytes:
        self._seq += 1
        body = {
            "event_id": f"live-{self.run_id}-{self._seq}",
            "event_type": kind,
            "user_id": user,
            "item_id": item,
            "ts": round(time.time(), 3),
            **{k: v for k, v in extra.items() if v is not None},
        }
        return orjson.dumps(body)

    def _record(self, user: int, answer: dict[str, Any], latency_ms: float) -> None:
        """Decide clicks for one answer and queue the resulting events."""
        truth = self.truth
        items = [str(it["item_id"]) for it in answer.get("items", [])]
        version = str(answer.get("model_version") or "unknown")
        served_by = str(answer.get("served_by") or "unknown")
        request_id = answer.get("request_id")
        known = np.zeros(len(items), dtype=bool)
        idx = np.zeros(len(items), dtype=np.int64)
        for n, item in enumerate(items):
            try:
                idx[n] = truth.item_index([item])[0]
                known[n] = True
            except KeyError:
                pass  # an item this world never made cannot be clicked
        positions = np.arange(len(items))
        relevance = np.where(known, truth.relevance(np.full(len(items), user), idx), 0.0)
        p_click = truth.examination(positions) * relevance
        clicked = np.flatnonzero(self.rng.random(len(items)) < p_click)

        stats = _VersionStats(
            requests=1,
            impressions=len(items),
            clicks=int(clicked.size),
            expected_clicks=float(p_click.sum()),
            oracle_clicks=self._oracle(user, len(items)) if items else 0.0,
        )
        for bucket in (self._interval, self._totals, self._phase()):
            bucket.by_version[version].add(stats)
            bucket.served_by[served_by] += 1
        self._interval.latencies_ms.append(latency_ms)

        user_id = truth.user_ids[user]
        for pos in clicked.tolist():
            item = items[pos]
            self._pending.append(
                self._event(
                    "click",
                    user_id,
                    item,
                    request_id=request_id,
                    position=pos,
                    model_version=version,
                )
            )
            if self.config.downstream and self.rng.random() < P_VIEW:
                self._viewed(user_id, item, float(relevance[pos]))
        if self.config.browse:
            for _ in range(int(self.rng.poisson(self.config.browse))):
                self._browse(user)

    def _viewed(self, user_id: str, item: str, relevance: float) -> None:
        """A product page view and what may follow it (the history's funnel)."""
        self._pending.append(self._event("view", user_id, item))
        if self.rng.random() < P_CART_BASE + P_CART_REL * relevance:
            self._pending.append(self._event("add_to_cart", user_id, item))
            if self.rng.random() < P_BUY_BASE + P_BUY_REL * relevance:
                self._pending.append(self._event("purchase", user_id, item))

    def _browse(self, user: int) -> None:
        """The user finds an item outside the recommendations (search, category pages).

        Drawn among published items with probability ``relevance ** BROWSE_SHARPNESS``:
        people mostly end up on things they like, sometimes not.
        """
        truth = self.truth
        published = truth.publish_order[: truth.published_count(_now_ms())]
        if published.size == 0:
            return
        relevance = truth.relevance(np.full(published.size, user), published)
        weights = relevance**BROWSE_SHARPNESS
        pick = int(self.rng.choice(published.size, p=weights / weights.sum()))
        self._organic += 1
        self._viewed(
            truth.user_ids[user], truth.item_ids[int(published[pick])], float(relevance[pick])
        )

    def _phase(self) -> _Interval:
        return self._phases["after" if self._drifted_at is not None else "before"]

    async def _one_request(self, client: httpx.AsyncClient, slots: asyncio.Semaphore) -> None:
        try:
            user = int(self.rng.choice(self.user_idx))
            user_id = self.truth.user_ids[user]
            started = time.perf_counter()
            try:
                resp = await client.get(
                    f"/recommendations/{quote(user_id, safe='')}", params={"k": self.config.k}
                )
            except httpx.HTTPError as exc:
                self._error(type(exc).__name__)
                return
            latency = (time.perf_counter() - started) * 1000
            if resp.status_code != 200:
                self._error(str(resp.status_code))
                return
            try:
                answer = resp.json()
            except ValueError:
                self._error("bad_json")
                return
            self._record(user, answer, latency)
        finally:
            slots.release()

    def _error(self, kind: str) -> None:
        for bucket in (self._interval, self._totals, self._phase()):
            bucket.errors[kind] += 1

    async def _flush(self, client: httpx.AsyncClient) -> None:
        """Post queued events in batches; on failure keep them for the next flush."""
        while self._pending:
            batch = self._pending[: self.config.batch_events]
            if not await self._post(client, batch):
                return
            del self._pending[: len(batch)]

    async def _post(self, client: httpx.AsyncClient, batch: list[bytes]) -> bool:
        try:
            resp = await client.post(
                "/events",
                content=b"\n".join(batch),
                headers={"Content-Type": "application/x-ndjson"},
            )
        except httpx.HTTPError as exc:
            # Retried at the next flush; an event that did land is then refused as a
            # duplicate, so a retry never counts a click twice.
            self._event_failures[type(exc).__name__] += 1
            return False
        if resp.status_code in (202, 422):
            body = resp.json()
            self._posted += int(body.get("accepted", 0))
            self._rejected += int(body.get("rejected", 0))
            if body.get("rejected"):
                log.warning("live.events_rejected", reasons=body.get("reasons"))
            return True
        self._event_failures[str(resp.status_code)] += 1
        if resp.status_code in (429, 502, 503, 504):
            return False
        self._rejected += len(batch)
        log.error("live.events_refused", status=resp.status_code, body=resp.text[:500])
        return True

    async def _flusher(self, client: httpx.AsyncClient, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=self.config.flush_seconds)
            await self._flush(client)

    async def _reporter(self, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=self.config.interval)
            if not done.is_set():
                self._report()

    async def run(self) -> LiveSummary:
        cfg = self.config
        headers = {"X-API-Key": cfg.api_key} if cfg.api_key else {}
        limits = httpx.Limits(max_connections=cfg.concurrency + 2)
        if cfg.timeline_path is not None:
            cfg.timeline_path.parent.mkdir(parents=True, exist_ok=True)
            self._timeline = open(cfg.timeline_path, "wb")  # noqa: SIM115 (closed below)
        self._start = time.monotonic()
        self._write(
            {
                "type": "start",
                "t": 0.0,
                "ts": time.time(),
                "run_id": self.run_id,
                "url": cfg.base_url,
                "users": int(self.user_idx.size),
                "rps": cfg.rps,
                "duration": cfg.duration,
                "drift_at": cfg.drift_at,
                "drift_strength": cfg.drift_strength,
                "trend_shift": cfg.trend_shift,
                "browse": cfg.browse,
                "k": cfg.k,
            }
        )
        done = asyncio.Event()
        slots = asyncio.Semaphore(cfg.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        try:
            async with httpx.AsyncClient(
                base_url=cfg.base_url.rstrip("/"),
                headers=headers,
                timeout=cfg.timeout,
                limits=limits,
                transport=self.transport,
            ) as client:
                flusher = asyncio.create_task(self._flusher(client, done))
                reporter = asyncio.create_task(self._reporter(done))
                step = 1.0 / cfg.rps
                next_at = self._start
                while (now := time.monotonic()) < self._start + cfg.duration:
                    if self.should_stop is not None and self.should_stop():
                        break
                    due = cfg.drift_at is not None and now - self._start >= cfg.drift_at
                    if due and self._drifted_at is None:
                        self._drift()
                    if now < next_at:
                        await asyncio.sleep(min(next_at - now, 0.25))
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(self._one_request(client, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    next_at += step
                    # After a stall, resume the rate instead of bursting to catch up.
                    next_at = max(next_at, time.monotonic() - 1.0)
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                self._report()
                done.set()
                await asyncio.gather(flusher, reporter)
                for attempt in range(3):  # the last events, with a couple of retries
                    await self._flush(client)
                    if not self._pending:
                        break
                    await asyncio.sleep(0.5 * (attempt + 1))
        finally:
            done.set()
            elapsed = self._elapsed()
            summary = self._summary(elapsed)
            self._write(
                {"type": "end", "t": round(elapsed, 3), "ts": time.time(), **summary.as_dict()}
            )
            if self._timeline is not None:
                self._timeline.close()
        return summary

    def _summary(self, elapsed: float) -> LiveSummary:
        totals = self._totals.total()

        def phase(name: str) -> dict[str, Any]:
            return self._phases[name].total().as_dict()

        return LiveSummary(
            requests=self._totals.requests,
            errors=sum(self._totals.errors.values()),
            elapsed=elapsed,
            impressions=totals.impressions,
            clicks=totals.clicks,
            events_posted=self._posted,
            events_rejected=self._rejected,
            events_unsent=len(self._pending),
            event_failures=dict(self._event_failures),
            organic_views=self._organic,
            drifted_at=self._drifted_at,
            before=phase("before"),
            after=phase("after"),
            by_version={v: s.as_dict() for v, s in sorted(self._totals.by_version.items())},
            served_by=dict(self._totals.served_by),
            timeline_path=self.config.timeline_path,
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short(version: str) -> str:
    """Versions are long (``v20260302120000-1a2b3c4d``); the live line needs the tail."""
    return version if len(version) <= 14 else f"...{version[-8:]}"


def read_timeline(path: Path) -> list[dict[str, Any]]:
    """The records a run wrote (start, intervals, drift, end), for reports and tests."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def run_live(
    truth: GroundTruth,
    config: LiveConfig,
    *,
    on_line: LineCallback | None = None,
    on_drift: DriftCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> LiveSummary:
    """Synchronous entry point for the CLI and the demo (``should_stop`` ends it early)."""
    simulator = LiveSimulator(
        truth, config, on_line=on_line, on_drift=on_drift, should_stop=should_stop
    )
    return asyncio.run(simulator.run())
