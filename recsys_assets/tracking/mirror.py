"""Training runs and the model registry, mirrored into MLflow.

The lake registry (:mod:`recsys_serving.registry`) is what serving reads: its alias moves
are compare-and-set and leave an immutable audit trail, which MLflow's registry does not
offer, so it stays the source of truth. MLflow is where people compare runs and browse
versions, so this module copies into it:

* every retraining as a run of the ``recsys-training`` experiment: parameters, the
  evaluation figures (time holdout and per-user holdout, the first-model rule), figures of
  each training step, code sha, data version and partitions, the bundle's manifest and a
  link to the bundle in the lake (``lake_uri``; the bundle itself stays in the lake);
* every registered version as a version of the ``recsys`` registered model (its source is
  the run's ``bundle/`` artifacts), the aliases (``production``, ``candidate``) where the
  lake says they point, and each alias move (promotions, canaries, rollbacks) as a
  registered-model tag ``move.<alias>.<time>``.

The registry side is a reconciliation, not a replay: :meth:`MlflowMirror.sync` compares
the lake with MLflow and creates or moves what differs, so a second call does nothing and
whatever happened while MLflow was unreachable is caught up by the next call (the next
retraining or alias move, or ``recsys models sync-mlflow``). Callers go through
:func:`record_retraining` and :func:`mirror_registry`, which never raise: MLflow being down
must not fail a retraining or an alias move. A failure is logged and written to
``tracking/mlflow.json`` in the lake until a sync succeeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_serving.lake import Lake
from recsys_serving.layout import CANDIDATE, MLFLOW_STATUS_KEY, PRODUCTION
from recsys_serving.logging import get_logger
from recsys_serving.registry import ModelRegistry, ModelVersion

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = get_logger(__name__)

EXPERIMENT = "recsys-training"
MODEL_NAME = "recsys"
OFF = "off"  # RECSYS_MLFLOW_TRACKING_URI=off: no mirror at all
VERSION_TAG = "recsys.version"
BUNDLE_DIR = "bundle"
MOVES_PER_SYNC = 20  # alias moves caught up per alias and call (sync-mlflow asks for more)
VERSIONS_PER_SYNC = 20  # versions created per call (sync-mlflow: all)
LOCK_TIMEOUT_SECONDS = 20.0  # a sensor tick must finish well within Dagster's 60 s
_TAG_MAX = 5000
_PARAM_MAX = 6000
_BATCH = 100

# A mirror call must not hold a retraining or a sensor tick for minutes: MLflow's own
# defaults retry a refused connection 7 times with exponential backoff (minutes) and wait
# 120 s for an answer. Its "View run at" lines and INFO logs would land in the CLI's
# output (the run id is in our structured log). An operator's own values win.
_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not "Creating initial MLflow database tables..."
}


def clean_key(name: str) -> str:
    """A metric, param or tag key MLflow accepts (``ndcg@10`` -> ``ndcg_at_10``)."""
    return re.sub(r"[^\w./\- ]", "_", name.replace("@", "_at_"))[:250]


def _text(value: Any, limit: int = _TAG_MAX) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested dicts as ``prefix/key/subkey`` leaves (MLflow groups charts by prefix)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}/{key}" if prefix else str(key), sub))
        return out
    return {prefix: value}


def numeric(prefix: str, value: Any) -> dict[str, float]:
    """The finite numbers among ``flatten(prefix, value)``, with MLflow-safe keys."""
    return {
        clean_key(k): n for k, v in flatten(prefix, value).items() if (n := _number(v)) is not None
    }


def data_version(manifest: Mapping[str, Any]) -> str:
    """One short hash of the training data's content hashes: equal data, equal version."""
    hashes = (manifest.get("data") or {}).get("content_hashes") or {}
    raw = json.dumps(hashes, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def _partitions_text(partitions: Any) -> str:
    if isinstance(partitions, list) and partitions:
        items = sorted(str(p) for p in partitions)
        return f"{items[0]}..{items[-1]} ({len(items)})"
    return _text(partitions, _PARAM_MAX)


@dataclass
class RunRecord:
    """Everything one MLflow run says about a training run (built from plain dicts)."""

    version: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)  # key -> value per step
    tags: dict[str, str] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)  # artifact path -> dict | str


