"""The MLflow mirror as a Dagster resource, built from ``Settings``."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from recsys_assets.tracking.mirror import OFF, MlflowMirror, tracking_location
from recsys_serving.settings import Settings


class MlflowResource(dg.ConfigurableResource):
    """Where training runs and registry moves are mirrored (``off``: nowhere).

    The run's config shows the tracking URI it wrote to; the mirror itself never
    raises into an asset or a sensor (:mod:`recsys_assets.tracking.mirror`)."""

    tracking_uri: str
    artifact_root: str | None = None
    lock_path: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> MlflowResource:
        uri, root = tracking_location(settings)
        return cls(
            tracking_uri=uri,
            artifact_root=root,
            lock_path=str(settings.resolved_home / "mlflow" / "sync.lock"),
        )

    def mirror(self) -> MlflowMirror | None:
        if self.tracking_uri == OFF:
            return None
        return MlflowMirror(
            self.tracking_uri,
            artifact_root=self.artifact_root,
            lock_path=Path(self.lock_path) if self.lock_path else None,
        )
