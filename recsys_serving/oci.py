"""The model bundle as an OCI artifact: pushed to a registry, pulled back by digest.

A promoted model leaves the lake as an OCI artifact, in the spirit of KServe's model
cars: one layer per bundle file (its relative path as the layer title), an
``artifactType`` naming the recsys bundle format, and manifest annotations that say
what the model is (version, creation time, code revision, data version, metrics), so
``oras manifest fetch`` or a registry UI answers "which model is this?" without a
download. Registries already do content addressing, replication and access control;
deployments pin ``oci://host/repo@sha256:...`` and get exactly the bytes that were
evaluated, because every byte is checked against the digest on the way down.

The manifest is serialized canonically from the bundle's own ``manifest.json`` (no
clock, no random input), so pushing the same bundle twice gives the same digest, and
the same artifact can be written as an OCI image layout directory on a laptop
(:func:`write_layout`) and copied to a registry later (``oras cp --from-oci-layout``)
without changing its digest.

Transport goes through the ``oras`` client (blob uploads, chunked uploads, streamed
downloads, Bearer-token negotiation). This module adds what a deployment needs on top:
digest verification of the manifest and of every layer, atomic extraction followed by
:func:`~recsys_serving.model.bundle.verify_bundle`, short bounded retries with clear
errors instead of oras' minutes-long back-off, and HTTP Basic credentials sent up front.
Amazon ECR needs no credentials here: oras' ECR auth backend answers ECR's challenge
with a ``GetAuthorizationToken`` token (boto3, the usual AWS credential chain).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import oras.auth.utils
import oras.container
import oras.provider
import requests
from filelock import FileLock

from recsys_serving.lake import atomic_file, fsync_path
from recsys_serving.logging import get_logger
from recsys_serving.model.bundle import (
    MANIFEST,
    BundleError,
    file_digest,
    is_version,
    verify_bundle,
)
from recsys_serving.settings import Settings

log = get_logger(__name__)

ARTIFACT_TYPE = "application/vnd.recsys.model.bundle.v1+json"
IMAGE_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
BUNDLE_MANIFEST_MEDIA_TYPE = "application/vnd.recsys.model.manifest.v1+json"
# OCI 1.1 guidance for artifacts: an empty config, the type carried by artifactType.
EMPTY_CONFIG_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
_EMPTY_CONFIG_DESCRIPTOR = {
    "mediaType": EMPTY_CONFIG_MEDIA_TYPE,
    "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    "size": 2,
}
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"
DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the limit distribution registries enforce

_MEDIA_TYPES = {
    ".json": "application/json",
    ".txt": "text/plain",
    ".parquet": "application/vnd.apache.parquet",
    ".npy": "application/vnd.recsys.model.array.v1.npy",
    ".npz": "application/vnd.recsys.model.array.v1.npz",
}
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# The repository name grammar of the OCI distribution spec.
_REPO_PATH = re.compile(
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"
)
# The service Amazon ECR names in its Basic challenge; oras' ECR backend answers it.
ECR_SERVICE = "ecr.amazonaws.com"


# --- errors ------------------------------------------------------------------------


class OciError(Exception):
    """Anything that stops a push or pull; the message names the reference and the cause."""


class OciReferenceError(OciError, ValueError):
    """A reference that cannot be used: malformed, or a moving tag where a digest is due."""


class OciNotFound(OciError):
    """The registry (or layout) has no artifact or blob under that name or digest."""


class OciDigestMismatch(OciError):
    """Bytes that do not hash to the digest they were addressed by: tampering or corruption."""


class OciUnreachable(OciError):
    """The registry could not be reached (connection refused, DNS, timeout, 5xx)."""


class OciAuthError(OciError):
    """The registry wants credentials we do not have, or refused the ones we sent."""


# --- references and options --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OciCredentials:
    """Username and password (or token) for a registry; the password never appears in repr."""

    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True, slots=True)
class RegistryAccess:
    """How to talk to a registry: plain HTTP or not, and with which credentials.

    ``credentials=None`` means anonymous, except for Amazon ECR, whose challenge oras'
    ECR auth backend answers with a token from boto3 (the usual AWS credential chain).
    """

    insecure: bool = False
    credentials: OciCredentials | None = None
    timeout_seconds: float = 30.0
    attempts: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryAccess:
        credentials = None
        if settings.packaging.oci_username or settings.packaging.oci_password:
            if not (settings.packaging.oci_username and settings.packaging.oci_password):
                raise OciAuthError(
                    "RECSYS_OCI_USERNAME and RECSYS_OCI_PASSWORD must be set together"
                )
            credentials = OciCredentials(
                settings.packaging.oci_username, settings.packaging.oci_password
            )
        return cls(insecure=settings.packaging.oci_insecure, credentials=credentials)


@dataclass(frozen=True, slots=True)
class OciRef:
    """Where an artifact was published and what it is.

    ``reference`` is what a deployment pins: ``oci://host/repo@sha256:...`` for a
    registry, ``oci-layout:///abs/path@sha256:...`` for a layout directory.
    """

    reference: str
    digest: str
    repository: str
    tag: str
    version: str
    size: int  # bytes of layers + config + manifest
    layer_count: int
    annotations: dict[str, str]
    uploaded_blobs: int = 0  # 0 when every blob was already there (a repeated push)
    uploaded_bytes: int = 0

    @property
    def tagged(self) -> str:
        """The human-friendly (moving) name, for logs and UIs, never for deployments."""
        return f"{self.repository}:{self.tag}"


@dataclass(frozen=True, slots=True)
class ParsedReference:
    scheme: str  # "oci" (a registry) or "oci-layout" (a directory)
    location: str  # host[:port]/repo, or an absolute directory path
    tag: str | None
    digest: str | None


def parse_reference(reference: str) -> ParsedReference:
    """Split ``oci://host[:port]/repo[:tag][@sha256:hex]`` or ``oci-layout:///path[...]``."""
    scheme, sep, rest = reference.partition("://")
    if not sep or scheme not in ("oci", "oci-layout"):
        raise OciReferenceError(
            f"{reference!r}: expected oci://host[:port]/repo@sha256:<digest> "
            "(or oci-layout:///path@sha256:<digest>)"
        )
    rest, at, digest = rest.partition("@")
    if at and not _DIGEST.match(digest):
        raise OciReferenceError(f"{reference!r}: digest must be sha256:<64 lowercase hex>")
    head, slash, last = rest.rpartition("/")
    name, colon, tag = last.partition(":")
    if colon and not _TAG.match(tag):
        raise OciReferenceError(f"{reference!r}: invalid tag {tag!r}")
    location = f"{head}{slash}{name}"
    if scheme == "oci":
        split_repository(location, what=reference)
    elif not location.startswith("/"):
        raise OciReferenceError(f"{reference!r}: an oci-layout reference needs an absolute path")
    return ParsedReference(scheme, location, tag or None, digest or None)


