"""Which model serves whom, per worker: polling, background loading, hot swap, phase-in.

Each worker runs one :class:`ModelManager`. A background thread polls the model
source (the registry's ``production`` and ``candidate`` aliases, or a pinned
``RECSYS_MODEL_URI``) every ``model_poll_seconds``. A version it has not loaded is
fetched into ``model_cache_dir`` (the registry verifies every checksum; the fetch is
shared safely by the workers of a host), loaded, and warmed with a few requests, all
off the request path. Only then is the new :class:`ServingState` published with one
reference assignment: a request reads the state once when it starts and finishes on
the models it found there, so a swap never fails or mixes a request.

A bundle that cannot be fetched, verified, loaded or warmed is refused: an error
log, ``recsys_model_load_failures_total{reason}``, and the models already loaded keep
serving. A refused version is retried only after a back-off (``invalid_bundle``: 5
minutes, other reasons: 30 s) so a bad promotion does not flood the logs.

Phase-in: a user goes to the candidate when the stable hash of their id, mapped to
[0, 1), is below the candidate's ``share``; the same user therefore always sees the
same model while the share stays the same, and raising the share only moves users
from champion to challenger, never back.

The previous production model stays in memory, so a rollback (``recsys models
rollback``) or a promotion of the loaded candidate is an instant swap at the next
poll, with no download or load.

Last good model: a worker that cannot load ``production`` and has nothing loaded yet
(a restart, a new replica) serves the newest previous production version it can load
(the source's history) instead of answering 503: ``served_by: last_good``,
``recsys_model_stand_in`` and the ``/readyz`` body say so, and production is retried
as usual. A forced reload (``reload(force=True)``) is broadcast through the source (the
registry, which every worker polls) so that every worker retries at its next poll.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from recsys_serving.layout import CANDIDATE, PRODUCTION
from recsys_serving.logging import get_logger
from recsys_serving.settings import Settings

log = get_logger(__name__)

RETRY_INVALID_SECONDS = 300.0
RETRY_OTHER_SECONDS = 30.0
MAX_STAND_IN_TRIES = 5  # previous productions tried when production cannot be loaded
_WARM_USERS = ("__warmup-0__", "__warmup-1__", "__warmup-2__")
RANKER_CACHE = ".compiled"


def user_bucket(user_id: str) -> float:
    """A stable position of ``user_id`` in [0, 1) (the same in every worker and run)."""
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True, slots=True)
class Target:
    """What an alias asks for: ``ref`` is what the source materializes."""

    ref: str
    version: str | None  # None when only loading tells (a pinned oci:// reference)
    share: float = 1.0
    # The first-model rule: registered, but answers with its popular items until a model
    # beats popularity (the alias's evidence says ``answers: popularity``).
    popularity_only: bool = False


class ModelSource(Protocol):
    name: str
    pinned: bool

    def targets(self) -> dict[str, Target]:
        """``{alias: Target}`` for the aliases set now (may raise if unreachable)."""

    def materialize(self, target: Target) -> Path:
        """A verified local bundle directory for ``target``."""

    def previous(self, alias: str) -> list[Target]:
        """Earlier targets of ``alias``, newest first (stand-ins when it cannot be loaded)."""

    def reload_token(self) -> str | None:
        """Changes whenever someone asks every worker to reload (None: never asked)."""

    def request_reload(self, reason: str) -> str:
        """Ask every worker following this source to retry refused versions."""


class RegistrySource:
    """Follows the registry's aliases; fetches into the model cache."""

    pinned = False

    def __init__(self, registry: Any, cache_dir: Path) -> None:
        self.registry = registry
        self.cache_dir = cache_dir
        self.name = f"registry {registry.lake.uri}"

    def targets(self) -> dict[str, Target]:
        from recsys_serving.registry import serves_popularity

        found: dict[str, Target] = {}
        for alias in (PRODUCTION, CANDIDATE):
            state = self.registry.alias(alias)
            if state is not None and state.version:
                found[alias] = Target(
                    state.version, state.version, float(state.share), serves_popularity(state)
                )
        return found

    def materialize(self, target: Target) -> Path:
        return Path(self.registry.fetch(target.ref, self.cache_dir))

    def previous(self, alias: str) -> list[Target]:
        found: list[str] = []
        state = self.registry.alias(alias)
        if state is not None:
            found += [v for v in state.previous_versions if v]
        found += [e.version for e in self.registry.history(20, alias=alias) if e.version]
        return [Target(v, v, 1.0) for v in dict.fromkeys(found)]

    def reload_token(self) -> str | None:
        return self.registry.reload_token()

    def request_reload(self, reason: str) -> str:
        return self.registry.request_reload(reason)


