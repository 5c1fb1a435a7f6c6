"""The model bundle as an OCI artifact, against a real registry (Debian's docker-registry,
the CNCF distribution registry, on loopback): push, pull by digest with verification,
refusals, auth (Basic, ECR through moto), the OCI layout default, and ``promoted_image``."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import dagster as dg
import numpy as np
import oras.layout
import oras.provider
import pytest
import requests
from model_support import tiny_bundle, tiny_outcome, tiny_world
from oci_support import (
    OciRegistryServer,
    oci_registry,
    oci_registry_basic,
    running_ecr_front,
    running_registry,
    running_token_issuer,
)

from recsys_assets.packaging.assets import promoted_image
from recsys_assets.packaging.resource import OciResource, default_layout_dir
from recsys_assets.resources import LakeResource
from recsys_serving import oci
from recsys_serving.lake import LocalLake
from recsys_serving.model.bundle import MANIFEST, BundleError, BundleWriter
from recsys_serving.oci import (
    ARTIFACT_TYPE,
    OciAuthError,
    OciCredentials,
    OciDigestMismatch,
    OciError,
    OciNotFound,
    OciReferenceError,
    OciUnreachable,
    RegistryAccess,
    build_artifact,
    pull_bundle,
    push_bundle,
    write_layout,
)
from recsys_serving.registry import ModelRegistry
from recsys_serving.settings import Settings

__all__ = ["oci_registry", "oci_registry_basic", "tiny_bundle", "tiny_outcome", "tiny_world"]

VERSION = "v20260102030405-0a1b2c3d"
ECR_HOST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


def make_bundle(target: Path, version: str = VERSION, ranker_lines: int = 2000) -> Path:
    with BundleWriter(target, version=version) as w:
        (w.path / "ranker.txt").write_text("tree\n" * ranker_lines)  # ~10 KB
        np.save(w.path / "item_factors.npy", np.arange(600, dtype=np.float32).reshape(50, 12))
        (w.path / "index").mkdir()
        (w.path / "index" / "items.json").write_text('["i1", "i2", "i3"]')
        w.manifest.update(
            created_at="2026-01-02T03:04:05+00:00",
            code_sha="0123456789abcdef0123456789abcdef01234567",
            metrics={"ndcg@10": 0.31, "recall@10": 0.42},
            data={"partitions": ["2026-01-01"], "rows": 1234, "content_sha256": "ab" * 32},
            index_version="idx-1",
        )
    return target


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def registry_manifest(server: OciRegistryServer, reference: str) -> requests.Response:
    return requests.get(
        server.url(f"/v2/recsys/model/manifests/{reference}"),
        headers={"Accept": oci.IMAGE_MANIFEST_MEDIA_TYPE},
        auth=server.auth(),
        timeout=10,
    )


# --- the artifact, without a registry ----------------------------------------------


def test_artifact_is_canonical_annotated_and_one_layer_per_file(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    first, second = build_artifact(bundle), build_artifact(bundle)
    assert first.manifest == second.manifest and first.digest == second.digest
    document = json.loads(first.manifest)
    assert document["artifactType"] == ARTIFACT_TYPE
    assert document["mediaType"] == oci.IMAGE_MANIFEST_MEDIA_TYPE
    assert document["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    titles = [layer["annotations"][oci.TITLE] for layer in document["layers"]]
    assert titles == sorted(["index/items.json", "item_factors.npy", MANIFEST, "ranker.txt"])
    media = {layer["annotations"][oci.TITLE]: layer["mediaType"] for layer in document["layers"]}
    assert media[MANIFEST] == oci.BUNDLE_MANIFEST_MEDIA_TYPE
    assert media["ranker.txt"] == "text/plain"
    notes = document["annotations"]
    assert notes["org.opencontainers.image.version"] == VERSION
    assert notes["org.opencontainers.image.created"] == "2026-01-02T03:04:05+00:00"
    assert notes["org.opencontainers.image.revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert json.loads(notes["io.recsys.model.metrics"]) == {"ndcg@10": 0.31, "recall@10": 0.42}
    assert notes["io.recsys.model.data-version"].startswith("sha256:")
    assert notes["io.recsys.model.index-version"] == "idx-1"


def test_empty_config_descriptor_is_the_digest_of_empty_json() -> None:
    assert oci._EMPTY_CONFIG_DESCRIPTOR["digest"] == oci.sha256_digest(oci.EMPTY_CONFIG)
    assert oci._EMPTY_CONFIG_DESCRIPTOR["size"] == len(oci.EMPTY_CONFIG)


def test_data_version_is_stable_and_tracks_the_data() -> None:
    a = {"data": {"rows": 1, "partitions": ["d1"]}}
    assert oci.data_version(a) == oci.data_version({"data": {"partitions": ["d1"], "rows": 1}})
    assert oci.data_version(a) != oci.data_version({"data": {"rows": 2, "partitions": ["d1"]}})
    assert oci.data_version({"data_version": "dv-7", "data": {"rows": 1}}) == "dv-7"
    assert oci.data_version({}) is None


def test_a_tampered_bundle_is_never_packaged(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "ranker.txt").write_text("poisoned\n")
    with pytest.raises(BundleError, match=r"ranker\.txt"):
        build_artifact(bundle)
    with pytest.raises(BundleError):
        write_layout(bundle, tmp_path / "layout")
    assert not (tmp_path / "layout" / "index.json").exists()


@pytest.mark.parametrize(
    ("reference", "match"),
    [
        ("https://host/repo@sha256:" + "a" * 64, "expected oci://"),
        ("oci://host/repo@sha256:abc", "64 lowercase hex"),
        ("oci://host/Repo@sha256:" + "a" * 64, "lowercase repository"),
        ("oci://repo@sha256:" + "a" * 64, "host"),
        ("oci://host/repo:bad tag", "invalid tag"),
        ("oci-layout://relative/dir@sha256:" + "a" * 64, "absolute path"),
    ],
)
def test_malformed_references_are_refused(reference: str, match: str) -> None:
    with pytest.raises(OciReferenceError, match=match):
        oci.parse_reference(reference)


def test_tag_only_reference_is_refused_before_any_network(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens; the refusal must come first.
    with pytest.raises(OciReferenceError, match="pin a digest"):
        pull_bundle(f"oci://127.0.0.1:9/recsys/model:{VERSION}", tmp_path, insecure=True)
    with pytest.raises(OciReferenceError, match="pin a digest"):
        pull_bundle("oci://127.0.0.1:9/recsys/model", tmp_path, insecure=True)


def test_settings_give_registry_access() -> None:
    access = RegistryAccess.from_settings(
        Settings(oci_insecure=True, oci_username="u", oci_password="p")
    )
    assert access.insecure and access.credentials == OciCredentials("u", "p")
    assert "p" not in repr(access.credentials)
    assert RegistryAccess.from_settings(Settings()).credentials is None
    with pytest.raises(OciAuthError, match="together"):
        RegistryAccess.from_settings(Settings(oci_username="u"))


# --- a real registry ---------------------------------------------------------------


@pytest.mark.slow
def test_push_then_pull_by_digest_is_byte_identical(
    tmp_path: Path, oci_registry: OciRegistryServer
) -> None:
    bundle = make_bundle(tmp_path / "b")
    # A chunk size below the ranker's size exercises the chunked upload path too.
    ref = push_bundle(bundle, oci_registry.repository(), insecure=True, chunk_size=4096)
    assert ref.tag == ref.version == VERSION
    assert ref.reference == f"oci://{oci_registry.host}/recsys/model@{ref.digest}"
    assert ref.layer_count == 4 and ref.uploaded_blobs == 5  # 4 layers + the empty config

    answer = registry_manifest(oci_registry, VERSION)
    assert answer.status_code == 200
    assert answer.headers["Docker-Content-Digest"] == ref.digest
    stored = answer.json()
    assert stored["artifactType"] == ARTIFACT_TYPE
    assert stored["annotations"]["org.opencontainers.image.version"] == VERSION
    assert json.loads(stored["annotations"]["io.recsys.model.metrics"])["ndcg@10"] == 0.31

    pulled = pull_bundle(ref.reference, tmp_path / "models", insecure=True)
    assert pulled == tmp_path / "models" / VERSION
    assert tree(pulled) == tree(bundle)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [VERSION]  # no staging left
    # Pulling again returns the verified copy as is.
    assert pull_bundle(ref.reference, tmp_path / "models", insecure=True) == pulled


@pytest.mark.slow
def test_a_real_trained_bundle_round_trips_and_loads(
    tmp_path: Path, oci_registry: OciRegistryServer, tiny_bundle: Path
) -> None:
    from recsys_serving.model.recommender import Recommender

    ref = push_bundle(tiny_bundle, oci_registry.repository(), insecure=True)
    pulled = pull_bundle(ref.reference, tmp_path / "models", insecure=True)
    assert tree(pulled) == tree(tiny_bundle)
    model = Recommender.load(pulled)
    assert model.version == ref.version
    assert model.popular(5)


@pytest.mark.slow
def test_pushing_the_same_version_twice_gives_the_same_digest(
    tmp_path: Path, oci_registry: OciRegistryServer
) -> None:
    bundle = make_bundle(tmp_path / "b")
    first = push_bundle(bundle, oci_registry.repository(), insecure=True)
    copy = make_bundle(tmp_path / "again")  # rebuilt from the same inputs
    second = push_bundle(copy, oci_registry.repository(), insecure=True)
    assert second.digest == first.digest
    assert second.uploaded_blobs == 0  # every layer was already there
    tags = requests.get(oci_registry.url("/v2/recsys/model/tags/list"), timeout=10).json()
    assert tags["tags"] == [VERSION]


@pytest.mark.slow
def test_a_wrong_digest_is_refused(tmp_path: Path, oci_registry: OciRegistryServer) -> None:
    ref = push_bundle(make_bundle(tmp_path / "b"), oci_registry.repository(), insecure=True)
    flipped = ref.digest[:-1] + ("0" if ref.digest[-1] != "0" else "1")
    with pytest.raises(OciNotFound, match="no artifact"):
        pull_bundle(
            f"oci://{oci_registry.repository()}@{flipped}", tmp_path / "models", insecure=True
        )
    assert not (tmp_path / "models" / VERSION).exists()


@pytest.mark.slow
def test_tampered_layer_bytes_are_refused_and_nothing_is_installed(
    tmp_path: Path, oci_registry: OciRegistryServer
) -> None:
    artifact = build_artifact(make_bundle(tmp_path / "b"))
    ref = push_bundle(tmp_path / "b", oci_registry.repository(), insecure=True)
    ranker = next(layer for layer in artifact.layers if layer.path == "ranker.txt")
    stored = oci_registry.blob_data(ranker.digest)
    data = bytearray(stored.read_bytes())
    data[10] ^= 0x01  # same size, one bit flipped: only the digest can tell
    stored.write_bytes(bytes(data))
    with pytest.raises(OciDigestMismatch, match=r"layer ranker\.txt hashes to"):
        pull_bundle(ref.reference, tmp_path / "models", insecure=True)
    assert list((tmp_path / "models").iterdir()) == []  # no bundle, no staging dir


@pytest.mark.slow
def test_a_tampered_manifest_is_refused(tmp_path: Path, oci_registry: OciRegistryServer) -> None:
    ref = push_bundle(make_bundle(tmp_path / "b"), oci_registry.repository(), insecure=True)
    stored = oci_registry.blob_data(ref.digest)
    text = stored.read_text()
    assert '"ndcg@10\\":0.31' in text
    stored.write_text(text.replace('"ndcg@10\\":0.31', '"ndcg@10\\":0.99'))
    with pytest.raises(OciDigestMismatch, match="manifest bytes hash to"):
        pull_bundle(ref.reference, tmp_path / "models", insecure=True)


@pytest.mark.slow
def test_tag_reference_needs_explicit_permission(
    tmp_path: Path, oci_registry: OciRegistryServer
) -> None:
    bundle = make_bundle(tmp_path / "b")
    push_bundle(bundle, oci_registry.repository(), insecure=True)
    tagged = f"oci://{oci_registry.repository()}:{VERSION}"
    with pytest.raises(OciReferenceError, match="pin a digest"):
        pull_bundle(tagged, tmp_path / "models", insecure=True)
    pulled = pull_bundle(tagged, tmp_path / "models", insecure=True, allow_tag=True)
    assert tree(pulled) == tree(bundle)


@pytest.mark.slow
def test_missing_artifact_and_foreign_artifact_get_clear_errors(
    tmp_path: Path, oci_registry: OciRegistryServer
) -> None:
    missing = f"oci://{oci_registry.host}/recsys/nothing@sha256:{'a' * 64}"
    with pytest.raises(OciNotFound, match="recsys/nothing"):
        pull_bundle(missing, tmp_path / "models", insecure=True)

    # An artifact pushed by plain oras (not a recsys bundle) is refused by type.
    (tmp_path / "notes.txt").write_text("hello")
    client = oras.provider.Registry(hostname=oci_registry.host, insecure=True)
    response = client.push(
        target=f"{oci_registry.host}/recsys/other:v1",
        files=[str(tmp_path / "notes.txt")],
        disable_path_validation=True,
    )
    digest = response.headers["Docker-Content-Digest"]
    foreign = f"oci://{oci_registry.host}/recsys/other@{digest}"
    with pytest.raises(OciError, match="not a recsys model bundle"):
        pull_bundle(foreign, tmp_path / "m", insecure=True)
    # HTTPS against a plain-HTTP registry fails at once and says what to set.
    with pytest.raises(OciUnreachable, match="RECSYS_OCI_INSECURE"):
        pull_bundle(foreign, tmp_path / "m")


def test_unreachable_registry_fails_fast(tmp_path: Path, closed_localhost_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(OciUnreachable, match=f"127.0.0.1:{closed_localhost_port}"):
        push_bundle(
            make_bundle(tmp_path / "b"),
            f"127.0.0.1:{closed_localhost_port}/recsys/model",
            insecure=True,
        )
    with pytest.raises(OciUnreachable):
        pull_bundle(
            f"oci://127.0.0.1:{closed_localhost_port}/recsys/model@sha256:{'a' * 64}",
            tmp_path / "models",
            insecure=True,
        )
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_a_different_bundle_under_the_same_version_is_not_silently_reused(
    tmp_path: Path, oci_registry: OciRegistryServer
) -> None:
    ref = push_bundle(make_bundle(tmp_path / "b"), oci_registry.repository(), insecure=True)
    make_bundle(tmp_path / "models" / VERSION, ranker_lines=3)  # same version, other files
    with pytest.raises(OciError, match="different bundle of the same version"):
        pull_bundle(ref.reference, tmp_path / "models", insecure=True)


# --- authentication ----------------------------------------------------------------


@pytest.mark.slow
def test_basic_auth_registry(tmp_path: Path, oci_registry_basic: OciRegistryServer) -> None:
    bundle = make_bundle(tmp_path / "b")
    repo = oci_registry_basic.repository()
    with pytest.raises(OciAuthError, match="RECSYS_OCI_USERNAME"):
        push_bundle(bundle, repo, insecure=True)
    with pytest.raises(OciAuthError, match="refused the credentials"):
        push_bundle(bundle, repo, insecure=True, auth=OciCredentials("recsys", "wrong"))
    access = RegistryAccess.from_settings(
        Settings(oci_insecure=True, oci_username="recsys", oci_password="s3cret-pw")
    )
    ref = push_bundle(bundle, repo, access=access)
    pulled = pull_bundle(ref.reference, tmp_path / "models", access=access)
    assert tree(pulled) == tree(bundle)
    with pytest.raises(OciAuthError):
        pull_bundle(ref.reference, tmp_path / "anon", insecure=True)


@pytest.mark.slow
def test_bearer_token_registry(tmp_path: Path) -> None:
    """Registries that answer with a Bearer challenge get a token from their token service
    in exchange for the credentials, widened from pull to push as the push needs it."""
    with (
        running_token_issuer("robot", "t0ken-pw") as issuer,
        running_registry(tmp_path / "token-registry", token_issuer=issuer) as server,
    ):
        bundle = make_bundle(tmp_path / "b")
        access = RegistryAccess(insecure=True, credentials=OciCredentials("robot", "t0ken-pw"))
        ref = push_bundle(bundle, server.repository(), access=access)
        assert frozenset({"pull", "push"}) in issuer.granted_actions("recsys/model")
        pulled = pull_bundle(ref.reference, tmp_path / "models", access=access)
        assert tree(pulled) == tree(bundle)
        wrong = RegistryAccess(insecure=True, credentials=OciCredentials("robot", "nope"))
        with pytest.raises(OciAuthError, match="token"):
            pull_bundle(ref.reference, tmp_path / "other", access=wrong)


@pytest.mark.slow
def test_an_ecr_challenge_is_answered_by_oras_ecr_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ECR auth is HTTP Basic with the decoded ``GetAuthorizationToken`` token, which oras'
    ECR backend fetches with boto3 when ECR's challenge comes: no credentials configured,
    moto's ECR (no network) issues the token, and a registry whose htpasswd holds exactly
    that password, behind an ECR-shaped challenge, takes the push and the pull."""
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        token = boto3.client("ecr", region_name="eu-west-1").get_authorization_token()
    encoded = token["authorizationData"][0]["authorizationToken"]
    username, _, password = base64.b64decode(encoded).decode().partition(":")
    with (
        running_registry(tmp_path / "ecr-like", username=username, password=password) as server,
        running_ecr_front(server, ECR_HOST) as front,
        mock_aws(),
    ):
        bundle = make_bundle(tmp_path / "b")
        ref = push_bundle(bundle, f"{front}/recsys/model", insecure=True)
        assert registry_manifest(server, ref.digest).status_code == 200
        pulled = pull_bundle(ref.reference, tmp_path / "models", insecure=True)
    assert tree(pulled) == tree(bundle)