def split_repository(repository: str, *, what: str | None = None) -> tuple[str, str]:
    """``host[:port]/path`` -> (host, path), checked against the distribution grammar."""
    host, slash, path = repository.partition("/")
    if not slash or not host or not _REPO_PATH.match(path):
        raise OciReferenceError(
            f"{what or repository!r}: expected host[:port]/repository with a lowercase "
            "repository path (e.g. 127.0.0.1:5000/recsys/model)"
        )
    return host, path


# --- the artifact ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layer:
    path: str  # relative path inside the bundle (also the layer title)
    source: Path
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "annotations": {TITLE: self.path},
        }


@dataclass(frozen=True, slots=True)
class Artifact:
    """A bundle as OCI content: the layers (files on disk) and the exact manifest bytes."""

    version: str
    layers: tuple[Layer, ...]
    annotations: dict[str, str]
    manifest: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers) + len(EMPTY_CONFIG) + len(self.manifest)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def media_type_for(path: str) -> str:
    if path == MANIFEST:
        return BUNDLE_MANIFEST_MEDIA_TYPE
    return _MEDIA_TYPES.get(PurePosixPath(path).suffix.lower(), "application/octet-stream")


def data_version(manifest: dict[str, Any]) -> str | None:
    """A short, stable identifier of the training data a bundle was built from.

    An explicit ``data_version`` (top level or inside ``data``) wins; otherwise the
    ``data`` block (partitions, rows, content hashes, window) is hashed canonically.
    """
    explicit = manifest.get("data_version")
    data = manifest.get("data")
    if explicit is None and isinstance(data, dict):
        explicit = data.get("version") or data.get("data_version")
    if explicit is not None:
        return str(explicit)
    if not data:
        return None
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def bundle_annotations(manifest: dict[str, Any]) -> dict[str, str]:
    """Manifest annotations (OCI standard keys where they fit, ``io.recsys.*`` otherwise)."""
    notes = {
        "org.opencontainers.image.title": "recsys model bundle",
        "org.opencontainers.image.description": (
            "Two-stage recommender (ALS retrieval + LightGBM lambdarank), recsys bundle format"
        ),
        "org.opencontainers.image.version": str(manifest["version"]),
        "io.recsys.model.format": str(manifest["format"]),
    }
    if manifest.get("created_at"):
        notes["org.opencontainers.image.created"] = str(manifest["created_at"])
    if manifest.get("code_sha"):
        notes["org.opencontainers.image.revision"] = str(manifest["code_sha"])
    if (version := data_version(manifest)) is not None:
        notes["io.recsys.model.data-version"] = version
    if manifest.get("index_version"):
        notes["io.recsys.model.index-version"] = str(manifest["index_version"])
    if isinstance(manifest.get("metrics"), dict):
        notes["io.recsys.model.metrics"] = json.dumps(
            manifest["metrics"], sort_keys=True, separators=(",", ":")
        )
    return notes


