"""The natively compiled ranker: same scores and answers as LightGBM, cached per host,
never loaded from a damaged cache file, and a failure leaves LightGBM serving."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from model_support import TinyWorld, tiny_bundle, tiny_outcome, tiny_world, train_tiny

from recsys_serving.api.metrics import parse_metrics
from recsys_serving.lake import LocalLake
from recsys_serving.model import ranker as ranker_module
from recsys_serving.model.ranker import CompiledRanker, RankerCompileError, compile_ranker
from recsys_serving.model.recommender import RANKER_FILE, Recommender
from recsys_serving.registry import ModelRegistry
from serving_support import new_key, service_settings, serving_client, wait_for

__all__ = ["tiny_bundle", "tiny_outcome", "tiny_world"]  # fixtures used below


@pytest.fixture(autouse=True)
def _fresh_process_cache() -> None:
    """Each test sees the compiler's disk cache, not code compiled by an earlier test."""
    ranker_module._LOADED.clear()


def known_users(model: Recommender, n: int) -> list[str]:
    return [u for u in model.state.user_ids.tolist() if model.knows_user(u)][:n]


def test_compiled_scores_and_answers_are_lightgbms(tiny_bundle: Path, tmp_path: Path) -> None:
    reference = Recommender.load(tiny_bundle)
    model = Recommender.load(tiny_bundle)
    compiled = model.compile_ranker(tmp_path / "cache")
    assert isinstance(model.ranker, CompiledRanker) and model.ranker is compiled
    assert reference.ranker.kind == "lightgbm" and compiled.kind == "compiled"
    rows = model._check_rows()
    assert rows.shape[0] > 100
    np.testing.assert_allclose(
        compiled.score(rows), reference.ranker.score(rows), rtol=0, atol=1e-9
    )
    for user in [*known_users(model, 30), "nobody-at-all"]:
        got = model.recommend(user, 10)
        want = reference.recommend(user, 10)
        assert [(r.item_id, r.reason) for r in got] == [(r.item_id, r.reason) for r in want]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=1e-9)
    assert compiled.score(rows[:0]).shape == (0,)
    with pytest.raises(ValueError, match="features must be"):
        compiled.score(rows[:, :5])


def test_object_code_is_cached_and_a_damaged_cache_is_recompiled(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = Recommender.load(tiny_bundle).compile_ranker(cache)
    assert not first.cached
    objects = list(cache.glob("*.o"))
    assert len(objects) == 1 and objects[0].with_suffix(".sha256").exists()
    assert not list(cache.glob(".*.o"))  # no temporary file left behind

    ranker_module._LOADED.clear()
    again = Recommender.load(tiny_bundle).compile_ranker(cache)
    assert again.cached and again is not first

    # A truncated object file is never handed to the JIT: its checksum fails, so it is
    # compiled again (and replaced).
    objects[0].write_bytes(objects[0].read_bytes()[:1000])
    ranker_module._LOADED.clear()
    model = Recommender.load(tiny_bundle)
    repaired = model.compile_ranker(cache)
    assert not repaired.cached
    user = known_users(model, 1)[0]
    assert model.recommend(user, 5)

    # The same ranker loaded again in this process reuses its code.
    assert Recommender.load(tiny_bundle).compile_ranker(cache) is repaired


def test_scores_that_differ_from_lightgbm_are_refused(
    tiny_bundle: Path,
    tiny_world: TinyWorld,
    tmp_path: Path,
) -> None:
    other = Recommender.load(train_tiny(tiny_world, seed=3).bundle_path)
    model = Recommender.load(tiny_bundle)
    with pytest.raises(RankerCompileError, match="differ from LightGBM") as caught:
        compile_ranker(
            tiny_bundle / RANKER_FILE, tmp_path / "cache", other.ranker, model._check_rows()
        )
    assert caught.value.reason == "mismatch"
    assert model.ranker.kind == "lightgbm"


def test_a_model_whose_ranker_cannot_compile_serves_with_lightgbm(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(self: Recommender, cache_dir: Path | None = None) -> CompiledRanker:
        raise RankerCompileError("unavailable", "lleaves is not installed (test)")

    monkeypatch.setattr(Recommender, "compile_ranker", unavailable)
    settings = service_settings(tmp_path / "home")
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    version = registry.register(tiny_bundle).version
    registry.promote(version, reason="test")
    headers = {"X-API-Key": new_key(settings, "recommend,admin")}
    user = known_users(Recommender.load(tiny_bundle), 1)[0]
    with serving_client(settings) as client:
        wait_for(lambda: client.app.state.manager.state.ready, 30, "model")
        r = client.get(f"/recommendations/{user}", params={"k": 5}, headers=headers)
        assert r.status_code == 200 and r.json()["served_by"] == "champion"
        status = client.get("/admin/models", headers=headers).json()
        samples = parse_metrics(client.get("/metrics").text)
    assert status["production"]["ranker"] == "lightgbm"
    assert samples["recsys_ranker_compile_failures_total"] == [({"reason": "unavailable"}, 1.0)]


def test_compilation_can_be_turned_off(tiny_bundle: Path, tmp_path: Path) -> None:
    settings = service_settings(tmp_path / "home", ranker_compile=False)
    registry = ModelRegistry(LocalLake(settings.resolved_lake_uri))
    registry.promote(registry.register(tiny_bundle).version, reason="test")
    with serving_client(settings) as client:
        wait_for(lambda: client.app.state.manager.state.ready, 30, "model")
        loaded = client.app.state.manager.state.production
        samples = parse_metrics(client.get("/metrics").text)
    assert loaded.model.ranker.kind == "lightgbm"
    assert "recsys_ranker_compile_failures_total" not in samples
    assert not (settings.resolved_model_cache_dir / ".compiled").exists()


def test_a_copied_bundle_shares_the_compiled_code_of_its_ranker(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy" / tiny_bundle.name
    shutil.copytree(tiny_bundle, copy)
    cache = tmp_path / "cache"
    first = Recommender.load(tiny_bundle).compile_ranker(cache)
    ranker_module._LOADED.clear()
    second = Recommender.load(copy).compile_ranker(cache)
    assert second.cached and first is not second  # same checksum: the cached object