@pytest.mark.slow
def test_ecr_without_aws_credentials_is_an_auth_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # No credential file, and never the instance metadata endpoint (off this machine).
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    with (
        running_registry(tmp_path / "ecr-like", username="AWS", password="pw") as server,
        running_ecr_front(server, ECR_HOST) as front,
        pytest.raises(OciAuthError, match="cannot get an ECR authorization token"),
    ):
        push_bundle(make_bundle(tmp_path / "b"), f"{front}/recsys/model", insecure=True)


# --- the OCI image layout (embedded default) ---------------------------------------


def test_layout_holds_every_version_and_pulls_by_digest(tmp_path: Path) -> None:
    layout = tmp_path / "oci" / "recsys-model"
    first = write_layout(make_bundle(tmp_path / "b1"), layout)
    other = "v20260103000000-0a1b2c3d"
    second = write_layout(make_bundle(tmp_path / "b2", version=other, ranker_lines=5), layout)
    again = write_layout(tmp_path / "b1", layout)
    assert again.digest == first.digest and again.uploaded_blobs == 0

    oras.layout.Layout(str(layout))  # oras' own validation of the layout
    index = json.loads((layout / "index.json").read_text())
    assert sorted(m["annotations"][oci.REF_NAME] for m in index["manifests"]) == [VERSION, other]
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}

    pulled = pull_bundle(second.reference, tmp_path / "models")
    assert tree(pulled) == tree(tmp_path / "b2")
    assert pull_bundle(f"oci-layout://{layout}:{VERSION}", tmp_path / "m", allow_tag=True).name == (
        VERSION
    )


