"""Publish the production model as an OCI artifact: the logic behind ``promoted_image``.

With ``RECSYS_OCI_REPOSITORY`` set the artifact is pushed to that registry (ECR or any
OCI distribution registry). Without it (a laptop, ``make demo``) the very same artifact
is written to an OCI image layout under ``$RECSYS_HOME/oci/recsys-model``: the asset
still produces real, digest-addressed output that the server can load
(``oci-layout://...@sha256:...``) and that ``oras cp --from-oci-layout`` can push to a
registry later, with the same digest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recsys_serving.layout import PRODUCTION
from recsys_serving.oci import OciRef, RegistryAccess, push_bundle, write_layout
from recsys_serving.registry import ModelRegistry


class NoProductionModel(RuntimeError):
    """Nothing to package: no model has been promoted to production yet."""


@dataclass(frozen=True, slots=True)
class PublishTarget:
    """Where the production model goes: a registry repository, else a layout directory."""

    repository: str | None
    layout_dir: Path
    access: RegistryAccess = field(default_factory=RegistryAccess)

    @property
    def kind(self) -> str:
        return "registry" if self.repository else "oci-layout"


def publish_production_model(
    registry: ModelRegistry, target: PublishTarget, work_dir: Path
) -> OciRef:
    """Fetch the bundle the ``production`` alias points at and publish it, tagged with its
    version. Idempotent: the same version always yields the same digest, and a repeated
    push uploads no blob again."""
    state = registry.alias(PRODUCTION)
    if state is None:
        raise NoProductionModel(
            f"no model has been promoted to production in {registry.lake.uri}; "
            "nothing to package (materialize the training and promotion assets first)"
        )
    bundle = registry.fetch(state.version, work_dir)
    if target.repository:
        return push_bundle(bundle, target.repository, state.version, access=target.access)
    return write_layout(bundle, target.layout_dir, state.version)


def pull_hint(ref: OciRef) -> str:
    """The command an operator runs to get (or, for a layout, to ship) this artifact."""
    if ref.reference.startswith("oci-layout://"):
        return (
            f"oras cp --from-oci-layout {ref.repository}:{ref.tag} "
            f"<registry>/<repository>:{ref.tag}"
        )
    return f"oras pull {ref.repository}@{ref.digest}"
