"""The bundle format: atomic writes, checksums, precise refusals."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys_serving.model.bundle import (
    BUNDLE_FORMAT,
    MANIFEST,
    BundleError,
    BundleWriter,
    code_sha,
    new_version,
    read_manifest,
    verify_bundle,
)


def write_bundle(target: Path, version: str | None = None) -> dict[str, Any]:
    with BundleWriter(target, version=version) as w:
        (w.path / "ranker.txt").write_text("tree\n")
        np.save(w.path / "factors.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
        (w.path / "index").mkdir()
        (w.path / "index" / "items.json").write_text('["a", "b"]')
        w.manifest.update(
            seed=7,
            params={"factors": np.int64(4), "lr": np.float32(0.5)},
            metrics={"ndcg@10": np.float64(0.25), "bad": float("nan")},
            feature_names=("a", "b"),
        )
    return w.manifest


def test_new_version_is_sortable_and_unique() -> None:
    a = new_version(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    b = new_version(datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert re.fullmatch(r"v20260102030405-[0-9a-f]{8}", a)
    assert a < b
    assert len({new_version() for _ in range(200)}) == 200


def test_writer_produces_a_verified_bundle(tmp_path: Path) -> None:
    target = tmp_path / "bundles" / "m1"
    manifest = write_bundle(target)
    assert verify_bundle(target) == manifest == read_manifest(target)
    assert manifest["format"] == BUNDLE_FORMAT
    assert set(manifest["files"]) == {"ranker.txt", "factors.npy", "index/items.json"}
    assert manifest["files"]["ranker.txt"]["size"] == 5
    assert manifest["params"] == {"factors": 4, "lr": 0.5}
    assert manifest["metrics"] == {"ndcg@10": 0.25, "bad": None}  # strict JSON on disk
    assert manifest["feature_names"] == ["a", "b"]
    assert manifest["code_sha"] == code_sha() and manifest["created_at"]
    json.loads((target / MANIFEST).read_text())
    assert [p.name for p in target.parent.iterdir()] == ["m1"]  # no temp dir left


def test_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), BundleWriter(tmp_path / "m") as w:
        (w.path / "x.npy").write_bytes(b"123")
        raise RuntimeError("training crashed")
    assert list(tmp_path.iterdir()) == []


def test_unserializable_manifest_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="object"), BundleWriter(tmp_path / "m") as w:
        w.manifest["thing"] = object()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    write_bundle(tmp_path / "m")
    with pytest.raises(BundleError, match="refusing to overwrite"), BundleWriter(tmp_path / "m"):
        pass
    verify_bundle(tmp_path / "m")


def test_refuses_bad_version_and_caller_manifest_and_symlinks(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="invalid version"):
        BundleWriter(tmp_path / "m", version="../evil")
    with pytest.raises(BundleError, match=r"fill w\.manifest"), BundleWriter(tmp_path / "m") as w:
        (w.path / MANIFEST).write_text("{}")
    (tmp_path / "outside.txt").write_text("x")
    with pytest.raises(BundleError, match="symlinks"), BundleWriter(tmp_path / "m") as w:
        (w.path / "link.txt").symlink_to(tmp_path / "outside.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.txt"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: (b / "ranker.txt").write_text("tre"), r"ranker\.txt: size 3 bytes.*truncated"),
        (lambda b: (b / "ranker.txt").write_text("TREE\n"), r"ranker\.txt: sha256 mismatch"),
        (lambda b: (b / "index" / "items.json").unlink(), r"items\.json: listed .* missing"),
        (lambda b: (b / "extra.bin").write_bytes(b"1"), r"extra\.bin: not listed"),
        (lambda b: (b / MANIFEST).unlink(), r"manifest\.json: missing"),
        (lambda b: (b / MANIFEST).write_text("{not json"), r"manifest\.json: not valid JSON"),
    ],
)
def test_damaged_bundles_are_refused_precisely(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    target = tmp_path / "m"
    write_bundle(target)
    damage(target)
    with pytest.raises(BundleError, match=message):
        verify_bundle(target)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format=99), r"unknown bundle format 99"),
        (lambda m: m.pop("format"), r"unknown bundle format None"),
        (lambda m: m.update(version="latest"), r"invalid or missing version 'latest'"),
        (lambda m: m.update(files=["a"]), r"'files' must be an object"),
        (lambda m: m["files"].update({"../x": {"sha256": "0", "size": 1}}), r"invalid file"),
        (lambda m: m["files"].update({"x": {"sha256": "0"}}), r"'x' needs 'sha256' and 'size'"),
    ],
)
def test_bad_manifests_are_refused(
    tmp_path: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    target = tmp_path / "m"
    write_bundle(target)
    manifest = json.loads((target / MANIFEST).read_text())
    edit(manifest)
    (target / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        verify_bundle(target)


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_code_sha_is_the_commit_marked_dirty_else_the_package_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Provenance must name the code that trained a bundle: the commit when the source is
    a git checkout (with ``-dirty`` when tracked files differ), the installed version
    otherwise; "unknown" is only for a source that is neither."""
    from importlib.metadata import version

    from recsys_serving.model import bundle

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above
    checkout = tmp_path / "checkout"
    module = checkout / "recsys_serving" / "model" / "bundle.py"  # where code_sha looks
    module.parent.mkdir(parents=True)
    module.write_text("# v1\n")
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "-q", "-m", "v1")
    head = _git(checkout, "rev-parse", "HEAD")
    monkeypatch.setattr(bundle, "__file__", str(module))
    sha = code_sha.__wrapped__  # uncached: the process's own answer is cached for good
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert sha() == head
    module.write_text("# v1, edited\n")
    assert sha() == f"{head}-dirty"
    shutil.rmtree(checkout / ".git")
    assert sha() == f"{version('recsys')}+unknown"