def test_tampered_layout_blob_is_refused(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    ref = write_layout(make_bundle(tmp_path / "b"), layout)
    target = next(
        p for p in (layout / "blobs" / "sha256").iterdir() if p.read_bytes().startswith(b"tree")
    )
    target.write_bytes(target.read_bytes().replace(b"tree", b"TREE", 1))
    with pytest.raises(OciDigestMismatch, match=r"ranker\.txt"):
        pull_bundle(ref.reference, tmp_path / "models")


@pytest.mark.slow
def test_layout_copies_to_a_registry_with_the_same_digest(
    tmp_path: Path, oci_registry: OciRegistryServer
) -> None:
    """The laptop-to-cluster step: the layout's artifact lands in a registry byte for byte."""
    layout = tmp_path / "layout"
    ref = write_layout(make_bundle(tmp_path / "b"), layout)
    pushed = oci.push_layout(layout, VERSION, oci_registry.repository(), insecure=True)
    assert pushed.digest == ref.digest and pushed.uploaded_blobs == 5
    assert pushed.annotations == ref.annotations
    assert registry_manifest(oci_registry, VERSION).headers["Docker-Content-Digest"] == ref.digest
    pulled = pull_bundle(pushed.reference, tmp_path / "models", insecure=True)
    assert tree(pulled) == tree(tmp_path / "b")
    with pytest.raises(OciNotFound, match="no tag"):
        oci.push_layout(layout, "v0", oci_registry.repository(), insecure=True)


@pytest.mark.slow
def test_oras_tooling_reads_the_layout(tmp_path: Path, oci_registry: OciRegistryServer) -> None:
    """oras' own layout push (what ``oras cp --from-oci-layout`` does) keeps the digest.

    oras-py 0.2.x crashes on JSON layers that are arrays (it calls ``.get`` on every JSON
    blob), so this bundle's JSON is an object; :func:`oci.push_layout` has no such limit.
    """
    with BundleWriter(tmp_path / "b", version=VERSION) as w:
        (w.path / "ranker.txt").write_text("tree\n")
        (w.path / "meta.json").write_text('{"items": 3}')
    layout = tmp_path / "layout"
    ref = write_layout(tmp_path / "b", layout)
    client = oras.provider.Registry(hostname=oci_registry.host, insecure=True)
    oras.layout.Layout(str(layout)).push_to_registry(
        client, f"{oci_registry.repository()}:{VERSION}", tag=VERSION
    )
    assert registry_manifest(oci_registry, VERSION).headers["Docker-Content-Digest"] == ref.digest
    pulled = pull_bundle(
        f"oci://{oci_registry.repository()}@{ref.digest}", tmp_path / "models", insecure=True
    )
    assert tree(pulled) == tree(tmp_path / "b")


# --- the promoted_image asset ------------------------------------------------------


def promoted_lake(tmp_path: Path, version: str = VERSION) -> LocalLake:
    lake = LocalLake(tmp_path / "lake")
    registry = ModelRegistry(lake)
    registry.register(make_bundle(tmp_path / "bundles" / version, version=version))
    registry.promote(version, reason="test")
    return lake


def materialize(lake: LocalLake, resource: OciResource) -> dg.AssetMaterialization:
    result = dg.materialize(
        [promoted_image],
        resources={"lake": LakeResource(uri=lake.uri), "oci": resource},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    (event,) = result.asset_materializations_for_node("promoted_image")
    return event


@pytest.mark.slow
def test_promoted_image_pushes_production_to_the_registry(
    tmp_path: Path, oci_registry: OciRegistryServer
) -> None:
    lake = promoted_lake(tmp_path)
    settings = Settings(
        home=tmp_path / "home", oci_repository=oci_registry.repository(), oci_insecure=True
    )
    resource = OciResource.from_settings(settings)
    first = materialize(lake, resource)
    meta = {k: v.value for k, v in first.metadata.items()}
    digest = meta["digest"]
    assert meta["reference"] == f"oci://{oci_registry.repository()}@{digest}"
    assert meta["tag"] == f"{oci_registry.repository()}:{VERSION}"
    assert meta["target"] == "registry" and meta["layer_count"] == 4
    assert meta["annotations"]["org.opencontainers.image.version"] == VERSION
    assert meta["manifest_url"] == oci_registry.url(f"/v2/recsys/model/manifests/{digest}")
    assert first.tags["dagster/data_version"] == digest
    accept = {"Accept": oci.IMAGE_MANIFEST_MEDIA_TYPE}
    assert requests.get(meta["manifest_url"], headers=accept, timeout=10).status_code == 200

    second = materialize(lake, resource)  # idempotent
    assert second.metadata["digest"].value == digest
    assert second.metadata["uploaded_blobs"].value == 0

    pulled = pull_bundle(meta["reference"], tmp_path / "served", insecure=True)
    assert tree(pulled) == tree(tmp_path / "bundles" / VERSION)


def test_promoted_image_writes_the_layout_without_a_registry(tmp_path: Path) -> None:
    lake = promoted_lake(tmp_path)
    settings = Settings(home=tmp_path / "home")
    event = materialize(lake, OciResource.from_settings(settings))
    meta = {k: v.value for k, v in event.metadata.items()}
    layout = default_layout_dir(settings)
    assert layout == settings.resolved_home / "oci" / "recsys-model"
    assert meta["target"] == "oci-layout" and meta["layout_dir"] == str(layout)
    assert meta["reference"] == f"oci-layout://{layout}@{meta['digest']}"
    assert "oras cp --from-oci-layout" in meta["how_to_get_it"]
    oras.layout.Layout(str(layout))
    pulled = pull_bundle(meta["reference"], tmp_path / "served")
    assert tree(pulled) == tree(tmp_path / "bundles" / VERSION)


def test_promoted_image_fails_clearly_without_a_production_model(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    result = dg.materialize(
        [promoted_image],
        resources={
            "lake": LakeResource(uri=lake.uri),
            "oci": OciResource.from_settings(Settings(home=tmp_path / "home")),
        },
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no model has been promoted to production" in str(failure.event_specific_data)


def test_resource_hides_the_password_behind_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_OCI_PASSWORD", "hunter2")
    settings = Settings(oci_repository="r.example.com/recsys/model", oci_username="ci")
    resource = OciResource.from_settings(settings)
    assert isinstance(resource.password, dg.EnvVar)
    target = resource.target()
    assert target.access.credentials == OciCredentials("ci", "hunter2")
    assert target.kind == "registry"