def training_record(
    manifest: Mapping[str, Any],
    *,
    lake_uri: str,
    evaluation: Mapping[str, Any] | None = None,
    registration_tags: Mapping[str, str] | None = None,
    dagster_run_id: str | None = None,
    step_seconds: Mapping[str, float] | None = None,
    registered_as: str | None = None,
) -> RunRecord:
    """The MLflow view of one training run: the bundle manifest (params, data, the
    holdout metrics of the bundle, each step's figures) and, when the retraining itself
    records it, the evaluation (time holdout and per-user holdout against popularity and
    production, the decision and the first-model rule). A run backfilled later from the
    registry only has the manifest and the registration tags."""
    version = str(manifest["version"])
    data = manifest.get("data") or {}
    window = manifest.get("window") or {}
    ranking = manifest.get("ranking") or {}
    params: dict[str, str] = {
        clean_key(f"train.{k}"): _text(v, _PARAM_MAX)
        for k, v in (manifest.get("params") or {}).items()
    }
    params.update(
        {
            "seed": str(manifest.get("seed")),
            "window.start": str(window.get("start")),
            "window.end": str(window.get("end")),
            "data.partitions": _partitions_text(data.get("partitions")),
            "data.version": data_version(manifest),
            "index_version": str(manifest.get("index_version")),
            "ranking.mode": str(ranking.get("mode")),
            "features": str(len(manifest.get("feature_names") or [])),
        }
    )
    metrics: dict[str, float] = {}
    bundle_metrics = manifest.get("metrics") or {}
    metrics.update(
        numeric("bundle", {k: v for k, v in bundle_metrics.items() if not isinstance(v, dict)})
    )
    metrics.update(numeric("bundle/popularity", bundle_metrics.get("popularity") or {}))
    metrics.update(numeric("bundle/holdout_stats", bundle_metrics.get("holdout") or {}))
    metrics.update(
        numeric(
            "steps/interactions",
            {k: data.get(k) for k in ("events", "impressions", "rows")},
        )
    )
    metrics.update(numeric("steps/interactions/vocabulary", data.get("vocabulary") or {}))
    components = manifest.get("components") or {}
    metrics.update(numeric("steps/retrieval_model/als", components.get("als") or {}))
    metrics.update(numeric("steps/ranking_dataset", components.get("ranking_dataset") or {}))
    ranker = {
        k: v
        for k, v in (components.get("ranker") or {}).items()
        if k not in ("ranking", "feature_importance", "curves")
    }
    metrics.update(numeric("steps/ranking_model", ranker))
    eval_k = (manifest.get("params") or {}).get("eval_k", 10)
    series = {
        clean_key(f"steps/ranking_model/{name}_ndcg@{eval_k}_by_round"): [
            float(v) for v in curve if _number(v) is not None
        ]
        for name, curve in ((components.get("ranker") or {}).get("curves") or {}).items()
        if isinstance(curve, list)
    }
    metrics.update(numeric("steps/ranking_model/gate", ranking))
    metrics.update(numeric("steps/seconds", dict(step_seconds or {})))
    code_sha = str(manifest.get("code_sha") or "unknown")
    tags: dict[str, str] = {
        VERSION_TAG: version,
        "mlflow.runName": version,
        "mlflow.source.git.commit": code_sha,
        "mlflow.source.name": "recsys retrain_job",
        "mlflow.source.type": "JOB",
        "code_sha": code_sha,
        "data_version": data_version(manifest),
        "lake_uri": lake_uri,
        "ranking_mode": str(ranking.get("mode")),
    }
    if dagster_run_id:
        tags["dagster_run_id"] = dagster_run_id
    if registered_as:
        tags["registered_as"] = registered_as
    for key, value in (registration_tags or {}).items():
        tags[clean_key(f"registration.{key}")] = _text(value)
    files: dict[str, Any] = {
        f"{BUNDLE_DIR}/manifest.json": dict(manifest),
        f"{BUNDLE_DIR}/location.txt": f"{lake_uri}\n",
    }
    note = f"recsys bundle `{version}` in `{lake_uri}`."
    if evaluation is not None:
        k = evaluation.get("k", 10)
        metrics.update(numeric("holdout", evaluation.get("metrics") or {}))
        metrics.update(numeric("holdout/stats", evaluation.get("holdout") or {}))
        per_user = evaluation.get("per_user") or {}
        metrics.update(numeric("per_user", per_user.get("metrics") or {}))
        metrics.update(numeric("per_user/comparison", per_user.get("comparison") or {}))
        metrics.update(numeric("per_user/stats", per_user.get("holdout") or {}))
        metrics.update(numeric("decision/evidence", evaluation.get("evidence") or {}))
        rule = evaluation.get("first_model_rule") or {}
        metrics.update(numeric("first_model_rule", rule.get("evidence") or {}))
        answers = None
        if rule.get("applies"):
            answers = "model" if rule.get("serve") else "popularity"
        tags.update(
            {
                "decision": str(evaluation.get("decision")),
                "decision_reason": _text(evaluation.get("decision_reason") or ""),
                "production_version": str(evaluation.get("production_version")),
                "first_model_rule.applies": str(bool(rule.get("applies"))),
                "first_model_rule.serve": str(rule.get("serve")),
                "first_model_rule.reason": _text(rule.get("reason") or ""),
            }
        )
        if answers:
            tags["answers"] = answers
        if rule.get("warning"):
            tags["warning"] = _text(rule["warning"])
        files["evaluation/evaluation.json"] = dict(evaluation)
        table = str(evaluation.get("table") or "")
        note = (
            f"{note}\n\n**decision: {evaluation.get('decision')}**: "
            f"{evaluation.get('decision_reason')}\n\nNDCG@{k} and friends on the time holdout "
            f"and the per-user holdout:\n\n{table}"
        )
    else:
        tags["backfilled"] = "true"
        note += (
            "\n\nRecorded from the registry after the fact (MLflow was unreachable when it "
            "was trained, or it was registered by hand): only the manifest's figures."
        )
    tags["mlflow.note.content"] = _text(note, 50_000)
    return RunRecord(
        version=version, params=params, metrics=metrics, series=series, tags=tags, files=files
    )


