"""``promoted_image``: the production model, packaged as an OCI artifact.

Thin on purpose: :func:`~recsys_assets.packaging.publish.publish_production_model`
does the work; the asset turns its :class:`~recsys_serving.oci.OciRef` into metadata
and uses the manifest digest as the asset's data version, so Dagster's lineage shows
exactly which artifact each materialization produced.
"""

from pathlib import Path

import dagster as dg

from recsys_assets.packaging.publish import (
    NoProductionModel,
    PublishTarget,
    publish_production_model,
    pull_hint,
)
from recsys_assets.packaging.resource import OciResource
from recsys_assets.resources import LakeResource
from recsys_serving.oci import OciRef
from recsys_serving.registry import ModelRegistry


def image_metadata(ref: OciRef, target: PublishTarget) -> dict[str, dg.MetadataValue]:
    metadata: dict[str, dg.MetadataValue] = {
        "reference": dg.MetadataValue.text(ref.reference),
        "digest": dg.MetadataValue.text(ref.digest),
        "tag": dg.MetadataValue.text(ref.tagged),
        "model_version": dg.MetadataValue.text(ref.version),
        "target": dg.MetadataValue.text(target.kind),
        "size_bytes": dg.MetadataValue.int(ref.size),
        "layer_count": dg.MetadataValue.int(ref.layer_count),
        "uploaded_blobs": dg.MetadataValue.int(ref.uploaded_blobs),
        "uploaded_bytes": dg.MetadataValue.int(ref.uploaded_bytes),
        "annotations": dg.MetadataValue.json(ref.annotations),
        "how_to_get_it": dg.MetadataValue.text(pull_hint(ref)),
    }
    if target.repository:
        host, _, path = ref.repository.partition("/")
        scheme = "http" if target.access.insecure else "https"
        metadata["manifest_url"] = dg.MetadataValue.url(
            f"{scheme}://{host}/v2/{path}/manifests/{ref.digest}"
        )
    else:
        metadata["layout_dir"] = dg.MetadataValue.path(ref.repository)
    return metadata


@dg.asset(
    group_name="deployment",
    deps=["production_model"],
    kinds={"oci"},
    description=(
        "The production model as an OCI artifact (one layer per bundle file, annotated with "
        "version, metrics, code and data versions), pushed to RECSYS_OCI_REPOSITORY or, "
        "without one, written to the OCI layout under $RECSYS_HOME/oci/. Deploy it by digest."
    ),
)
def promoted_image(
    context: dg.AssetExecutionContext, lake: LakeResource, oci: OciResource
) -> dg.MaterializeResult:
    target = oci.target()
    try:
        ref = publish_production_model(ModelRegistry(lake.get()), target, Path(oci.work_dir))
    except NoProductionModel as exc:
        raise dg.Failure(description=str(exc)) from exc
    context.log.info(f"published model {ref.version} as {ref.reference}")
    return dg.MaterializeResult(
        metadata=image_metadata(ref, target), data_version=dg.DataVersion(ref.digest)
    )


PUBLISH_JOB = "publish_job"

publish_job = dg.define_asset_job(
    PUBLISH_JOB,
    selection=[promoted_image],
    tags={"recsys/pipeline": "publish"},
    description=(
        "Packages the production model as an OCI artifact and pushes it (promoted_image); "
        "promotion_sensor runs it whenever the production model changes."
    ),
)
