"""A small Elasticsearch stand-in over real HTTP, for testing through the real client.

No Elasticsearch server can run on the test machines, so this speaks the part of the
REST API the candidate index uses (index create/exists/delete/mapping, ``_bulk``
NDJSON, ``_refresh``, ``_count``, ``_alias``/``_aliases``, ``_search`` with a top-level
``knn`` or a bool query + sort, ``_doc`` GET), answers with the response shapes and
error bodies Elasticsearch sends (and the ``X-Elastic-Product`` header the client
insists on), and records every request (method, path, query, parsed body) so tests can
assert the exact shapes sent. It keeps enough semantics to check results end to end:
documents become searchable only on refresh, ``dynamic: strict`` and vector dims are
enforced, aliases move atomically with ``must_exist``, kNN is exact inner product with
Elasticsearch's ``max_inner_product`` score transform, and a 9.2+ server leaves vectors
out of ``_source`` unless ``index.mapping.exclude_source_vectors`` is false.

:func:`alias_swap_scenario` is the publish/search/alias-swap/prune story, written once
and run against this double and, when ``RECSYS_ES_URL`` is set, a real server.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, a list of NDJSON objects, or None


@dataclass
class _Index:
    mappings: dict[str, Any]
    settings: dict[str, Any]
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    visible: dict[str, dict[str, Any]] = field(default_factory=dict)  # as of last refresh


class EsError(Exception):
    def __init__(self, status: int, kind: str, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.kind = kind
        self.reason = reason
        self.extra = extra

    def body(self) -> dict[str, Any]:
        cause = {"type": self.kind, "reason": self.reason, **self.extra}
        return {"error": {"root_cause": [cause], **cause}, "status": self.status}


# Settings an 8.x/9.x server accepts at index creation (a subset; unknown ones are 400).
_KNOWN_SETTINGS = {"number_of_shards", "number_of_replicas", "refresh_interval"}


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name.removeprefix("index.")] = value
    return flat


class ElasticsearchDouble:
    """Start with :meth:`running`; ``url`` is then ``http://127.0.0.1:<port>``."""

    def __init__(self, version: str = "8.19.0") -> None:
        self.version = version
        self.requests: list[Recorded] = []
        self.indices: dict[str, _Index] = {}
        self.aliases: dict[str, set[str]] = {}
        self.fail_items: set[str] = set()  # bulk items rejected with a parsing error
        self.delay_seconds = 0.0  # applied to requests whose path contains delay_match
        self.delay_match = "_search"
        self.url = ""
        self._lock = threading.RLock()

    # --- lifecycle -----------------------------------------------------------------

    @contextmanager
    def running(self) -> Iterator[ElasticsearchDouble]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def do_HEAD(self) -> None:
                double._handle(self, "HEAD")

            def do_GET(self) -> None:
                double._handle(self, "GET")

            def do_POST(self) -> None:
                double._handle(self, "POST")

            def do_PUT(self) -> None:
                double._handle(self, "PUT")

            def do_DELETE(self) -> None:
                double._handle(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and hung up is expected in tests

        httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)

    # --- what tests look at ----------------------------------------------------------

    def calls(self, method: str | None = None, endpoint: str | None = None) -> list[Recorded]:
        """Recorded requests, optionally by method and by the path's last ``_`` segment."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method)
                and (endpoint is None or r.path.rstrip("/").split("/")[-1] == endpoint)
            ]

    def alias_targets(self, alias: str) -> set[str]:
        with self._lock:
            return set(self.aliases.get(alias, set()))

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- HTTP plumbing ---------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(handler.path)
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        content_type = handler.headers.get("Content-Type", "")
        body: Any = None
        if raw:
            if "ndjson" in content_type:
                body = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            else:
                body = json.loads(raw)
        path = unquote(split.path)
        query = dict(parse_qsl(split.query))
        with self._lock:
            self.requests.append(
                Recorded(
                    method, path, query, {k.lower(): v for k, v in handler.headers.items()}, body
                )
            )
        if self.delay_seconds and self.delay_match in path:
            time.sleep(self.delay_seconds)
        try:
            with self._lock:
                status, payload = self._route(method, path, query, body)
        except EsError as exc:
            status, payload = exc.status, exc.body()
        data = b"" if payload is None else json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("X-Elastic-Product", "Elasticsearch")
            handler.send_header(
                "Content-Type", "application/vnd.elasticsearch+json;compatible-with=8"
            )
            handler.send_header("Content-Length", str(0 if method == "HEAD" else len(data)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if not parts:
            if method in ("GET", "HEAD"):
                return 200, self._info()
        elif parts == ["_aliases"] and method == "POST":
            return self._update_aliases(body)
        elif parts[0] == "_alias" and len(parts) == 2 and method == "GET":
            return self._get_alias(parts[1])
        elif parts[-1] == "_bulk" and method in ("POST", "PUT"):
            return self._bulk(parts[0] if len(parts) == 2 else None, body or [])
        elif len(parts) == 1 and not parts[0].startswith("_"):
            if method == "PUT":
                return self._create(parts[0], body or {})
            if method == "HEAD":
                return (200 if self._resolve(parts[0], missing_ok=True) else 404), None
            if method == "DELETE":
                return self._delete(parts[0])
        elif len(parts) == 2 and parts[1] == "_mapping" and method == "GET":
            return self._mapping(parts[0])
        elif len(parts) == 2 and parts[1] == "_refresh" and method in ("POST", "GET"):
            for name in self._resolve(parts[0]):
                index = self.indices[name]
                index.visible = dict(index.docs)
            return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}
        elif len(parts) == 2 and parts[1] == "_count" and method in ("POST", "GET"):
            count = sum(len(self.indices[n].visible) for n in self._resolve(parts[0]))
            return 200, {"count": count, "_shards": {"total": 1, "successful": 1, "failed": 0}}
        elif len(parts) == 2 and parts[1] == "_search" and method in ("POST", "GET"):
            return self._search(parts[0], body or {})
        elif len(parts) == 3 and parts[1] == "_doc" and method == "GET":
            return self._get_doc(parts[0], parts[2], query)
        raise EsError(
            400,
            "illegal_argument_exception",
            f"no handler found for uri [{path}] and method [{method}]",
        )

    # --- API -------------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        return {
            "name": "es-double",
            "cluster_name": "recsys-test",
            "cluster_uuid": "double",
            "version": {"number": self.version, "build_flavor": "default"},
            "tagline": "You Know, for Search",
        }

    def _major_minor(self) -> tuple[int, int]:
        major, minor, *_ = (int(x) for x in self.version.split("."))
        return major, minor

    def _resolve(self, expression: str, missing_ok: bool = False) -> list[str]:
        names: list[str] = []
        for part in expression.split(","):
            if "*" in part:
                names += sorted(fnmatch.filter(self.indices, part))
            elif part in self.indices:
                names.append(part)
            elif part in self.aliases:
                names += sorted(self.aliases[part])
            elif not missing_ok:
                raise EsError(
                    404, "index_not_found_exception", f"no such index [{part}]", index=part
                )
        return names

    def _create(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        if name in self.indices:
            raise EsError(
                400,
                "resource_already_exists_exception",
                f"index [{name}] already exists",
                index=name,
            )
        if name in self.aliases:
            raise EsError(
                400,
                "invalid_index_name_exception",
                f"Invalid index name [{name}], already exists as alias",
                index=name,
            )
        settings = _flatten(body.get("settings", {}))
        known = set(_KNOWN_SETTINGS)
        if self._major_minor() >= (9, 2):
            known.add("mapping.exclude_source_vectors")
        unknown = sorted(set(settings) - known)
        if unknown:
            raise EsError(
                400, "illegal_argument_exception", f"unknown setting [index.{unknown[0]}]"
            )
        self.indices[name] = _Index(mappings=body.get("mappings", {}), settings=settings)
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _delete(self, expression: str) -> tuple[int, Any]:
        for name in self._resolve(expression):
            del self.indices[name]
            for targets in self.aliases.values():
                targets.discard(name)
        self.aliases = {a: t for a, t in self.aliases.items() if t}
        return 200, {"acknowledged": True}

    def _mapping(self, expression: str) -> tuple[int, Any]:
        return 200, {n: {"mappings": self.indices[n].mappings} for n in self._resolve(expression)}

    def _get_alias(self, alias: str) -> tuple[int, Any]:
        if alias not in self.aliases:
            return 404, {"error": f"alias [{alias}] missing", "status": 404}
        return 200, {name: {"aliases": {alias: {}}} for name in sorted(self.aliases[alias])}

    def _update_aliases(self, body: dict[str, Any]) -> tuple[int, Any]:
        aliases = {a: set(t) for a, t in self.aliases.items()}
        for action in body["actions"]:
            ((kind, spec),) = action.items()
            alias, name = spec["alias"], spec["index"]
            if name not in self.indices:
                raise EsError(
                    404, "index_not_found_exception", f"no such index [{name}]", index=name
                )
            if kind == "add":
                if alias in self.indices:
                    raise EsError(
                        400,
                        "invalid_alias_name_exception",
                        f"Invalid alias name [{alias}]: an index exists with the same name",
                    )
                aliases.setdefault(alias, set()).add(name)
            elif kind == "remove":
                if name not in aliases.get(alias, set()):
                    if spec.get("must_exist"):
                        raise EsError(
                            404,
                            "aliases_not_found_exception",
                            f"aliases [{alias}] missing",
                            resource_id=alias,
                        )
                else:
                    aliases[alias].discard(name)
            else:
                raise EsError(400, "x_content_parse_exception", f"unknown alias action [{kind}]")
        self.aliases = {a: t for a, t in aliases.items() if t}  # all actions or none
        return 200, {"acknowledged": True, "errors": False}

    def _bulk(self, default_index: str | None, lines: list[dict[str, Any]]) -> tuple[int, Any]:
        items = []
        pairs = iter(lines)
        for action in pairs:
            ((kind, meta),) = action.items()
            if kind != "index":
                raise EsError(400, "illegal_argument_exception", f"unsupported bulk action {kind}")
            source = next(pairs)
            name = meta.get("_index", default_index)
            doc_id = meta["_id"]
            result: dict[str, Any] = {"_index": name, "_id": doc_id}
            error = self._reject(name, doc_id, source)
            if error is not None:
                result.update(
                    status=error.status, error={"type": error.kind, "reason": error.reason}
                )
            else:
                index = self.indices[name]
                created = doc_id not in index.docs
                index.docs[doc_id] = source
                result.update(
                    _version=1,
                    result="created" if created else "updated",
                    _shards={"total": 1, "successful": 1, "failed": 0},
                    status=201 if created else 200,
                )
            items.append({"index": result})
        errors = any("error" in item["index"] for item in items)
        return 200, {"took": 1, "errors": errors, "items": items}

    def _reject(self, name: str, doc_id: str, source: dict[str, Any]) -> EsError | None:
        if name not in self.indices:
            return EsError(404, "index_not_found_exception", f"no such index [{name}]")
        if doc_id in self.fail_items:
            return EsError(
                400, "document_parsing_exception", f"[1:1] failed to parse document [{doc_id}]"
            )
        properties = self.indices[name].mappings.get("properties", {})
        if self.indices[name].mappings.get("dynamic") == "strict":
            extra = sorted(set(source) - set(properties))
            if extra:
                return EsError(
                    400,
                    "strict_dynamic_mapping_exception",
                    f"[1:1] mapping set to strict, dynamic introduction of [{extra[0]}] "
                    "within [_doc] is not allowed",
                )
        for field_name, spec in properties.items():
            vector = source.get(field_name) if spec.get("type") == "dense_vector" else None
            if vector is not None and len(vector) != spec["dims"]:
                return EsError(
                    400,
                    "document_parsing_exception",
                    f"The [dense_vector] field [{field_name}] in doc [{doc_id}] has "
                    f"a different number of dimensions [{len(vector)}] "
                    f"than defined in the mapping [{spec['dims']}]",
                )
        return None

    def _excludes_vectors(self, name: str) -> bool:
        explicit = self.indices[name].settings.get("mapping.exclude_source_vectors")
        return self._major_minor() >= (9, 2) if explicit is None else bool(explicit)

    def _shown(self, name: str, source: dict[str, Any], fields: Any) -> dict[str, Any]:
        shown = dict(source)
        if self._excludes_vectors(name):
            properties = self.indices[name].mappings.get("properties", {})
            for field_name, spec in properties.items():
                if spec.get("type") == "dense_vector":
                    shown.pop(field_name, None)
        if fields is False:
            return {}
        if isinstance(fields, str):
            fields = fields.split(",")
        if isinstance(fields, list):
            shown = {k: v for k, v in shown.items() if k in fields}
        return shown

    def _get_doc(self, expression: str, doc_id: str, query: dict[str, str]) -> tuple[int, Any]:
        (name,) = self._resolve(expression)
        source = self.indices[name].docs.get(doc_id)  # GET is real-time: no refresh needed
        if source is None:
            return 404, {"_index": name, "_id": doc_id, "found": False}
        return 200, {
            "_index": name,
            "_id": doc_id,
            "_version": 1,
            "_seq_no": 0,
            "_primary_term": 1,
            "found": True,
            "_source": self._shown(name, source, query.get("_source_includes")),
        }

    # --- search ----------------------------------------------------------------------

    def _matches(self, doc_id: str, source: dict[str, Any], clause: dict[str, Any]) -> bool:
        ((kind, spec),) = clause.items()
        if kind == "match_all":
            return True
        if kind == "bool":
            unknown = set(spec) - {"filter", "must", "must_not", "should"}
            if unknown:
                raise EsError(400, "parsing_exception", f"[bool] unknown field {sorted(unknown)}")
            musts = [*spec.get("filter", []), *spec.get("must", [])]
            return all(self._matches(doc_id, source, c) for c in musts) and not any(
                self._matches(doc_id, source, c) for c in spec.get("must_not", [])
            )
        if kind == "ids":
            return doc_id in spec["values"]
        if kind == "terms":
            ((field_name, values),) = spec.items()
            have = source.get(field_name)
            have = have if isinstance(have, list) else [have]
            return bool(set(have) & set(values))
        if kind == "range":
            ((field_name, bounds),) = spec.items()
            value = source.get(field_name)
            if value is None:
                return False
            return ("gte" not in bounds or value >= bounds["gte"]) and (
                "lte" not in bounds or value <= bounds["lte"]
            )
        raise EsError(400, "parsing_exception", f"unknown query [{kind}]")

    def _search(self, expression: str, body: dict[str, Any]) -> tuple[int, Any]:
        names = self._resolve(expression)
        size = int(body.get("size", 10))
        docs = [
            (name, doc_id, source)
            for name in names
            for doc_id, source in sorted(self.indices[name].visible.items())
        ]
        hits: list[dict[str, Any]]
        if "knn" in body:
            knn = body["knn"]
            k, num_candidates = int(knn["k"]), int(knn["num_candidates"])
            if not 0 < k <= num_candidates <= 10_000:
                raise EsError(
                    400,
                    "illegal_argument_exception",
                    f"[num_candidates] cannot be less than [k] or exceed 10000: "
                    f"k={k}, num_candidates={num_candidates}",
                )
            query_vector = np.asarray(knn["query_vector"], dtype=np.float32)
            scored = []
            for name, doc_id, source in docs:
                spec = self.indices[name].mappings["properties"][knn["field"]]
                if spec.get("similarity") != "max_inner_product":
                    raise EsError(400, "illegal_argument_exception", "double only does MIP")
                if len(query_vector) != spec["dims"]:
                    raise EsError(
                        400,
                        "illegal_argument_exception",
                        f"The query vector has a different number of dimensions "
                        f"[{len(query_vector)}] than the document vectors [{spec['dims']}].",
                    )
                if "filter" in knn and not self._matches(doc_id, source, knn["filter"]):
                    continue
                dot = float(
                    np.dot(np.asarray(source[knn["field"]], dtype=np.float32), query_vector)
                )
                score = dot + 1.0 if dot >= 0 else 1.0 / (1.0 - dot)
                scored.append((score, doc_id, name, source))
            scored.sort(key=lambda s: (-s[0], s[1]))
            hits = [
                {
                    "_index": name,
                    "_id": doc_id,
                    "_score": score,
                    "_source": self._shown(name, source, body.get("_source", True)),
                }
                for score, doc_id, name, source in scored[:k][:size]
            ]
        else:
            query = body.get("query", {"match_all": {}})
            matched = [d for d in docs if self._matches(d[1], d[2], query)]
            sort = body.get("sort", [])
            keys: list[tuple[str, str]] = []
            for spec in sort:
                ((field_name, order),) = spec.items()
                keys.append((field_name, order["order"] if isinstance(order, dict) else order))
            for field_name, order in reversed(keys):
                matched.sort(key=lambda d, f=field_name: d[2][f], reverse=order == "desc")
            hits = []
            for name, doc_id, source in matched[:size]:
                hit: dict[str, Any] = {
                    "_index": name,
                    "_id": doc_id,
                    "_score": None if sort else 1.0,
                    "_source": self._shown(name, source, body.get("_source", True)),
                }
                if sort:
                    hit["sort"] = [
                        float(np.float32(source[f])) if isinstance(source[f], float) else source[f]
                        for f, _ in keys
                    ]
                hits.append(hit)
        result: dict[str, Any] = {
            "max_score": max((h["_score"] or 0 for h in hits), default=None),
            "hits": hits,
        }
        if body.get("track_total_hits", True) is not False:
            result["total"] = {"value": len(hits), "relation": "eq"}
        return 200, {
            "took": 1,
            "timed_out": False,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": result,
        }


def alias_swap_scenario(client: Any, prefix: str, *, exact: bool) -> None:
    """Publish two versions, query both, check the alias moved, prune the older one.

    ``exact``: results must equal the embedded index's (the double's kNN is exact); a
    real server's HNSW is approximate, so there top results must only largely agree.
    """
    from datetime import UTC, datetime, timedelta

    from recsys_serving.index import CandidateQuery, EmbeddedIndex, IndexArtifact
    from recsys_serving.index.elastic import ElasticIndex, ElasticPublisher

    def artifact(version: str, seed: int) -> IndexArtifact:
        rng = np.random.default_rng(seed)
        n = 60
        published = datetime(2024, 1, 1, tzinfo=UTC).timestamp() + rng.integers(0, 30, n) * 86_400.0
        published[::9] = np.nan
        return IndexArtifact(
            version=version,
            item_ids=[f"it{i:03d}" for i in rng.permutation(n)],
            vectors=rng.normal(size=(n, 8)).astype(np.float32),
            categories=[
                [c for c in ("news", "sport", "tech") if rng.random() < 0.4] for _ in range(n)
            ],
            published_at=published,
            popularity=rng.integers(0, 100, n).astype(np.float32),
            titles=[f"title {i}" for i in range(n)],
        )

    def agree(got: list[Any], want: list[Any]) -> None:
        got_ids, want_ids = [c.item_id for c in got], [c.item_id for c in want]
        if exact:
            assert got_ids == want_ids
            np.testing.assert_allclose([c.score for c in got], [c.score for c in want], rtol=1e-4)
        else:
            assert len(set(got_ids) & set(want_ids)) >= 0.8 * len(want_ids), (got_ids, want_ids)

    publisher = ElasticPublisher(client, prefix, replicas=0, chunk_size=25)
    first, second, third = (
        artifact("v20240101000000-0000000a", 1),
        artifact("v20240102000000-0000000b", 2),
        artifact("v20240103000000-0000000c", 3),
    )
    name1 = publisher.publish(first)
    assert name1 == f"{prefix}-{first.version}"
    assert set(client.indices.get_alias(name=prefix).body) == {name1}

    index1 = ElasticIndex(client, name1, version=first.version, dim=first.dim, timeout_ms=5000)
    reference1 = EmbeddedIndex(first)
    assert index1.ping()
    user = np.random.default_rng(9).normal(size=first.dim).astype(np.float32)
    seen = frozenset(first.item_ids[:5])
    queries = [
        CandidateQuery(k=10, vector=user),
        CandidateQuery(k=10, vector=user, exclude=seen, categories=("news", "tech")),
        CandidateQuery(
            k=10,
            vector=user,
            published_after=datetime(2024, 1, 5, tzinfo=UTC),
            published_before=datetime(2024, 1, 5, tzinfo=UTC) + timedelta(days=15),
        ),
    ]
    for query in queries:
        agree(index1.search(query), reference1.search(query))
        agree(index1.popular(query), reference1.popular(query))
    agree(index1.similar(first.item_ids[3], 8), reference1.similar(first.item_ids[3], 8))
    assert index1.similar("no-such-item", 8) == []

    name2 = publisher.publish(second)
    assert set(client.indices.get_alias(name=prefix).body) == {name2}
    # The older version stays queryable by name: its model still serves until replaced.
    agree(index1.search(queries[0]), reference1.search(queries[0]))
    index2 = ElasticIndex(client, name2, version=second.version, dim=second.dim, timeout_ms=5000)
    agree(index2.search(queries[0]), EmbeddedIndex(second).search(queries[0]))

    name3 = publisher.publish(third)
    assert publisher.prune([second.version]) == [name1]
    assert set(client.indices.get_alias(name=prefix).body) == {name3}
    assert not index1.ping()
    assert index2.ping()
    assert publisher.prune([]) == [name2]