def _configure_http() -> None:
    for name, value in _CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


@dataclass
class SyncReport:
    """What one reconciliation changed in MLflow (empty lists: it was already in sync)."""

    versions_created: list[str] = field(default_factory=list)
    runs_backfilled: list[str] = field(default_factory=list)
    aliases: dict[str, str | None] = field(default_factory=dict)  # moved: alias -> version
    moves_recorded: int = 0
    complete: bool = True  # False: versions left for the next call (max_versions)
    mlflow_versions: dict[str, str] = field(default_factory=dict)  # recsys -> mlflow version

    def summary(self) -> str:
        moved = ", ".join(f"{a}->{v or 'none'}" for a, v in self.aliases.items())
        return (
            f"{len(self.versions_created)} version(s) created "
            f"({len(self.runs_backfilled)} run(s) backfilled), "
            f"aliases moved: {moved or 'none'}, {self.moves_recorded} move(s) recorded"
            + ("" if self.complete else "; more versions left for the next sync")
        )


class MlflowMirror:
    """MLflow as a mirror of the training runs and of the lake registry.

    ``artifact_root`` is where the experiment keeps artifacts when it is created (the
    embedded store: a directory under ``RECSYS_HOME``; a server: None, the server's own
    artifact store). ``lock_path``: a file lock serializing syncs on this host, so two
    processes (a sensor tick and the CLI) never create the same version twice.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        artifact_root: str | None = None,
        experiment: str = EXPERIMENT,
        model_name: str = MODEL_NAME,
        lock_path: Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.experiment = experiment
        self.model_name = model_name
        self.lock_path = lock_path
        self._client: MlflowClient | None = None
        self._lock: Any = None
        self._experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            _configure_http()
            if self.tracking_uri.startswith("sqlite:///"):
                Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                    parents=True, exist_ok=True
                )
            from mlflow import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                self._experiment_id = str(found.experiment_id)
            else:
                self._experiment_id = str(
                    self.client.create_experiment(
                        self.experiment,
                        artifact_location=self.artifact_root,
                        tags={"mlflow.note.content": "recsys retrainings (one run each)"},
                    )
                )
        return self._experiment_id

    # --- runs ------------------------------------------------------------------------

    def find_run(self, version: str) -> str | None:
        """The run that recorded ``version``'s training (a finished one first)."""
        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string=f"tags.`{VERSION_TAG}` = '{version}'",
            max_results=10,
        )
        finished = [r for r in runs if r.info.status == "FINISHED"]
        chosen = (finished or runs or [None])[0]
        return chosen.info.run_id if chosen is not None else None

    def lock(self) -> AbstractContextManager[Any]:
        """This host's mirror lock (re-entrant): one writer at a time, so a sensor's sync
        and a retraining's run never race on the same version or the SQLite file."""
        if self.lock_path is None:
            return nullcontext()
        if self._lock is None:
            from filelock import FileLock

            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_SECONDS)
        return self._lock

    def log_run(self, record: RunRecord) -> str:
        """Record ``record`` as a finished run and return its id.

        A version already recorded by a full run is not recorded twice (a retried
        registration step). A run a sync backfilled from the manifest meanwhile (it saw
        the version registered before this call) is completed in place, so the model
        version stays linked to the one run that has everything."""
        with self.lock():
            return self._log_run(record)

    def _log_run(self, record: RunRecord) -> str:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        existing = self.find_run(record.version)
        run_id: str | None = None
        if existing is not None:
            run = client.get_run(existing)
            backfilled = run.data.tags.get("backfilled") == "true"
            if run.info.status == "FINISHED" and (not backfilled or "backfilled" in record.tags):
                return existing
            if run.info.status == "FINISHED":
                run_id = existing
        created = run_id is None
        if run_id is None:
            run_id = client.create_run(self.experiment_id(), run_name=record.version).info.run_id
        try:
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in sorted(record.metrics.items())]
            metrics += [
                Metric(k, v, now, step)
                for k, values in sorted(record.series.items())
                for step, v in enumerate(values, start=1)
            ]
            params = [Param(k, v) for k, v in sorted(record.params.items())]
            tags = [RunTag(k, v) for k, v in sorted(record.tags.items())]
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i : i + 1000])
            for i in range(0, len(params), _BATCH):
                client.log_batch(run_id, params=params[i : i + _BATCH])
            for i in range(0, len(tags), _BATCH):
                client.log_batch(run_id, tags=tags[i : i + _BATCH])
            for path, content in record.files.items():
                if isinstance(content, str):
                    client.log_text(run_id, content, path)
                else:
                    client.log_dict(run_id, _jsonable(content), path)
            if not created and "backfilled" not in record.tags:
                client.delete_tag(run_id, "backfilled")
        except Exception:
            if created:
                client.set_terminated(run_id, status="FAILED")
            raise
        if created:
            client.set_terminated(run_id, status="FINISHED")
        log.info(
            "mlflow.run", version=record.version, run_id=run_id, metrics=len(metrics), new=created
        )
        return run_id

    # --- registry ----------------------------------------------------------------------

    def _ensure_model(self) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self.client.create_registered_model(
                self.model_name,
                tags={"source_of_truth": "the recsys lake registry (registry/ in the lake)"},
                description=(
                    "Mirror of the recsys lake registry: versions, aliases (production, "
                    "candidate) and every alias move (tags move.<alias>.<time>). Serving reads "
                    "the lake; moves made here are overwritten by the next sync."
                ),
            )
        except MlflowException as exc:  # created by another process meanwhile
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        return self.client.get_registered_model(self.model_name)

    def mirrored_versions(self) -> dict[str, str]:
        """recsys version -> MLflow version number (the oldest if there are two)."""
        found: dict[str, str] = {}
        token: str | None = None
        while True:
            page = self.client.search_model_versions(
                f"name = '{self.model_name}'", max_results=1000, page_token=token
            )
            for mv in page:
                ours = (mv.tags or {}).get(VERSION_TAG)
                if ours and (ours not in found or int(mv.version) < int(found[ours])):
                    found[ours] = str(mv.version)
            token = page.token
            if not token:
                return found

    def _create_version(self, registry: ModelRegistry, mv: ModelVersion, report: SyncReport) -> str:
        run_id = self.find_run(mv.version)
        if run_id is None:
            record = training_record(
                mv.manifest, lake_uri=registry.uri(mv.version), registration_tags=mv.tags
            )
            run_id = self.log_run(record)
            report.runs_backfilled.append(mv.version)
        tags = {
            VERSION_TAG: mv.version,
            "lake_uri": registry.uri(mv.version),
            "code_sha": str(mv.manifest.get("code_sha")),
            "data_version": data_version(mv.manifest),
            **{clean_key(k): _text(v) for k, v in mv.tags.items()},
        }
        created = self.client.create_model_version(
            self.model_name,
            source=f"runs:/{run_id}/{BUNDLE_DIR}",
            run_id=run_id,
            tags=tags,
            description=f"recsys bundle {mv.version}, stored in {registry.uri(mv.version)}",
        )
        log.info("mlflow.version", version=mv.version, mlflow_version=created.version)
        return str(created.version)

    def sync(
        self,
        registry: ModelRegistry,
        *,
        moves: int = MOVES_PER_SYNC,
        max_versions: int | None = VERSIONS_PER_SYNC,
    ) -> SyncReport:
        """Make MLflow's registered model match the lake registry (idempotent).

        At most ``max_versions`` missing versions are created per call (the newest, and
        whatever an alias points to), so the first sync of a long registry never holds a
        sensor tick for minutes; ``report.complete`` says whether anything is left."""
        with self.lock():
            return self._sync(registry, moves, max_versions)

    def _sync(self, registry: ModelRegistry, moves: int, max_versions: int | None) -> SyncReport:
        report = SyncReport()
        self._ensure_model()
        mirrored = self.mirrored_versions()
        lake_aliases = registry.aliases()
        missing = [v for v in registry.version_ids() if v not in mirrored]
        if max_versions is not None and len(missing) > max_versions:
            targets = {state.version for state in lake_aliases.values()}
            missing = sorted(set(missing[-max_versions:]) | (targets & set(missing)))
            report.complete = False
        for version in missing:
            mirrored[version] = self._create_version(registry, registry.get(version), report)
            report.versions_created.append(version)
        report.mlflow_versions = mirrored
        model = self.client.get_registered_model(self.model_name)
        have = {str(k): str(v) for k, v in (model.aliases or {}).items()}
        for alias in sorted({PRODUCTION, CANDIDATE, *lake_aliases}):
            state = lake_aliases.get(alias)
            want = mirrored.get(state.version) if state is not None else None
            if want == have.get(alias) or (state is not None and want is None):
                continue  # (a version the lake lists but cannot read yet: next sync)
            if want is None:
                self.client.delete_registered_model_alias(self.model_name, alias)
            else:
                self.client.set_registered_model_alias(self.model_name, alias, want)
            report.aliases[alias] = state.version if state is not None else None
            log.info(
                "mlflow.alias", alias=alias, version=report.aliases[alias], mlflow_version=want
            )
        tags = dict(model.tags or {})
        for alias in sorted({PRODUCTION, CANDIDATE, *lake_aliases}):
            report.moves_recorded += self._record_moves(registry, alias, tags, mirrored, moves)
        return report

    def overview(self) -> dict[str, Any]:
        """What a person finds in MLflow: runs, model versions, aliases, recorded moves."""
        runs = self.client.search_runs([self.experiment_id()], max_results=1000)
        model = self.client.get_registered_model(self.model_name)
        versions = self.client.search_model_versions(
            f"name = '{self.model_name}'", max_results=1000
        )
        by_number = {str(mv.version): (mv.tags or {}).get(VERSION_TAG) for mv in versions}
        return {
            "experiment": self.experiment,
            "runs": len(runs),
            "model": self.model_name,
            "versions": len(versions),
            "aliases": {
                str(a): (str(n), by_number.get(str(n))) for a, n in (model.aliases or {}).items()
            },
            "moves": sum(1 for k in (model.tags or {}) if k.startswith("move.")),
        }

    def _record_moves(
        self,
        registry: ModelRegistry,
        alias: str,
        tags: Mapping[str, str],
        mirrored: Mapping[str, str],
        limit: int,
    ) -> int:
        """Alias moves newer than the last one recorded, as registered-model tags.

        The last recorded move is remembered by its history key (time-ordered), not its
        seq, so a fresh lake (the demo) mirrored into the same MLflow still records."""
        marker = f"mirrored_move.{alias}"
        done = tags.get(marker, "")
        newest = registry.history(limit=1, alias=alias)
        if not newest or newest[0].key <= done:
            return 0
        events = [e for e in registry.history(limit=max(1, limit), alias=alias) if e.key > done]
        for event in sorted(events, key=lambda e: e.key):
            mv = mirrored.get(event.version or "") or "-"
            share = f" ({event.share:.0%})" if event.share is not None and event.share < 1 else ""
            text = (
                f"{event.at.astimezone(UTC).isoformat(timespec='seconds')} {event.action}: "
                f"{event.previous or 'none'} -> {event.version or 'cleared'}{share} "
                f"(MLflow version {mv}): {event.reason}"
            )
            # Keyed by the move's time, not its seq: a fresh lake (the demo) restarts seq
            # at 1 and must not overwrite an older lake's moves; the time also sorts.
            stamp = event.at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            self.client.set_registered_model_tag(
                self.model_name, f"move.{alias}.{stamp}", _text(f"#{event.seq} {text}")
            )
        self.client.set_registered_model_tag(self.model_name, marker, newest[0].key)
        return len(events)


