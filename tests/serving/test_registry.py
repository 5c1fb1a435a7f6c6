"""The model registry on a local lake and on S3 (moto_server), and the promotion rule."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from recsys_serving import registry as registry_module
from recsys_serving.lake import LocalLake, S3Lake, open_lake
from recsys_serving.layout import CANDIDATE, PRODUCTION
from recsys_serving.model.bundle import (
    MANIFEST,
    BundleError,
    BundleWriter,
    new_version,
    verify_bundle,
)
from recsys_serving.registry import (
    AliasConflict,
    ModelRegistry,
    NothingToRollBack,
    PromotionRule,
    RegistryError,
    UnknownVersion,
    decide_promotion,
)
from recsys_serving.settings import Settings
from support import S3Server, moto_s3  # noqa: F401  (fixture)


def make_bundle(
    root: Path, *, metric: float = 0.2, payload: bytes = b"ranker", seconds: int = 0
) -> Path:
    """A tiny real bundle: a few files in two directories."""
    version_time = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    version = new_version(version_time)
    with BundleWriter(root / version, version=version) as w:
        (w.path / "ranker.txt").write_bytes(payload)
        (w.path / "index").mkdir()
        (w.path / "index" / "items.json").write_text('["a", "b", "c"]')
        w.manifest.update(metrics={"ndcg@10": metric, "recall@10": 0.3}, seed=1)
    return root / version


@pytest.fixture(params=["local", "s3"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> ModelRegistry:
    if request.param == "local":
        return ModelRegistry(LocalLake(tmp_path / "lake"))
    server: S3Server = request.getfixturevalue("moto_s3")
    lake = open_lake(
        f"s3://{server.bucket}/reg-{uuid.uuid4().hex[:8]}", endpoint_url=server.endpoint_url
    )
    assert isinstance(lake, S3Lake)
    return ModelRegistry(lake)


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    root = tmp_path / "bundles"
    root.mkdir()
    return root


def test_register_get_list_and_idempotence(registry: ModelRegistry, bundles: Path) -> None:
    b1 = make_bundle(bundles, metric=0.2, seconds=1)
    b2 = make_bundle(bundles, metric=0.3, seconds=2, payload=b"ranker-2")
    assert registry.versions() == [] and registry.alias(PRODUCTION) is None
    mv = registry.register(b1, tags={"run_id": "r1"})
    assert mv.version == b1.name and mv.tags == {"run_id": "r1"}
    assert mv.metrics["ndcg@10"] == 0.2 and mv.created_at is not None
    assert set(mv.files) == {"ranker.txt", "index/items.json"}
    assert mv.registered_at is not None
    registry.register(b2)
    assert [v.version for v in registry.versions()] == [b1.name, b2.name]
    assert registry.exists(b1.name) and not registry.exists("v20990101000000-00000000")
    assert registry.exists("../etc") is False
    assert registry.register(b1).version == b1.name  # idempotent
    with pytest.raises(UnknownVersion, match="not registered"):
        registry.get("v20990101000000-00000000")
    with pytest.raises(UnknownVersion, match="not a model version"):
        registry.get("latest")


def test_same_version_with_other_files_is_refused(registry: ModelRegistry, bundles: Path) -> None:
    b1 = make_bundle(bundles)
    registry.register(b1)
    other = bundles / "other"
    with BundleWriter(other, version=b1.name) as w:
        (w.path / "ranker.txt").write_bytes(b"different")
    with pytest.raises(RegistryError, match="already registered with different files"):
        registry.register(other)


def test_register_refuses_a_damaged_bundle(registry: ModelRegistry, bundles: Path) -> None:
    b1 = make_bundle(bundles)
    (b1 / "ranker.txt").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"ranker\.txt: size"):
        registry.register(b1)
    assert registry.versions() == []


def test_crash_during_register_leaves_no_version_and_aliases_untouched(
    registry: ModelRegistry, bundles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = make_bundle(bundles, seconds=1)
    registry.register(good)
    registry.promote(good.name, reason="first model")
    before = registry.alias(PRODUCTION)
    crashing = make_bundle(bundles, seconds=2, payload=b"new ranker")
    real_put = registry_module._put_file
    calls: list[str] = []

    def crash_on_second(lake: Any, key: str, source: Path) -> None:
        calls.append(key)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real_put(lake, key, source)

    monkeypatch.setattr(registry_module, "_put_file", crash_on_second)
    with pytest.raises(OSError, match="injected"):
        registry.register(crashing)
    assert len(calls) == 2  # one file made it, the manifest never did
    assert [v.version for v in registry.versions()] == [good.name]
    assert not registry.exists(crashing.name)
    with pytest.raises(UnknownVersion):
        registry.get(crashing.name)
    assert registry.alias(PRODUCTION) == before
    with pytest.raises(UnknownVersion):
        registry.set_alias(PRODUCTION, crashing.name, reason="try")
    monkeypatch.setattr(registry_module, "_put_file", real_put)
    assert registry.register(crashing).version == crashing.name  # re-run completes it
    assert registry.alias(PRODUCTION) == before


def test_aliases_promote_candidate_and_rollback(registry: ModelRegistry, bundles: Path) -> None:
    v1, v2, v3 = (registry.register(make_bundle(bundles, seconds=s)).version for s in (1, 2, 3))
    with pytest.raises(NothingToRollBack, match="no previous version"):
        registry.rollback(reason="nothing yet")
    first = registry.promote(v1, reason="first model", evidence={"ndcg@10": 0.2})
    assert (first.alias, first.version, first.previous, first.action) == (
        PRODUCTION,
        v1,
        None,
        "set",
    )
    prod = registry.alias(PRODUCTION)
    assert prod is not None and prod.share == 1.0 and prod.evidence == {"ndcg@10": 0.2}

    registry.set_alias(CANDIDATE, v2, reason="canary", share=0.1)
    cand = registry.alias(CANDIDATE)
    assert cand is not None and (cand.version, cand.share) == (v2, 0.1)
    # rollback with a candidate running stops the phase-in, production untouched
    event = registry.rollback(reason="canary lost")
    assert (event.alias, event.action, event.previous) == (CANDIDATE, "clear", v2)
    assert registry.alias(CANDIDATE) is None and registry.alias(PRODUCTION) == prod
    with pytest.raises(NothingToRollBack, match="'candidate' is not set"):
        registry.rollback(reason="again", alias=CANDIDATE)

    # promoting the candidate's version clears the candidate
    registry.set_alias(CANDIDATE, v2, reason="canary", share=0.5)
    registry.promote(v2, reason="canary won")
    assert registry.alias(CANDIDATE) is None
    registry.promote(v3, reason="better again")
    state = registry.alias(PRODUCTION)
    assert state is not None and (state.version, state.previous) == (v3, v2)

    # production rollbacks walk back through the versions, then refuse
    assert registry.rollback(reason="bad", alias=PRODUCTION).version == v2
    assert registry.rollback(reason="still bad").version == v1
    with pytest.raises(NothingToRollBack, match="no previous version"):
        registry.rollback(reason="nothing left")
    assert registry.alias(PRODUCTION).version == v1  # type: ignore[union-attr]

    events = registry.history()
    assert [e.reason for e in events[:3]] == ["still bad", "bad", "better again"]
    assert all(a.at >= b.at for a, b in itertools.pairwise(events))
    assert len(registry.history(limit=2)) == 2
    assert {e.alias for e in registry.history(alias=CANDIDATE)} == {CANDIDATE}
    cleared = [e for e in events if e.action == "clear"]
    assert [e.reason for e in cleared] == ["promoted to production: canary won", "canary lost"]
    assert set(registry.aliases()) == {PRODUCTION}


def test_set_alias_validation(registry: ModelRegistry, bundles: Path) -> None:
    v1 = registry.register(make_bundle(bundles)).version
    with pytest.raises(UnknownVersion):
        registry.set_alias(PRODUCTION, "v20990101000000-00000000", reason="x")
    with pytest.raises(RegistryError, match="needs a share"):
        registry.set_alias(CANDIDATE, v1, reason="x")
    with pytest.raises(RegistryError, match=r"share must be in \(0, 1\]"):
        registry.set_alias(CANDIDATE, v1, reason="x", share=1.5)
    with pytest.raises(RegistryError, match=r"production always serves share 1\.0"):
        registry.set_alias(PRODUCTION, v1, reason="x", share=0.5)
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.set_alias(PRODUCTION, v1, reason=" ")
    with pytest.raises(RegistryError, match="invalid alias name"):
        registry.set_alias("../prod", v1, reason="x")
    assert registry.history() == []


def test_compare_and_set(registry: ModelRegistry, bundles: Path) -> None:
    v1, v2 = (registry.register(make_bundle(bundles, seconds=s)).version for s in (1, 2))
    registry.set_alias(PRODUCTION, v1, reason="first", expected=None)
    with pytest.raises(AliasConflict, match=f"points to {v1}, expected nothing"):
        registry.set_alias(PRODUCTION, v2, reason="racing", expected=None)
    with pytest.raises(AliasConflict, match=f"points to {v1}, expected {v2}"):
        registry.set_alias(PRODUCTION, v2, reason="racing", expected=v2)
    registry.set_alias(PRODUCTION, v2, reason="ok", expected=v1)
    assert registry.alias(PRODUCTION).version == v2  # type: ignore[union-attr]
    with pytest.raises(AliasConflict):
        registry.clear_alias(PRODUCTION, reason="x", expected=v1)
    assert len(registry.history()) == 2


def test_compare_and_set_from_racing_threads(tmp_path: Path, bundles: Path) -> None:
    """Writers that each read the alias then move it with expected=<what they read>:
    the lock makes every accepted move build on the one before (no lost update)."""
    reg = ModelRegistry(LocalLake(tmp_path / "lake"))
    versions = [reg.register(make_bundle(bundles, seconds=s)).version for s in (1, 2)]
    reg.promote(versions[0], reason="first")
    accepted: list[int] = []
    conflicts: list[int] = []

    def writer(n: int) -> None:
        # Separate registries, as separate workers would have.
        mine = ModelRegistry(LocalLake(tmp_path / "lake"))
        for i in range(15):
            seen = mine.alias(PRODUCTION)
            assert seen is not None
            target = versions[(i + n) % 2]
            try:
                mine.set_alias(PRODUCTION, target, reason=f"w{n}-{i}", expected=seen.version)
                accepted.append(n)
            except AliasConflict:
                conflicts.append(n)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    final = reg.alias(PRODUCTION)
    assert final is not None and final.seq == 1 + len(accepted)
    events = reg.history(limit=1000)
    assert len(events) == 1 + len(accepted)
    assert sorted(e.seq for e in events) == list(range(1, len(events) + 1))
    # each accepted move's "previous" is the version the move before it set
    chain = sorted(events, key=lambda e: e.seq)
    assert all(b.previous == a.version for a, b in itertools.pairwise(chain))


def test_s3_alias_write_is_conditional(moto_s3: S3Server, bundles: Path) -> None:  # noqa: F811
    """Two writers that read the same alias: the second conditional PUT is refused."""
    lake = open_lake(
        f"s3://{moto_s3.bucket}/cas-{uuid.uuid4().hex[:8]}", endpoint_url=moto_s3.endpoint_url
    )
    reg = ModelRegistry(lake)
    v1, v2 = (reg.register(make_bundle(bundles, seconds=s)).version for s in (1, 2))
    reg.set_alias(PRODUCTION, v1, reason="first")
    objects = reg._aliases
    _, stale_token = objects.read(reg.alias_key(PRODUCTION))
    reg.set_alias(PRODUCTION, v2, reason="the other writer")
    with pytest.raises(AliasConflict, match="changed while it was being moved"):
        objects.write(reg.alias_key(PRODUCTION), b"{}", stale_token, existed=True)
    with pytest.raises(AliasConflict):
        objects.write(reg.alias_key(PRODUCTION), b"{}", None, existed=False)
    assert reg.alias(PRODUCTION).version == v2  # type: ignore[union-attr]


def test_readers_never_see_a_missing_or_torn_alias(registry: ModelRegistry, bundles: Path) -> None:
    versions = [registry.register(make_bundle(bundles, seconds=s)).version for s in (1, 2, 3)]
    registry.promote(versions[0], reason="first")
    registry.set_alias(CANDIDATE, versions[1], reason="canary", share=0.1)
    stop = threading.Event()
    seen: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def poll() -> None:
        while not stop.is_set():
            try:
                prod = registry.alias(PRODUCTION)
                assert prod is not None and prod.version in versions and prod.share == 1.0
                seen.append((PRODUCTION, prod.version))
            except BaseException as exc:  # reported to the main thread
                errors.append(exc)
                return

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(20):
            registry.promote(versions[i % 3], reason=f"move {i}")
            registry.set_alias(CANDIDATE, versions[(i + 1) % 3], reason="c", share=0.2)
    finally:
        stop.set()
        reader.join(timeout=30)
    assert not errors, errors
    assert len(seen) > 10 and {v for _, v in seen} > {versions[0]}


def test_fetch_is_verified_and_idempotent(
    registry: ModelRegistry, bundles: Path, tmp_path: Path
) -> None:
    source = make_bundle(bundles)
    version = registry.register(source).version
    cache = tmp_path / "cache"
    path = registry.fetch(version, cache)
    assert path == cache / version
    assert verify_bundle(path) == verify_bundle(source)
    assert (path / MANIFEST).read_bytes() == (source / MANIFEST).read_bytes()
    assert registry.fetch(version, cache) == path
    (path / "ranker.txt").write_bytes(b"rotten")  # a damaged cache copy is replaced
    assert verify_bundle(registry.fetch(version, cache))["version"] == version
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [version]
    with pytest.raises(UnknownVersion):
        registry.fetch("v20990101000000-00000000", cache)


def test_fetch_refuses_a_corrupt_registry_copy(tmp_path: Path, bundles: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    reg = ModelRegistry(lake)
    version = reg.register(make_bundle(bundles)).version
    lake.put_bytes(reg.model_key(version, "ranker.txt"), b"bitrot")
    with pytest.raises(BundleError, match=r"ranker\.txt"):
        reg.fetch(version, tmp_path / "cache")
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


FETCH_SCRIPT = """
import sys
from recsys_serving.lake import open_lake
from recsys_serving.registry import ModelRegistry
lake = open_lake(sys.argv[1], sys.argv[2] or None)
print(ModelRegistry(lake).fetch(sys.argv[3], sys.argv[4]))
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_fetch_from_two_processes(
    where: str, request: pytest.FixtureRequest, tmp_path: Path, bundles: Path
) -> None:
    if where == "s3":
        server: S3Server = request.getfixturevalue("moto_s3")
        uri, endpoint = f"s3://{server.bucket}/f-{uuid.uuid4().hex[:8]}", server.endpoint_url
    else:
        uri, endpoint = str(tmp_path / "lake"), ""
    reg = ModelRegistry(open_lake(uri, endpoint or None))
    version = reg.register(make_bundle(bundles, payload=b"x" * 3_000_000)).version
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH_SCRIPT, uri, endpoint, version, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert {out.strip().splitlines()[-1] for out, _ in outputs} == {str(cache / version)}
    logs = "".join(out + err for out, err in outputs)
    assert logs.count("registry.fetch ") + logs.count('"registry.fetch"') == 1  # one download
    verify_bundle(cache / version)
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [version]