def build_artifact(bundle_dir: str | Path) -> Artifact:
    """Verify the bundle and describe it as OCI content (no network, no copies).

    Layer digests come straight from the verified checksums, so nothing is hashed twice.
    Layers are sorted by path and the manifest is serialized canonically: the same
    bundle always gives the same manifest bytes, hence the same digest.
    """
    root = Path(bundle_dir)
    manifest = verify_bundle(root)
    manifest_sha, manifest_size = file_digest(root / MANIFEST)
    entries = {name: (entry["sha256"], entry["size"]) for name, entry in manifest["files"].items()}
    entries[MANIFEST] = (manifest_sha, manifest_size)
    layers = tuple(
        Layer(name, root / name, media_type_for(name), f"sha256:{sha}", size)
        for name, (sha, size) in sorted(entries.items())
    )
    annotations = bundle_annotations(manifest)
    document = {
        "schemaVersion": 2,
        "mediaType": IMAGE_MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": dict(_EMPTY_CONFIG_DESCRIPTOR),
        "layers": [layer.descriptor() for layer in layers],
        "annotations": annotations,
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return Artifact(manifest["version"], layers, annotations, encoded)


# --- registry transport ------------------------------------------------------------


class _RegistryClient(oras.provider.Registry):
    """The oras client with the transport policy a pipeline and a server need.

    oras retries a failed request five times with back-off growing to minutes and
    answers Basic challenges by first trying a token exchange; here a registry that is
    down fails within seconds with :class:`OciUnreachable`, Basic credentials are sent
    as soon as the registry asks for them (and up front after that), and the rest is
    oras' own: Bearer challenges go through its token negotiation and Amazon ECR's
    through its ECR backend (a subclass of the token backend).
    """

    def __init__(self, host: str, access: RegistryAccess) -> None:
        super().__init__(hostname=host, insecure=access.insecure, auth_backend="ecr")
        self.host = host
        self.access = access
        self.credentials = access.credentials
        if self.credentials is not None:
            self.auth.set_basic_auth(self.credentials.username, self.credentials.password)
        self._authorization: str | None = None  # sent up front once a Basic challenge came

    def container(self, path: str, tag: str | None = None) -> oras.container.Container:
        container = oras.container.Container(f"{path.rpartition('/')[2]}:{tag or 'latest'}")
        namespace, _, name = path.rpartition("/")
        container.registry = self.host
        container.namespace = namespace or None
        container.repository = name
        return container

    def url(self, path: str) -> str:
        return f"{self.prefix}://{self.host}{path}"

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: Any,
        json_body: Any,
        stream: bool,
    ) -> requests.Response:
        headers = dict(headers)
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        elif self.auth.token:
            headers.update(self.auth.get_auth_header())
        delay = 0.25
        for attempt in range(1, self.access.attempts + 1):
            try:
                response = self.session.request(
                    method,
                    url,
                    data=data,
                    json=json_body,
                    headers=headers,
                    stream=stream,
                    verify=self._tls_verify,
                    timeout=(min(5.0, self.access.timeout_seconds), self.access.timeout_seconds),
                )
            except requests.exceptions.SSLError as exc:  # retrying cannot fix TLS
                hint = "" if self.access.insecure else " (plain-HTTP registry? RECSYS_OCI_INSECURE)"
                raise OciUnreachable(
                    f"TLS with OCI registry {self.host} failed{hint}: {exc}"
                ) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.access.attempts:
                    raise OciUnreachable(
                        f"cannot reach OCI registry {self.host} ({type(exc).__name__}: {exc})"
                    ) from exc
            else:
                if response.status_code < 500 or attempt == self.access.attempts:
                    if response.status_code >= 500:
                        raise OciUnreachable(
                            f"OCI registry {self.host} answered {method} {url} with HTTP "
                            f"{response.status_code}: {error_text(response)}"
                        )
                    return response
                response.close()
            log.warning("oci_retry", host=self.host, method=method, attempt=attempt)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable: the loop returns or raises")

    def do_request(  # type: ignore[override]
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        headers = dict(headers or {})
        response = self._send(method, url, headers, data, json, stream)
        if response.status_code != 401:
            if response.status_code == 403:
                raise OciAuthError(self._refused(method, url, response))
            return response
        challenge = response.headers.get("Www-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        response.close()
        if scheme == "basic" and self.credentials is not None:
            self._authorization = f"Basic {self.credentials.basic()}"
        elif scheme == "basic":
            self._authorization = self._ecr_authorization(response, challenge)
        elif scheme == "bearer":
            self.auth.token = None
            _, ok = self.auth.authenticate_request(response, {}, refresh=True)
            if not ok:
                raise OciAuthError(
                    f"OCI registry {self.host} asked for a token and none could be obtained "
                    "(check RECSYS_OCI_USERNAME / RECSYS_OCI_PASSWORD)"
                )
        else:
            raise OciAuthError(
                f"OCI registry {self.host} asked for unsupported authentication {challenge!r}"
            )
        response = self._send(method, url, headers, data, json, stream)
        if response.status_code in (401, 403):
            raise OciAuthError(self._refused(method, url, response))
        return response

    def _ecr_authorization(self, response: requests.Response, challenge: str) -> str:
        """The header oras' ECR backend makes from ECR's challenge (a GetAuthorizationToken
        call); any other Basic challenge needs credentials we were not given."""
        if oras.auth.utils.parse_auth_header(challenge).service != ECR_SERVICE:
            raise OciAuthError(
                f"OCI registry {self.host} requires credentials "
                "(set RECSYS_OCI_USERNAME and RECSYS_OCI_PASSWORD)"
            )
        try:
            headers, ok = self.auth.authenticate_request(response, {}, refresh=True)
        except Exception as exc:  # botocore raises many types; all mean "no token"
            raise OciAuthError(
                f"{self.host}: cannot get an ECR authorization token ({exc})"
            ) from exc
        if not ok or not headers.get("Authorization"):
            raise OciAuthError(f"{self.host}: ECR returned no authorization token")
        return str(headers["Authorization"])

    def _refused(self, method: str, url: str, response: requests.Response) -> str:
        who = "anonymous access" if self.credentials is None else "the credentials"
        return (
            f"OCI registry {self.host} refused {who} for {method} {url}: HTTP "
            f"{response.status_code} {error_text(response)}"
        )


def error_text(response: requests.Response) -> str:
    """The registry's own error message (distribution-spec JSON errors), shortened."""
    try:
        body = response.json()
        messages = [
            f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
            for e in body.get("errors", [])
            if isinstance(e, dict)
        ]
        if messages:
            return "; ".join(messages)[:500]
    except (ValueError, AttributeError):
        pass
    return (response.text or response.reason or "")[:500]


@contextmanager
def _client(host: str, access: RegistryAccess) -> Iterator[_RegistryClient]:
    client = _RegistryClient(host, access)
    try:
        yield client
    finally:
        client.session.close()


def push_bundle(
    bundle_dir: str | Path,
    repository: str,
    tag: str | None = None,
    *,
    insecure: bool = False,
    auth: OciCredentials | None = None,
    access: RegistryAccess | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> OciRef:
    """Push the bundle at ``bundle_dir`` to ``host[:port]/repo`` under ``tag``.

    ``tag`` defaults to the bundle version. The bundle is verified first; blobs the
    registry already has are not sent again (a repeated push uploads nothing and gives
    the same digest). Files larger than ``chunk_size`` are uploaded in chunks. Raises
    :class:`BundleError` for a bad bundle and an :class:`OciError` for the registry.
    """
    access = access or RegistryAccess(insecure=insecure, credentials=auth)
    split_repository(repository)  # a malformed name fails before any work
    artifact = build_artifact(bundle_dir)
    tag = tag or artifact.version
    if not _TAG.match(tag):
        raise OciReferenceError(f"{tag!r} is not a valid OCI tag")
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "config.json"
        config.write_bytes(EMPTY_CONFIG)
        blobs = [(layer.source, layer.descriptor()) for layer in artifact.layers]
        blobs.append((config, _EMPTY_CONFIG_DESCRIPTOR))
        uploaded_blobs, uploaded_bytes = _upload(
            repository, tag, blobs, artifact.manifest, access, chunk_size
        )
    ref = OciRef(
        reference=f"oci://{repository}@{artifact.digest}",
        digest=artifact.digest,
        repository=repository,
        tag=tag,
        version=artifact.version,
        size=artifact.size,
        layer_count=len(artifact.layers),
        annotations=artifact.annotations,
        uploaded_blobs=uploaded_blobs,
        uploaded_bytes=uploaded_bytes,
    )
    log.info("oci_pushed", reference=ref.reference, tag=tag, uploaded_bytes=uploaded_bytes)
    return ref


def _upload(
    repository: str,
    tag: str,
    blobs: list[tuple[Path, dict[str, Any]]],
    manifest: bytes,
    access: RegistryAccess,
    chunk_size: int,
) -> tuple[int, int]:
    """Send the blobs the registry lacks, then the manifest bytes under ``tag``; returns
    (blobs uploaded, bytes uploaded). The registry checks every blob against its digest."""
    host, path = split_repository(repository)
    digest = sha256_digest(manifest)
    uploaded_blobs = uploaded_bytes = 0
    with _client(host, access) as client:
        container = client.container(path, tag)
        for source, descriptor in blobs:
            if client.blob_exists(descriptor, container):
                continue
            try:
                if descriptor["size"] > chunk_size:
                    response = client.chunked_upload(
                        str(source), container, descriptor, chunk_size=chunk_size
                    )
                else:
                    response = client.put_upload(str(source), container, descriptor)
            except ValueError as exc:  # oras reports a refused upload session this way
                raise OciError(f"upload of {source.name} to {repository}: {exc}") from exc
            _expect(response, (201,), f"upload of {source.name} to {repository}")
            uploaded_blobs += 1
            uploaded_bytes += descriptor["size"]
        response = client.do_request(
            client.url(f"/v2/{path}/manifests/{tag}"),
            "PUT",
            data=manifest,
            headers={"Content-Type": IMAGE_MANIFEST_MEDIA_TYPE},
        )
        _expect(response, (201,), f"manifest push to {repository}:{tag}")
        uploaded_bytes += len(manifest)
        answered = response.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise OciDigestMismatch(
                f"{repository}:{tag}: registry stored the manifest as {answered}, expected {digest}"
            )
    return uploaded_blobs, uploaded_bytes


def _expect(response: requests.Response, statuses: tuple[int, ...], what: str) -> None:
    if response.status_code in statuses:
        return
    text = error_text(response)
    if response.status_code == 404:
        raise OciNotFound(f"{what}: HTTP 404 {text}")
    raise OciError(f"{what}: HTTP {response.status_code} {text}")


# --- OCI image layout (the embedded default) ----------------------------------------


def _atomic_write(target: Path, data: bytes) -> None:
    with atomic_file(target, sync_dir=False) as fh:
        fh.write(data)


def _atomic_copy(source: Path, target: Path) -> None:
    with atomic_file(target, sync_dir=False) as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, 1024 * 1024)


def write_layout(bundle_dir: str | Path, layout_dir: str | Path, tag: str | None = None) -> OciRef:
    """Write the bundle's artifact into an OCI image layout directory (``oci-layout``,
    ``index.json``, ``blobs/sha256/...``), tagged ``tag`` (default: the version).

    The embedded default of the ``promoted_image`` asset: the same digest-addressed
    artifact :func:`push_bundle` would send, kept on disk until a registry exists
    (``oras cp --from-oci-layout <dir>:<tag> <registry>/<repo>:<tag>``). Blobs are written
    atomically and shared between versions; ``index.json`` is replaced last, under a
    lock, so concurrent writers cannot lose each other's entries.
    """
    artifact = build_artifact(bundle_dir)
    tag = tag or artifact.version
    if not _TAG.match(tag):
        raise OciReferenceError(f"{tag!r} is not a valid OCI tag")
    root = Path(layout_dir).expanduser().absolute()
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    written = blob_count = 0
    with FileLock(str(root.parent / f".{root.name}.lock")):
        contents: list[tuple[str, int, Path | bytes]] = [
            (layer.digest, layer.size, layer.source) for layer in artifact.layers
        ]
        contents.append((sha256_digest(EMPTY_CONFIG), len(EMPTY_CONFIG), EMPTY_CONFIG))
        contents.append((artifact.digest, len(artifact.manifest), artifact.manifest))
        for digest, size, content in contents:
            target = blobs / digest.removeprefix("sha256:")
            if target.is_file() and target.stat().st_size == size:
                continue
            if isinstance(content, bytes):
                _atomic_write(target, content)
            else:
                _atomic_copy(content, target)
            written += size
            blob_count += 1
        layout_file = root / "oci-layout"
        if not layout_file.exists():
            _atomic_write(layout_file, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        index = _read_index(root)
        entries = [
            m
            for m in index.get("manifests", [])
            if (m.get("annotations") or {}).get(REF_NAME) != tag
        ]
        entries.append(
            {
                "mediaType": IMAGE_MANIFEST_MEDIA_TYPE,
                "artifactType": ARTIFACT_TYPE,
                "digest": artifact.digest,
                "size": len(artifact.manifest),
                "annotations": {REF_NAME: tag},
            }
        )
        index.update(
            schemaVersion=2,
            mediaType="application/vnd.oci.image.index.v1+json",
            manifests=entries,
        )
        _atomic_write(root / "index.json", json.dumps(index, indent=2).encode() + b"\n")
    ref = OciRef(
        reference=f"oci-layout://{root}@{artifact.digest}",
        digest=artifact.digest,
        repository=str(root),
        tag=tag,
        version=artifact.version,
        size=artifact.size,
        layer_count=len(artifact.layers),
        annotations=artifact.annotations,
        uploaded_blobs=blob_count,
        uploaded_bytes=written,
    )
    log.info("oci_layout_written", reference=ref.reference, tag=tag, written_bytes=written)
    return ref


def _read_index(root: Path) -> dict[str, Any]:
    path = root / "index.json"
    if not path.exists():
        return {}
    try:
        index = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise OciError(f"{path}: unreadable OCI layout index ({exc})") from exc
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        raise OciError(f"{path}: not an OCI image index")
    return index


def push_layout(
    layout_dir: str | Path,
    tag: str,
    repository: str,
    *,
    target_tag: str | None = None,
    insecure: bool = False,
    auth: OciCredentials | None = None,
    access: RegistryAccess | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> OciRef:
    """Copy the artifact tagged ``tag`` in a layout written by :func:`write_layout` to a
    registry, byte for byte (same manifest, same digest): the laptop-to-cluster step,
    equivalent to ``oras cp --from-oci-layout <dir>:<tag> <repository>:<tag>``."""
    access = access or RegistryAccess(insecure=insecure, credentials=auth)
    split_repository(repository)
    source = _LayoutSource(Path(layout_dir).expanduser().absolute())
    body, digest = source.manifest(tag)
    where = f"{source.where}:{tag}"
    if digest != sha256_digest(body):
        raise OciDigestMismatch(f"{where}: manifest bytes do not hash to {digest}")
    version, entries = _check_manifest(body, where)
    annotations = json.loads(body).get("annotations") or {}
    blobs = [
        (
            source._path(e.digest),
            {"mediaType": "application/octet-stream", "digest": e.digest, "size": e.size},
        )
        for e in entries
    ]
    blobs.append((source._path(_EMPTY_CONFIG_DESCRIPTOR["digest"]), _EMPTY_CONFIG_DESCRIPTOR))
    for blob_path, descriptor in blobs:
        if not blob_path.is_file():
            raise OciNotFound(f"{where}: blob {descriptor['digest']} is missing from the layout")
    pushed_tag = target_tag or tag
    uploaded_blobs, uploaded_bytes = _upload(
        repository, pushed_tag, blobs, body, access, chunk_size
    )
    ref = OciRef(
        reference=f"oci://{repository}@{digest}",
        digest=digest,
        repository=repository,
        tag=pushed_tag,
        version=version,
        size=sum(e.size for e in entries) + len(EMPTY_CONFIG) + len(body),
        layer_count=len(entries),
        annotations=dict(annotations),
        uploaded_blobs=uploaded_blobs,
        uploaded_bytes=uploaded_bytes,
    )
    log.info("oci_layout_pushed", source=where, reference=ref.reference)
    return ref


# --- pulling -----------------------------------------------------------------------


class _Source(Protocol):
    where: str

    def manifest(self, reference: str) -> tuple[bytes, str | None]:
        """(manifest bytes, the digest the source claims for them) by digest or tag."""
        ...

    def blob(self, digest: str) -> Iterator[bytes]:
        """The blob's bytes in chunks (unverified: the caller hashes them)."""
        ...


class _RegistrySource:
    def __init__(self, client: _RegistryClient, path: str) -> None:
        self.client = client
        self.path = path
        self.where = f"{client.host}/{path}"

    def manifest(self, reference: str) -> tuple[bytes, str | None]:
        url = self.client.url(f"/v2/{self.path}/manifests/{reference}")
        response = self.client.do_request(
            url, "GET", headers={"Accept": IMAGE_MANIFEST_MEDIA_TYPE}, stream=True
        )
        with response:
            if response.status_code == 404:
                raise OciNotFound(
                    f"{self.where}: no artifact {reference} in the registry "
                    f"({error_text(response)})"
                )
            _expect(response, (200,), f"manifest {self.where}@{reference}")
            body = _read_limited(response.iter_content(64 * 1024), MAX_MANIFEST_BYTES)
            return body, response.headers.get("Docker-Content-Digest")

    def blob(self, digest: str) -> Iterator[bytes]:
        url = self.client.url(f"/v2/{self.path}/blobs/{digest}")
        response = self.client.do_request(url, "GET", stream=True)
        with response:
            if response.status_code == 404:
                raise OciNotFound(f"{self.where}: blob {digest} is missing from the registry")
            _expect(response, (200,), f"blob {self.where}@{digest}")
            yield from response.iter_content(1024 * 1024)


class _LayoutSource:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)
        if not (root / "oci-layout").is_file():
            raise OciNotFound(f"{root}: not an OCI image layout (no oci-layout file)")

    def _path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def manifest(self, reference: str) -> tuple[bytes, str | None]:
        digest = reference
        if not _DIGEST.match(reference):
            matches = [
                m["digest"]
                for m in _read_index(self.root).get("manifests", [])
                if (m.get("annotations") or {}).get(REF_NAME) == reference
            ]
            if not matches:
                raise OciNotFound(f"{self.root}: no tag {reference!r} in index.json")
            digest = matches[-1]
        path = self._path(digest)
        if not path.is_file():
            raise OciNotFound(f"{self.root}: no artifact {digest}")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise OciError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        return path.read_bytes(), digest

    def blob(self, digest: str) -> Iterator[bytes]:
        path = self._path(digest)
        if not path.is_file():
            raise OciNotFound(f"{self.root}: blob {digest} is missing")
        with open(path, "rb") as fh:
            while chunk := fh.read(1024 * 1024):
                yield chunk


def _read_limited(chunks: Iterator[bytes], limit: int) -> bytes:
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise OciError(f"manifest larger than {limit} bytes: refused")
    return bytes(body)


@dataclass(frozen=True, slots=True)
class _Entry:
    path: str
    digest: str
    size: int


def _check_manifest(body: bytes, where: str) -> tuple[str, list[_Entry]]:
    """Parse a pulled manifest and return (version, layers), refusing anything that is
    not a recsys bundle or whose layer titles could escape the destination."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise OciError(f"{where}: manifest is not JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("mediaType") != IMAGE_MANIFEST_MEDIA_TYPE:
        raise OciError(f"{where}: not an OCI image manifest")
    if document.get("artifactType") != ARTIFACT_TYPE:
        raise OciError(
            f"{where}: artifactType {document.get('artifactType')!r} is not a recsys model "
            f"bundle ({ARTIFACT_TYPE})"
        )
    version = (document.get("annotations") or {}).get("org.opencontainers.image.version")
    if not isinstance(version, str) or not is_version(version):
        raise OciError(f"{where}: missing or invalid model version annotation {version!r}")
    entries: list[_Entry] = []
    seen: set[str] = set()
    for layer in document.get("layers") or []:
        title = (layer.get("annotations") or {}).get(TITLE)
        digest, size = layer.get("digest"), layer.get("size")
        pure = PurePosixPath(title) if isinstance(title, str) else None
        if (
            pure is None
            or not title
            or pure.is_absolute()
            or ".." in pure.parts
            or "\\" in title
            or pure.as_posix() != title
            or title in seen
        ):
            raise OciError(f"{where}: layer title {title!r} is not a safe relative path")
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise OciError(f"{where}: layer {title} has an unsupported digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OciError(f"{where}: layer {title} has an invalid size {size!r}")
        seen.add(title)
        entries.append(_Entry(title, digest, size))
    if MANIFEST not in seen:
        raise OciError(f"{where}: no {MANIFEST} layer: not a recsys bundle")
    return version, entries


def pull_bundle(
    reference: str,
    dest: str | Path,
    *,
    allow_tag: bool = False,
    insecure: bool = False,
    auth: OciCredentials | None = None,
    access: RegistryAccess | None = None,
) -> Path:
    """Fetch the artifact at ``reference`` into ``dest/<version>`` and verify it.

    ``reference`` is ``oci://host[:port]/repo@sha256:<digest>`` (or an
    ``oci-layout:///dir@sha256:...`` written by :func:`write_layout`). The manifest
    must hash to the digest, every layer to its descriptor's digest and size, and the
    extracted directory must pass :func:`verify_bundle` before it is renamed into place,
    so ``dest/<version>`` is either absent or a complete, verified bundle. A tag-only
    reference is refused unless ``allow_tag`` (a moving tag is not a reproducible
    deployment). Pulling again is cheap: an existing identical bundle is returned as is.
    """
    parsed = parse_reference(reference)
    if parsed.digest is None and not allow_tag:
        raise OciReferenceError(
            f"{reference!r}: pin a digest (…@sha256:<digest>); a tag can move, so deploying "
            "by tag is not reproducible (pass allow_tag=True to resolve it anyway)"
        )
    target_ref = parsed.digest or parsed.tag or "latest"
    if parsed.scheme == "oci-layout":
        return _pull(_LayoutSource(Path(parsed.location)), target_ref, parsed.digest, dest)
    host, path = split_repository(parsed.location)
    access = access or RegistryAccess(insecure=insecure, credentials=auth)
    with _client(host, access) as client:
        return _pull(_RegistrySource(client, path), target_ref, parsed.digest, dest)


def _pull(source: _Source, target_ref: str, pinned: str | None, dest: str | Path) -> Path:
    body, claimed = source.manifest(target_ref)
    actual = sha256_digest(body)
    expected = pinned or claimed or actual
    where = f"{source.where}@{expected}"
    if actual != expected:
        raise OciDigestMismatch(
            f"{where}: manifest bytes hash to {actual}: refused (tampered or corrupt)"
        )
    version, entries = _check_manifest(body, where)
    dest_root = Path(dest).expanduser().absolute()
    target = dest_root / version
    manifest_layer = next(e for e in entries if e.path == MANIFEST)
    if target.exists():
        return _reuse(target, manifest_layer, where)
    dest_root.mkdir(parents=True, exist_ok=True)
    staging = dest_root / f".{version}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir()
    try:
        for entry in entries:
            _download(source, entry, staging / entry.path, where)
        try:
            manifest = verify_bundle(staging)
        except BundleError as exc:
            raise BundleError(f"{where}: pulled content is not a valid bundle: {exc}") from exc
        if manifest["version"] != version:
            raise OciError(
                f"{where}: annotated version {version} but the bundle says {manifest['version']}"
            )
        for dirpath, _dirs, _files in os.walk(staging):
            fsync_path(Path(dirpath))
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():  # another worker won the race: use its copy
                return _reuse(target, manifest_layer, where)
            raise
        fsync_path(dest_root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("oci_pulled", source=where, version=version, path=str(target))
    return target


def _reuse(target: Path, manifest_layer: _Entry, where: str) -> Path:
    """An existing ``dest/<version>`` is the same bundle iff it verifies and its
    manifest.json (which checksums every other file) matches the pulled layer."""
    verify_bundle(target)
    sha, _ = file_digest(target / MANIFEST)
    if f"sha256:{sha}" != manifest_layer.digest:
        raise OciError(
            f"{where}: {target} already holds a different bundle of the same version; "
            "remove it or pull into another directory"
        )
    return target


def _download(source: _Source, entry: _Entry, target: Path, where: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as fh:
        for chunk in source.blob(entry.digest):
            size += len(chunk)
            if size > entry.size:
                raise OciDigestMismatch(
                    f"{where}: layer {entry.path} is larger than its declared {entry.size} bytes"
                )
            digest.update(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    actual = "sha256:" + digest.hexdigest()
    if size != entry.size or actual != entry.digest:
        raise OciDigestMismatch(
            f"{where}: layer {entry.path} hashes to {actual} ({size} bytes), "
            f"expected {entry.digest} ({entry.size} bytes): refused (tampered or corrupt)"
        )


def is_oci_reference(value: str) -> bool:
    """Whether a model source string names an OCI artifact rather than a lake version."""
    return value.startswith(("oci://", "oci-layout://"))
