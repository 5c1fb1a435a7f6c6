"""The OCI target of ``promoted_image`` as a Dagster resource built from ``Settings``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from recsys_assets.packaging.publish import PublishTarget
from recsys_assets.resources import declared
from recsys_serving.oci import OciCredentials, RegistryAccess
from recsys_serving.settings import PackagingSettings, Settings

LAYOUT_NAME = "recsys-model"


def default_layout_dir(settings: Settings) -> Path:
    """Where the embedded default keeps the artifact: ``$RECSYS_HOME/oci/recsys-model``."""
    return settings.resolved_home / "oci" / LAYOUT_NAME


class OciResource(dg.ConfigurableResource):
    """Registry (or embedded layout) the production model is published to."""

    repository: str | None = Field(
        default=None, description="host[:port]/repo; unset = write an OCI layout instead."
    )
    insecure: bool = declared(PackagingSettings, "oci_insecure")
    username: str | None = None
    password: str | None = None
    layout_dir: str = Field(description="OCI image layout used when no repository is set.")
    work_dir: str = Field(description="Where the production bundle is fetched before packaging.")

    @classmethod
    def from_settings(cls, settings: Settings) -> OciResource:
        password: Any = settings.packaging.oci_password
        if password and os.environ.get("RECSYS_OCI_PASSWORD") == password:
            # Resource config is shown in the Dagster UI; an EnvVar shows only its name.
            password = dg.EnvVar("RECSYS_OCI_PASSWORD")
        return cls(
            repository=settings.packaging.oci_repository,
            insecure=settings.packaging.oci_insecure,
            username=settings.packaging.oci_username,
            password=password,
            layout_dir=str(default_layout_dir(settings)),
            work_dir=str(settings.resolved_model_cache_dir),
        )

    def target(self) -> PublishTarget:
        password = self.password
        if isinstance(password, dg.EnvVar):
            # Only Dagster resolves an EnvVar; a resource used directly must too.
            password = password.get_value()
        if bool(self.username) != bool(password):
            raise ValueError("the OCI username and password must be set together")
        credentials = (
            OciCredentials(self.username, password) if self.username and password else None
        )
        return PublishTarget(
            repository=self.repository or None,
            layout_dir=Path(self.layout_dir),
            access=RegistryAccess(insecure=self.insecure, credentials=credentials),
        )
