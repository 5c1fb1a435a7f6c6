"""The closed loop's assets: ``online_ctr`` (what users do with the recommendations)
and ``production_model`` (every promotion decision, with its evidence).

``production_model`` is not computed by a run: the promotion sensor *reports* a
materialization for each decision it applies (canary started, ramped, promoted,
rolled back, rejected), so the asset's history in the UI is the decision log, with
the offline and online evidence as metadata, and lineage shows where it comes from.
"""

from datetime import UTC, datetime

import dagster as dg

from recsys_assets.monitoring.config import ClosedLoopConfig
from recsys_assets.monitoring.ctr import series_rows
from recsys_assets.monitoring.snapshot import take_snapshot
from recsys_assets.resources import LakeResource

GROUP = "closed_loop"
ONLINE_CTR = dg.AssetKey("online_ctr")
PRODUCTION_MODEL = dg.AssetKey("production_model")

production_model = dg.AssetSpec(
    PRODUCTION_MODEL,
    deps=["registered_model"],
    group_name=GROUP,
    kinds={"registry"},
    description=(
        "Which model serves: every closed-loop decision (offline rejection, canary start, "
        "ramp, promotion to production, rollback) reported by `promotion_sensor` with its "
        "offline metrics and online CTR evidence. Aliases live in the registry "
        "(`registry/aliases/`), their audit trail in `registry/history/`."
    ),
)


@dg.asset(
    key=ONLINE_CTR,
    deps=["weblogs"],
    group_name=GROUP,
    kinds={"polars", "parquet"},
    description=(
        "Attributed online CTR (clicks joined to impressions on request_id) per model "
        "version and time bucket, the drop test on the production model, and service "
        "health scraped from the server's /metrics (calls, error rate, latency quantiles, "
        "fallback share). Snapshots go to `monitoring/online_ctr/` and `monitoring/health/`."
    ),
)
def online_ctr(
    context: dg.AssetExecutionContext, lake: LakeResource, closed_loop: ClosedLoopConfig
) -> dg.MaterializeResult:
    snap = take_snapshot(lake.get(), closed_loop, datetime.now(UTC))
    context.log.info(f"drop test: {snap.verdict.describe()}")
    rows = series_rows(snap.series.tail(40))
    table = "\n".join(
        f"| {r['bucket_start']} | {r['model_version']} | {r['impressions']} | {r['clicks']} "
        f"| {r['ctr']:.2%} |"
        for r in rows
    )
    metadata: dict[str, object] = {
        "dagster/row_count": snap.series.height,
        "production_version": snap.production_version or "",
        "candidate_version": snap.candidate_version or "",
        "candidate_share": snap.candidate_share or 0.0,
        "drop_test": snap.verdict.outcome,
        "drop_evidence": dg.MetadataValue.json(snap.verdict.evidence()),
        "orphan_clicks": snap.orphan_clicks,
        "recent_window": dg.MetadataValue.json(snap.recent),
        "series": dg.MetadataValue.md(
            "| bucket | model | impressions | clicks | CTR |\n|---|---|---|---|---|\n" + table
        ),
        "series_path": dg.MetadataValue.path(lake.get().uri_for(snap.series_key)),
    }
    if snap.production_version and snap.recent.get(snap.production_version, {}).get("ctr"):
        metadata["production_ctr"] = float(snap.recent[snap.production_version]["ctr"])
    if snap.candidate_version and snap.recent.get(snap.candidate_version, {}).get("ctr"):
        metadata["candidate_ctr"] = float(snap.recent[snap.candidate_version]["ctr"])
    if snap.health is not None:
        metadata["service_health"] = dg.MetadataValue.json(snap.health)
        for key in ("error_rate", "latency_p95_ms", "fallback_share", "rps"):
            if snap.health.get(key) is not None:
                metadata[key] = float(snap.health[key])
    return dg.MaterializeResult(metadata=metadata)