class PinnedSource:
    """Serves one fixed bundle: ``oci://...@sha256:...`` or a local bundle directory."""

    pinned = True

    def __init__(self, uri: str, cache_dir: Path, settings: Settings) -> None:
        self.uri = uri
        self.cache_dir = cache_dir
        self.settings = settings
        self.name = f"pinned {uri}"

    def targets(self) -> dict[str, Target]:
        return {PRODUCTION: Target(self.uri, None, 1.0)}

    def materialize(self, target: Target) -> Path:
        from recsys_serving.oci import RegistryAccess, is_oci_reference, pull_bundle

        if is_oci_reference(target.ref):
            return pull_bundle(
                target.ref,
                self.cache_dir,
                insecure=self.settings.packaging.oci_insecure,
                access=RegistryAccess.from_settings(self.settings),
            )
        path = Path(target.ref).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"RECSYS_MODEL_URI {target.ref}: no bundle directory there")
        return path

    def previous(self, alias: str) -> list[Target]:
        return []  # one pinned bundle, no history

    @property
    def _reload_file(self) -> Path:
        return self.cache_dir / ".reload"

    def reload_token(self) -> str | None:
        # The workers of a host share the model cache: the channel for a pinned model.
        try:
            return self._reload_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def request_reload(self, reason: str) -> str:
        token = uuid.uuid4().hex
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".reload.{token}"
        tmp.write_text(token)
        os.replace(tmp, self._reload_file)
        return token


@dataclass(frozen=True, slots=True)
class LoadedModel:
    alias: str
    ref: str
    version: str
    model: Any  # a Recommender
    index: Any  # the CandidateIndex requests pass to it (None: the bundle's embedded index)
    share: float
    loaded_at: float
    popularity_only: bool = False
    # Set when this model serves in place of the alias's own version, which could not
    # be loaded (the last good production model): that version.
    stands_in_for: str | None = None


@dataclass(frozen=True, slots=True)
class ServingState:
    """Immutable: what requests starting now are served by."""

    production: LoadedModel | None = None
    candidate: LoadedModel | None = None

    @property
    def ready(self) -> bool:
        return self.production is not None

    @property
    def candidate_share(self) -> float:
        return self.candidate.share if self.candidate is not None else 0.0

    def route(self, user_id: str) -> tuple[LoadedModel, str] | None:
        """``(model, served_by)`` for this user, or None when no model is loaded."""
        cand = self.candidate
        if cand is not None and (cand.share >= 1.0 or user_bucket(user_id) < cand.share):
            return cand, "challenger"
        if self.production is not None:
            standing_in = self.production.stands_in_for is not None
            return self.production, "last_good" if standing_in else "champion"
        return None

    def stand_ins(self) -> dict[str, dict[str, str]]:
        """``{alias: {"version": served, "instead_of": wanted}}`` for models standing in."""
        found = {}
        for alias, loaded in ((PRODUCTION, self.production), (CANDIDATE, self.candidate)):
            if loaded is not None and loaded.stands_in_for is not None:
                found[alias] = {"version": loaded.version, "instead_of": loaded.stands_in_for}
        return found

    def versions(self) -> dict[str, str]:
        found = {}
        if self.production is not None:
            found[PRODUCTION] = self.production.version
        if self.candidate is not None:
            found[CANDIDATE] = self.candidate.version
        return found


class ModelRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _Refusal:
    reason: str
    error: str
    at: float
    retry_after: float


@dataclass
class PollReport:
    changed: bool = False
    loaded: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    error: str | None = None


class ModelManager:
    """Keeps this worker's :class:`ServingState` in step with the model source."""

    def __init__(
        self,
        settings: Settings,
        source: ModelSource,
        loader: Callable[[Path], Any],
        on_change: Callable[[ServingState], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        index_opener: Callable[[Any], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.loader = loader
        self.on_change = on_change
        self.on_refused = on_refused
        self.index_opener = index_opener
        # Compiled rankers, shared by the workers of a host (and kept across restarts).
        self.ranker_cache_dir = settings.resolved_model_cache_dir / RANKER_CACHE
        # Called with the reason when a model's ranker cannot be compiled (a metric).
        self.on_ranker_fallback: Callable[[str], None] | None = None
        self._state = ServingState()
        self._previous: LoadedModel | None = None  # last production, kept for rollback
        self._refused: dict[str, _Refusal] = {}
        self._poll_lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_poll_at: float | None = None
        self.last_poll_error: str | None = None
        self.polls = 0
        self._reload_token: str | None = None
        self._reload_seen = False

    @property
    def state(self) -> ServingState:
        return self._state

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # the loop must survive anything a poll does
                log.error("models.poll_crashed", error=repr(exc))
            self._wake.wait(self.settings.serving.model_poll_seconds)
            self._wake.clear()

    # ------------------------------------------------------------------ polling
    def poll_once(self, force: bool = False) -> PollReport:
        """Bring the state in line with the source; ``force`` retries refused versions."""
        with self._poll_lock:
            report = PollReport()
            self.polls += 1
            self.last_poll_at = time.time()
            try:
                targets = self.source.targets()
            except Exception as exc:
                self.last_poll_error = f"{type(exc).__name__}: {exc}"
                report.error = self.last_poll_error
                log.error("models.source_unreachable", source=self.source.name, error=str(exc))
                return report
            self.last_poll_error = None
            if self._reload_asked():
                force = True
            if force:
                self._refused.clear()
            old = self._state
            production = self._resolve(PRODUCTION, targets.get(PRODUCTION), old, report)
            if production is None and old.production is not None:
                # Production unset in the source (never expected): keep serving what we have.
                log.warning("models.production_alias_missing", keeping=old.production.version)
                production = old.production
            candidate = self._resolve(CANDIDATE, targets.get(CANDIDATE), old, report)
            new = ServingState(production, candidate)
            if new != old:
                if (
                    old.production is not None
                    and production is not None
                    and old.production.version != production.version
                ):
                    self._previous = old.production
                self._state = new
                report.changed = True
                log.info(
                    "models.swapped",
                    production=production.version if production else None,
                    candidate=candidate.version if candidate else None,
                    share=new.candidate_share,
                )
            if report.changed or self.polls == 1:
                self._notify(new)
            return report

    def reload(self, force: bool = False, reason: str = "forced reload") -> PollReport:
        """Poll now; ``force`` retries refused versions here and, through the source, in
        every other worker at its next poll."""
        # One step under the poll lock, so this worker's own poll does the reload (and
        # reports it) rather than its background poll seeing the broadcast first.
        with self._poll_lock:
            if force:
                try:
                    token = self.source.request_reload(reason)
                except Exception as exc:  # this worker still reloads; the others may not
                    log.error("models.reload_broadcast_failed", error=repr(exc))
                else:
                    self._reload_token, self._reload_seen = token, True
            return self.poll_once(force)

    def _reload_asked(self) -> bool:
        """True once per forced reload asked of all workers since the last poll."""
        try:
            token = self.source.reload_token()
        except Exception as exc:
            log.warning("models.reload_token_unreadable", error=repr(exc))
            return False
        asked = self._reload_seen and token != self._reload_token
        self._reload_token, self._reload_seen = token, True
        if asked:
            log.info("models.reload_requested", token=token)
        return asked

    def _notify(self, state: ServingState) -> None:
        if self.on_change is not None:
            try:
                self.on_change(state)
            except Exception as exc:
                log.error("models.publish_failed", error=repr(exc))

    def _known(self, ref: str, old: ServingState) -> LoadedModel | None:
        for loaded in (old.production, old.candidate, self._previous):
            if loaded is not None and loaded.ref == ref:
                return loaded
        return None

    def _resolve(
        self, alias: str, target: Target | None, old: ServingState, report: PollReport
    ) -> LoadedModel | None:
        current = old.production if alias == PRODUCTION else old.candidate
        if target is None:
            return None
        known = self._known(target.ref, old)
        if known is not None:
            wanted = (alias, target.share, target.popularity_only, None)
            if (known.alias, known.share, known.popularity_only, known.stands_in_for) == wanted:
                return known
            return replace(
                known,
                alias=alias,
                share=target.share,
                popularity_only=target.popularity_only,
                stands_in_for=None,
            )
        # What to serve if the target cannot be loaded: production keeps its model; a
        # candidate that was moved away from is not served any more.
        fallback = current if alias == PRODUCTION else None
        refusal = self._refused.get(target.ref)
        if refusal is not None and time.monotonic() < refusal.retry_after:
            if alias == PRODUCTION and fallback is None:
                return self._stand_in(target, report)
            return fallback
        try:
            loaded = self._load(alias, target)
        except ModelRefused as exc:
            retry = RETRY_INVALID_SECONDS if exc.reason == "invalid_bundle" else RETRY_OTHER_SECONDS
            self._refused[target.ref] = _Refusal(
                exc.reason, str(exc), time.time(), time.monotonic() + retry
            )
            report.refused[target.ref] = f"{exc.reason}: {exc}"
            log.error(
                "models.refused",
                alias=alias,
                ref=target.ref,
                reason=exc.reason,
                error=str(exc),
                keeping=fallback.version if fallback else None,
            )
            if self.on_refused is not None:
                self.on_refused(exc.reason)
            if alias == PRODUCTION and fallback is None:
                return self._stand_in(target, report)
            if fallback is not None and fallback.stands_in_for is not None:
                return replace(fallback, stands_in_for=target.version or target.ref)
            return fallback
        self._refused.pop(target.ref, None)
        report.loaded.append(loaded.version)
        return loaded

    def _stand_in(self, wanted: Target, report: PollReport) -> LoadedModel | None:
        """The newest previous production version that loads, serving in place of
        ``wanted``, which could not be loaded and nothing else is loaded: a restart after
        a bad promotion serves the last good model instead of 503s."""
        try:
            earlier = [t for t in self.source.previous(PRODUCTION) if t.ref != wanted.ref]
        except Exception as exc:
            log.error("models.no_history", error=repr(exc))
            return None
        for target in earlier[:MAX_STAND_IN_TRIES]:
            refusal = self._refused.get(target.ref)
            if refusal is not None and time.monotonic() < refusal.retry_after:
                continue
            try:
                loaded = self._load(PRODUCTION, target)
            except ModelRefused as exc:
                retry = (
                    RETRY_INVALID_SECONDS if exc.reason == "invalid_bundle" else RETRY_OTHER_SECONDS
                )
                self._refused[target.ref] = _Refusal(
                    exc.reason, str(exc), time.time(), time.monotonic() + retry
                )
                report.refused[target.ref] = f"{exc.reason}: {exc}"
                continue
            self._refused.pop(target.ref, None)
            report.loaded.append(loaded.version)
            log.warning(
                "models.serving_last_good",
                version=loaded.version,
                instead_of=wanted.version or wanted.ref,
            )
            return replace(loaded, stands_in_for=wanted.version or wanted.ref)
        return None

    def _load(self, alias: str, target: Target) -> LoadedModel:
        from recsys_serving.model.bundle import BundleError

        started = time.perf_counter()
        try:
            path = self.source.materialize(target)
        except BundleError as exc:
            raise ModelRefused("invalid_bundle", str(exc)) from exc
        except Exception as exc:
            raise ModelRefused("fetch_failed", f"{type(exc).__name__}: {exc}") from exc
        try:
            model = self.loader(path)
        except BundleError as exc:
            raise ModelRefused("invalid_bundle", str(exc)) from exc
        except Exception as exc:
            raise ModelRefused("load_error", f"{type(exc).__name__}: {exc}") from exc
        version = str(getattr(model, "version", "") or "")
        if target.version is not None and version != target.version:
            raise ModelRefused(
                "version_mismatch",
                f"{path}: the bundle says version {version!r}, the registry {target.version!r}",
            )
        self._compile_ranker(model, version)
        try:
            warm(model)
        except Exception as exc:
            raise ModelRefused("warmup_failed", f"{type(exc).__name__}: {exc}") from exc
        index = None
        if self.index_opener is not None:
            try:
                index = self.index_opener(model)
            except Exception as exc:
                raise ModelRefused("index_unavailable", f"{type(exc).__name__}: {exc}") from exc
        log.info(
            "models.loaded",
            alias=alias,
            version=version,
            path=str(path),
            seconds=round(time.perf_counter() - started, 3),
        )
        return LoadedModel(
            alias,
            target.ref,
            version,
            model,
            index,
            target.share,
            time.time(),
            target.popularity_only,
        )

    def _compile_ranker(self, model: Any, version: str) -> None:
        """Native ranking for this model (``model/ranker.py``), before it takes traffic.
        Not a reason to refuse the model: on failure it ranks with LightGBM, with a
        warning and ``recsys_ranker_compile_failures_total{reason}``."""
        if not self.settings.serving.ranker_compile or not hasattr(model, "compile_ranker"):
            return
        from recsys_serving.model.ranker import RankerCompileError

        started = time.perf_counter()
        try:
            compiled = model.compile_ranker(self.ranker_cache_dir)
        except Exception as exc:
            reason = exc.reason if isinstance(exc, RankerCompileError) else "compile_error"
            log.warning(
                "models.ranker_not_compiled",
                version=version,
                reason=reason,
                error=f"{type(exc).__name__}: {exc}",
                ranking="lightgbm",
            )
            if self.on_ranker_fallback is not None:
                self.on_ranker_fallback(reason)
            return
        log.info(
            "models.ranker_compiled",
            version=version,
            cached=compiled.cached,
            seconds=round(time.perf_counter() - started, 3),
        )

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        state = self._state

        def describe(m: LoadedModel | None) -> dict[str, Any] | None:
            if m is None:
                return None
            ranker = getattr(getattr(m.model, "ranker", None), "kind", None)
            found = {
                "version": m.version,
                "share": m.share,
                "loaded_at": m.loaded_at,
                "ranker": ranker,
                "answers": "popularity" if m.popularity_only else "model",
            }
            if m.stands_in_for is not None:
                found["stands_in_for"] = m.stands_in_for
            return found

        return {
            "source": self.source.name,
            "pinned": self.source.pinned,
            "ready": state.ready,
            "production": describe(state.production),
            "candidate": describe(state.candidate),
            "previous": self._previous.version if self._previous else None,
            "refused": {
                ref: {"reason": r.reason, "error": r.error, "at": r.at}
                for ref, r in self._refused.items()
            },
            "last_poll_at": self.last_poll_at,
            "last_poll_error": self.last_poll_error,
            "poll_seconds": self.settings.serving.model_poll_seconds,
        }


def warm(model: Any) -> None:
    """A few real requests before a model takes traffic (first-call costs, sanity)."""
    popular = model.popular(10)
    for user in _WARM_USERS:
        model.recommend(user, 10)
    if popular:
        with contextlib.suppress(KeyError):
            model.similar(popular[0].item_id, 10)
