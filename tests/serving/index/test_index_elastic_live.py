"""The Elasticsearch backend against a real server, when ``RECSYS_ES_URL`` names one.

Runs the same publish/search/alias-swap/prune scenario as the test double does, under
a random prefix, and deletes everything it created. ``RECSYS_ES_API_KEY`` is used if
set. Example: ``docker run -p 9200:9200 -e discovery.type=single-node
-e xpack.security.enabled=false docker.elastic.co/elasticsearch/elasticsearch:8.19.0``
then ``RECSYS_ES_URL=http://127.0.0.1:9200 pytest tests/serving/index/test_index_elastic_live.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from elasticsearch import Elasticsearch

from es_double import alias_swap_scenario
from recsys_serving.index.elastic import connect
from recsys_serving.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("RECSYS_ES_URL"),
        reason="RECSYS_ES_URL is not set: no Elasticsearch server to run against",
    ),
]


@pytest.fixture
def live_client() -> Iterator[Elasticsearch]:
    client = connect(Settings().stores, request_timeout=30.0, max_retries=2)
    try:
        yield client
    finally:
        client.close()


def test_alias_swap_scenario_against_a_real_server(live_client: Elasticsearch) -> None:
    prefix = f"recsys-test-{uuid.uuid4().hex[:10]}"
    try:
        alias_swap_scenario(live_client, prefix, exact=False)
    finally:
        live_client.options(ignore_status=404).indices.delete(
            index=f"{prefix}-*", expand_wildcards="all"
        )
