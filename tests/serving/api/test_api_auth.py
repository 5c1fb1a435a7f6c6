"""API keys (hashed store, env keys, reload on change), scopes, 401/403, throttling 429."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from recsys_serving.api import throttle
from recsys_serving.api.metrics import parse_metrics
from recsys_serving.keys import KeyFile, KeyRing, KeyStoreError, hash_key
from serving_support import new_key, service_settings, serving_client

NOW = time.time()


def click(i: int, **extra: object) -> dict[str, object]:
    return {
        "event_id": f"c{i}",
        "event_type": "click",
        "user_id": "u1",
        "item_id": "i1",
        "ts": NOW - 5,
        **extra,
    }


# ------------------------------------------------------------------ key store


def test_key_file_stores_only_hashes_and_is_private(tmp_path: Path) -> None:
    key_file = KeyFile(tmp_path / "keys.json")
    key, secret = key_file.create(["recommend", "events"], rps=5, burst=10, name="web")
    raw = (tmp_path / "keys.json").read_text()
    assert secret not in raw
    assert hash_key(secret) in raw
    assert stat.S_IMODE(os.stat(tmp_path / "keys.json").st_mode) == 0o600
    (listed,) = key_file.list()
    assert (listed.key_id, listed.scopes, listed.rps, listed.burst, listed.name) == (
        key.key_id,
        frozenset({"recommend", "events"}),
        5.0,
        10,
        "web",
    )
    assert secret.startswith("rsk_") and len(secret) > 40


def test_key_file_refuses_bad_scopes_and_limits(tmp_path: Path) -> None:
    key_file = KeyFile(tmp_path / "keys.json")
    with pytest.raises(KeyStoreError, match="unknown scope 'reccomend'"):
        key_file.create(["reccomend"])
    with pytest.raises(KeyStoreError, match="at least one scope"):
        key_file.create([""])
    with pytest.raises(KeyStoreError, match="rps must be a positive"):
        key_file.create(["events"], rps=0)
    with pytest.raises(KeyStoreError, match="burst must be at least 1"):
        key_file.create(["events"], burst=0)
    with pytest.raises(KeyStoreError, match="no key with id 'k_nope'"):
        key_file.revoke("k_nope")


def test_corrupt_key_file_names_the_file_and_keeps_last_good_keys(tmp_path: Path) -> None:
    key_file = KeyFile(tmp_path / "keys.json")
    _, secret = key_file.create(["events"])
    ring = KeyRing(key_file, check_seconds=0)
    assert ring.authenticate(secret) is not None
    (tmp_path / "keys.json").write_text("{not json")
    with pytest.raises(KeyStoreError, match=r"keys\.json: not valid JSON"):
        key_file.read()
    # A typo in the file must not lock every client out.
    assert ring.authenticate(secret) is not None


def test_keyring_sees_revocation_and_new_keys_without_restart(tmp_path: Path) -> None:
    key_file = KeyFile(tmp_path / "keys.json")
    key, secret = key_file.create(["recommend"])
    ring = KeyRing(key_file, check_seconds=0)
    assert ring.authenticate(secret).key_id == key.key_id  # type: ignore[union-attr]
    _, second = key_file.create(["admin"])
    assert ring.authenticate(second) is not None
    key_file.revoke(key.key_id)
    assert ring.authenticate(secret) is None
    assert ring.authenticate("rsk_guess") is None
    assert ring.authenticate(None) is None


def test_env_keys_are_validated_and_never_stored(tmp_path: Path) -> None:
    ring = KeyRing(
        KeyFile(tmp_path / "keys.json"), {"deploy-secret-0123456789": ["recommend", "events"]}
    )
    key = ring.authenticate("deploy-secret-0123456789")
    assert key is not None and key.source == "env" and key.scopes == {"recommend", "events"}
    assert not (tmp_path / "keys.json").exists()
    with pytest.raises(KeyStoreError, match="RECSYS_API_KEYS entry 1: unknown scope 'root'"):
        KeyRing(KeyFile(tmp_path / "k.json"), {"deploy-secret-0123456789": ["root"]})
    with pytest.raises(KeyStoreError, match="at least 16 characters"):
        KeyRing(KeyFile(tmp_path / "k.json"), {"short": ["events"]})


def test_env_keys_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_API_KEYS", json.dumps({"env-key-abcdefghijklmnop": ["events"]}))
    settings = service_settings(tmp_path)
    with serving_client(settings) as client:
        r = client.post(
            "/events", json=[click(1)], headers={"X-API-Key": "env-key-abcdefghijklmnop"}
        )
        assert r.status_code == 202, r.text


# ------------------------------------------------------------------ HTTP


def test_missing_wrong_and_revoked_keys_get_401_json(tmp_path: Path) -> None:
    settings = service_settings(tmp_path)
    secret = new_key(settings, "recommend,events")
    with serving_client(settings) as client:
        r = client.post("/events", json=[click(1)])
        assert r.status_code == 401
        assert r.json() == {
            "error": "unauthorized",
            "detail": "missing API key: send it in the X-API-Key header",
        }
        r = client.get("/recommendations/u1", headers={"X-API-Key": "rsk_wrong"})
        assert r.status_code == 401 and r.json()["detail"] == "unknown or revoked API key"
        assert client.post("/v1/events", json=[click(2)], headers={"X-API-Key": secret}).is_success
        (key,) = KeyFile.in_home(settings.resolved_home).list()
        KeyFile.in_home(settings.resolved_home).revoke(key.key_id)
        time.sleep(1.1)  # workers re-check the key file at most once a second
        r = client.post("/events", json=[click(3)], headers={"X-API-Key": secret})
        assert r.status_code == 401


def test_scopes_are_enforced_with_403(tmp_path: Path) -> None:
    settings = service_settings(tmp_path)
    recommend = new_key(settings, "recommend")
    events = new_key(settings, "events")
    admin = new_key(settings, "admin")
    with serving_client(settings) as client:
        r = client.post("/events", json=[click(1)], headers={"X-API-Key": recommend})
        assert r.status_code == 403
        assert r.json()["error"] == "forbidden" and "'events' scope" in r.json()["detail"]
        assert client.get("/admin/models", headers={"X-API-Key": events}).status_code == 403
        assert client.get("/v1/admin/models", headers={"X-API-Key": recommend}).status_code == 403
        assert client.get("/similar/i1", headers={"X-API-Key": admin}).status_code == 403
        assert client.post("/events", json=[click(1)], headers={"X-API-Key": events}).is_success
        assert client.get("/admin/models", headers={"X-API-Key": admin}).status_code == 200
        # Without a model the recommend scope gets through auth and meets a 503, not a 403.
        r = client.get("/recommendations/u1", headers={"X-API-Key": recommend})
        assert r.status_code == 503 and r.json()["error"] == "no_model"


def test_probes_metrics_and_docs_need_no_key(tmp_path: Path) -> None:
    settings = service_settings(tmp_path)
    with serving_client(settings) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503  # no model yet, but no 401
        assert client.get("/metrics").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200


def test_openapi_documents_the_api_key(tmp_path: Path) -> None:
    with serving_client(service_settings(tmp_path)) as client:
        spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key from `recsys keys create` or `RECSYS_API_KEYS`.",
    }
    for path in ("/recommendations/{user_id}", "/v1/similar/{item_id}", "/events"):
        op = next(iter(spec["paths"][path].values()))
        assert op["security"] == [{"APIKeyHeader": []}], path


def test_auth_disabled_lets_everyone_in(tmp_path: Path) -> None:
    settings = service_settings(tmp_path, auth_enabled=False, rate_limit_rps=1, rate_limit_burst=1)
    with serving_client(settings) as client:
        for i in range(5):  # no key: no throttling either
            assert client.post("/events", json=[click(i)]).status_code == 202
        assert client.get("/admin/models").status_code == 200


def test_throttling_answers_429_with_retry_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle, "clock", lambda: 1000.0)  # slow fsyncs refill no tokens
    settings = service_settings(tmp_path)
    slow = new_key(settings, "events", rps=0.5, burst=3)
    other = new_key(settings, "events")
    (slow_id,) = [k.key_id for k in KeyFile.in_home(settings.resolved_home).list() if k.rps == 0.5]
    with serving_client(settings) as client:
        statuses = [
            client.post("/events", json=[click(i)], headers={"X-API-Key": slow}).status_code
            for i in range(5)
        ]
        assert statuses == [202, 202, 202, 429, 429]
        r = client.post("/events", json=[click(9)], headers={"X-API-Key": slow})
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "2"  # one token per 2 s, rounded up
        body = r.json()
        assert body["error"] == "too_many_requests"
        assert 0 < body["detail"]["retry_after_seconds"] <= 2
        # Another key has its own bucket.
        assert client.post("/events", json=[click(10)], headers={"X-API-Key": other}).is_success
        samples = parse_metrics(client.get("/metrics").text)
    throttled = {s[0]["key_id"]: s[1] for s in samples["recsys_throttled_total"]}
    assert throttled == {slow_id: 3.0}


def test_default_limits_apply_to_keys_without_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle, "clock", lambda: 1000.0)
    settings = service_settings(tmp_path, rate_limit_rps=1, rate_limit_burst=2)
    secret = new_key(settings, "events")
    with serving_client(settings) as client:
        codes = [
            client.post("/events", json=[click(i)], headers={"X-API-Key": secret}).status_code
            for i in range(3)
        ]
    assert codes == [202, 202, 429]
