"""Stores the server reads per request: users and items (the document store)."""

from recsys_serving.stores.docstore import (
    DocStore,
    DocStoreError,
    StoreUnavailable,
    UpsertResult,
    open_docstore,
)

__all__ = ["DocStore", "DocStoreError", "StoreUnavailable", "UpsertResult", "open_docstore"]