def _jsonable(value: Any) -> Any:
    """Strict JSON (NaN/inf -> None), for MLflow's artifact writer."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# --- never-raising entry points ---------------------------------------------------------


def _failed(lake: Lake | None, what: str, exc: BaseException) -> str:
    error = f"{type(exc).__name__}: {exc}"[:2000]
    log.warning("mlflow.mirror_failed", what=what, error=error)
    if lake is not None:
        record = {"ok": False, "what": what, "error": error, "at": datetime.now(UTC).isoformat()}
        try:
            lake.put_bytes(MLFLOW_STATUS_KEY, json.dumps(record, indent=2).encode())
        except Exception as write_exc:  # the lake failing too is not MLflow's problem to report
            log.warning("mlflow.status_not_written", error=str(write_exc))
    return error


def mirror_status(lake: Lake) -> dict[str, Any] | None:
    """The last mirror failure not yet caught up by a sync (None: in sync)."""
    if not lake.exists(MLFLOW_STATUS_KEY):
        return None
    return json.loads(lake.get_bytes(MLFLOW_STATUS_KEY))


def mirror_registry(
    mirror: MlflowMirror | None,
    registry: ModelRegistry,
    *,
    moves: int = MOVES_PER_SYNC,
    max_versions: int | None = VERSIONS_PER_SYNC,
) -> dict[str, Any]:
    """Sync the registry into MLflow; never raises. Returns what to show the operator:
    ``{"mlflow": "off" | "ok" | "failed", ...}``."""
    if mirror is None:
        return {"mlflow": OFF}
    try:
        report = mirror.sync(registry, moves=moves, max_versions=max_versions)
    except Exception as exc:
        return {"mlflow": "failed", "error": _failed(registry.lake, "sync", exc)}
    try:
        if registry.lake.exists(MLFLOW_STATUS_KEY):
            registry.lake.delete(MLFLOW_STATUS_KEY)
    except Exception as exc:
        log.warning("mlflow.status_not_cleared", error=str(exc))
    return {"mlflow": "ok", "report": report}


def record_retraining(
    mirror: MlflowMirror | None,
    registry: ModelRegistry,
    version: str,
    *,
    evaluation: Mapping[str, Any] | None,
    dagster_run_id: str | None = None,
    step_seconds: Mapping[str, float] | None = None,
    registered_as: str | None = None,
) -> dict[str, Any]:
    """Record a retraining's run, then sync the registry (its new version and any alias
    the registration moved); never raises. Returns ``{"mlflow": ..., "run_id": ...}``."""
    if mirror is None:
        return {"mlflow": OFF}
    try:
        mv = registry.get(version)
        record = training_record(
            mv.manifest,
            lake_uri=registry.uri(version),
            evaluation=evaluation,
            registration_tags=mv.tags,
            dagster_run_id=dagster_run_id,
            step_seconds=step_seconds,
            registered_as=registered_as,
        )
        run_id = mirror.log_run(record)
    except Exception as exc:
        return {"mlflow": "failed", "error": _failed(registry.lake, f"run {version}", exc)}
    synced = mirror_registry(mirror, registry)
    return {**synced, "run_id": run_id}


def tracking_location(settings: Any) -> tuple[str, str | None]:
    """(tracking URI, artifact root for a new experiment) from ``Settings``: the team's
    server when ``RECSYS_MLFLOW_TRACKING_URI`` is set, else SQLite under the home."""
    configured = (settings.platform.mlflow_tracking_uri or "").strip()
    if configured:
        return (OFF if configured.lower() == OFF else configured), None
    home = settings.resolved_home / "mlflow"
    return f"sqlite:///{home / 'mlflow.db'}", (home / "artifacts").as_uri()


def mirror_for(settings: Any) -> MlflowMirror | None:
    """The mirror ``Settings`` describe (None when switched off)."""
    uri, root = tracking_location(settings)
    if uri == OFF:
        return None
    lock = settings.resolved_home / "mlflow" / "sync.lock"
    return MlflowMirror(uri, artifact_root=root, lock_path=lock)


def browse_hint(tracking_uri: str) -> str:
    """How a person looks at the runs and the registered model."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')} (experiment {EXPERIMENT}, model {MODEL_NAME})"
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000, then http://127.0.0.1:5000"


# --- the closed loop's catch-up (promotion_sensor requests mlflow_sync_job runs) ---

RETRY_AFTER_SECONDS = 300.0  # an unreachable MLflow is asked again at most this often


def alias_fingerprint(registry: ModelRegistry) -> str:
    """Where production and candidate point and since when: changes with every move,
    whoever made it (the closed loop, the CLI, the admin API)."""
    parts = []
    for name in (PRODUCTION, CANDIDATE):
        state = registry.alias(name)
        parts.append(
            f"{name}={state.version}@{state.updated_at.isoformat()}" if state else f"{name}="
        )
    return "|".join(parts)
