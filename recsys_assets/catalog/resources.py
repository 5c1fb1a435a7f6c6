"""The document store as a Dagster resource, built from ``Settings`` like the others."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from recsys_assets.resources import declared
from recsys_serving.settings import ServingSettings, Settings, StoreSettings
from recsys_serving.stores.docstore import DocStore, connect_docstore


class DocStoreResource(dg.ConfigurableResource):
    """Users and items: embedded file store by default, MongoDB/DocumentDB by URI."""

    mongo_uri: str | None = None
    mongo_db: str = declared(StoreSettings, "mongo_db")
    docstore_path: str
    store_timeout_ms: float = declared(ServingSettings, "store_timeout_ms")

    @classmethod
    def from_settings(cls, settings: Settings) -> DocStoreResource:
        uri: Any = settings.stores.mongo_uri
        if uri and os.environ.get("RECSYS_MONGO_URI") == uri:
            # Resource config is shown in the Dagster UI; an EnvVar shows only its name,
            # and a MongoDB URI usually carries a password.
            uri = dg.EnvVar("RECSYS_MONGO_URI")
        return cls(
            mongo_uri=uri,
            mongo_db=settings.stores.mongo_db,
            docstore_path=str(settings.docstore_path),
            store_timeout_ms=settings.serving.store_timeout_ms,
        )

    def open(self) -> DocStore:
        """A connected store; close it (``with resource.open() as store:``)."""
        uri: Any = self.mongo_uri
        if isinstance(uri, dg.EnvVar):
            # Only Dagster resolves an EnvVar; a resource used directly (CLI) must too.
            uri = uri.get_value()
        return connect_docstore(
            uri, self.mongo_db, self.docstore_path, store_timeout_ms=self.store_timeout_ms
        )
