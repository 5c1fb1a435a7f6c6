"""Asset checks of the training graph.

Features are finite by construction (unknown values are explicit sentinels), so a
NaN or inf anywhere is a bug or corrupt input; the checks are blocking, so nothing
downstream (the ranker, the bundle, the registry) ever sees it.
"""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg


def finite_check(name: str, non_finite: Mapping[str, Mapping[str, int]]) -> dg.AssetCheckResult:
    """Pass when no snapshot reports a non-finite count; the metadata names the columns."""
    bad = {snap: dict(cols) for snap, cols in non_finite.items() if cols}
    total = sum(sum(cols.values()) for cols in bad.values())
    return dg.AssetCheckResult(
        check_name=name,
        passed=not bad,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            "all features finite"
            if not bad
            else f"{total} non-finite feature values: "
            + "; ".join(f"{snap}: {', '.join(sorted(cols))}" for snap, cols in bad.items())
        ),
        metadata={
            "non_finite_values": total,
            "columns": dg.MetadataValue.json(bad),
        },
    )