# --- the promotion rule -------------------------------------------------------------

RULE = PromotionRule(metric="ndcg@10", min_lift=0.02, guardrails={"recall@10": 0.05})
NAN = math.nan


@pytest.mark.parametrize(
    ("challenger", "production", "promote", "reason"),
    [
        ({"ndcg@10": 0.30, "recall@10": 0.5}, None, True, "first model"),
        ({"ndcg@10": 0.30, "recall@10": 0.5}, {"ndcg@10": 0.25, "recall@10": 0.5}, True, "+20.0%"),
        ({"ndcg@10": 0.20, "recall@10": 0.5}, {"ndcg@10": 0.25, "recall@10": 0.5}, False, "-20.0%"),
        # within the margin: +1% < 2%
        ({"ndcg@10": 0.2525, "recall@10": 0.5}, {"ndcg@10": 0.25, "recall@10": 0.5}, False, "by"),
        # exactly the margin is enough
        ({"ndcg@10": 0.255, "recall@10": 0.5}, {"ndcg@10": 0.25, "recall@10": 0.5}, True, "+2.0%"),
        # guardrail breach: recall falls 10% > 5% although ndcg wins
        (
            {"ndcg@10": 0.40, "recall@10": 0.45},
            {"ndcg@10": 0.25, "recall@10": 0.5},
            False,
            "guardrail recall@10 dropped 10.0%",
        ),
        # a guardrail drop within tolerance is fine
        ({"ndcg@10": 0.40, "recall@10": 0.48}, {"ndcg@10": 0.25, "recall@10": 0.5}, True, "+60"),
        ({"ndcg@10": NAN, "recall@10": 0.5}, None, False, "challenger has no finite ndcg@10"),
        ({"recall@10": 0.5}, {"ndcg@10": 0.25}, False, "challenger has no finite ndcg@10"),
        ({"ndcg@10": 0.3, "recall@10": 0.5}, {"ndcg@10": NAN}, False, "production has no finite"),
        (
            {"ndcg@10": 0.3, "recall@10": NAN},
            {"ndcg@10": 0.2, "recall@10": 0.5},
            False,
            "guardrail recall@10 missing or not finite for the challenger",
        ),
        ({"ndcg@10": 0.3, "recall@10": 0.5}, {"ndcg@10": 0.0, "recall@10": 0.5}, True, "from 0"),
        ({"ndcg@10": 0.0, "recall@10": 0.5}, {"ndcg@10": 0.0, "recall@10": 0.5}, False, "beat"),
        ({"ndcg@10": "0.3", "recall@10": 0.5}, None, False, "no finite"),
    ],
)
def test_promotion_rule(
    challenger: dict[str, Any],
    production: dict[str, Any] | None,
    promote: bool,
    reason: str,
) -> None:
    decision = decide_promotion(challenger, production, RULE)
    assert decision.promote is promote, decision.reason
    assert reason in decision.reason
    json.dumps(decision.evidence, allow_nan=False)  # evidence goes into history records
    assert decision.evidence["metric"] == "ndcg@10"


