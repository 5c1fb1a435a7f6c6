"""The training bundle's hand-over between assets: ``recommender_model`` uploads the
bundle it wrote to the lake (manifest last, so a reader never sees half a bundle), the
evaluation and registration steps fetch it back as a verified local directory, and old
training bundles are pruned.

These copies only carry a bundle from one step (or process) to the next: the registry
keeps its own copy of every registered version (:mod:`recsys_serving.registry`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from recsys_assets.training import artifacts as art
from recsys_assets.training.names import RECOMMENDER
from recsys_serving.lake import Lake
from recsys_serving.model.bundle import MANIFEST, is_version, verify_bundle

KEEP_BUNDLES = 3  # training bundles kept for hand-over (the registry has its own copies)


def prune_bundles(lake: Lake, staging: Path | None, keep: int) -> list[str]:
    """Drop all but the newest ``keep`` training bundles (in the lake, and in
    ``staging`` when given).

    Every retraining writes one; the registry keeps its own copy of each registered
    version, so these are only the hand-over between assets and can go.
    """
    prefix = art.key(RECOMMENDER, "bundles/")
    versions = sorted(
        {o.key[len(prefix) :].split("/")[0] for o in lake.list(prefix) if o.key != prefix}
    )
    removed = [v for v in versions if is_version(v)][:-keep] if keep > 0 else []
    for version in removed:
        for obj in list(lake.list(f"{prefix}{version}/")):
            lake.delete(obj.key)
        local = lake.local_path(f"{prefix}{version}")
        if local is not None and local.exists():
            shutil.rmtree(local, ignore_errors=True)
    if staging is not None:
        staged = sorted(p for p in staging.iterdir() if p.is_dir() and is_version(p.name))
        for path in staged[:-keep] if keep > 0 else []:
            shutil.rmtree(path, ignore_errors=True)
    return removed


def upload_bundle(lake: Lake, bundle: Path) -> str:
    manifest = verify_bundle(bundle)
    prefix = art.key(RECOMMENDER, f"bundles/{manifest['version']}")
    for name in sorted(manifest["files"]):
        lake.put_bytes(f"{prefix}/{name}", (bundle / name).read_bytes())
    lake.put_bytes(f"{prefix}/{MANIFEST}", (bundle / MANIFEST).read_bytes())
    return prefix


def fetch_bundle(lake: Lake, version: str, dest_root: Path) -> Path:
    """The training bundle ``version`` (as ``recommender_model`` uploaded it), as a
    verified local directory: the lake's own copy when the lake is local, else a
    download under ``dest_root``."""
    prefix = art.key(RECOMMENDER, f"bundles/{version}")
    local = lake.local_path(prefix)
    if local is not None and local.exists():
        verify_bundle(local)
        return local
    target = dest_root / version
    if target.exists():
        shutil.rmtree(target)
    tmp = dest_root / f".{version}.download"
    shutil.rmtree(tmp, ignore_errors=True)
    manifest_bytes = lake.get_bytes(f"{prefix}/{MANIFEST}")
    for name in json.loads(manifest_bytes)["files"]:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lake.get_bytes(f"{prefix}/{name}"))
    (tmp / MANIFEST).write_bytes(manifest_bytes)
    verify_bundle(tmp)
    tmp.rename(target)
    return target