def test_promotion_rule_from_settings_and_validation() -> None:
    settings = Settings(
        promotion_metric="map@10", promotion_min_lift=0.03, promotion_guardrails={"hit@10": 0.1}
    )
    rule = settings.promotion
    assert rule == PromotionRule("map@10", 0.03, {"hit@10": 0.1})
    with pytest.raises(ValueError, match="min_lift"):
        PromotionRule(min_lift=-0.1)
    with pytest.raises(ValueError, match="tolerance"):
        PromotionRule(guardrails={"x": NAN})


def test_no_alias_moves_to_a_bundle_that_fails_verification(
    registry: ModelRegistry, bundles: Path
) -> None:
    from recsys_serving.registry import InvalidBundle

    good = registry.register(make_bundle(bundles, seconds=1)).version
    bad = registry.register(make_bundle(bundles, seconds=2, payload=b"ranker-2")).version
    registry.promote(good, reason="first")
    registry.lake.put_bytes(registry.model_key(bad, "ranker.txt"), b"bitrot!!")  # same size
    history = len(registry.history())
    for move in (
        lambda: registry.promote(bad, reason="test"),
        lambda: registry.set_alias(CANDIDATE, bad, share=0.1, reason="test"),
        lambda: registry.set_alias(PRODUCTION, bad, reason="test", expected=good),
    ):
        with pytest.raises(InvalidBundle, match=rf"{bad} fails verification .*ranker\.txt"):
            move()
    assert registry.alias(PRODUCTION).version == good  # type: ignore[union-attr]
    assert registry.alias(CANDIDATE) is None
    assert len(registry.history()) == history
    # Rolling back onto a damaged previous production is refused the same way.
    registry.lake.put_bytes(registry.model_key(bad, "ranker.txt"), b"ranker-2")  # repaired
    registry.promote(bad, reason="repaired")
    registry.lake.put_bytes(registry.model_key(good, "ranker.txt"), b"bitrot")
    with pytest.raises(InvalidBundle, match=good):
        registry.rollback(reason="test")
    assert registry.alias(PRODUCTION).version == bad  # type: ignore[union-attr]
