"""Elasticsearch index retention: which versioned indices survive a publish.

Every retraining publishes a new ``<prefix>-<version>`` index; without retention each
would stay for good. Each model version queries the index built from its own item
vectors, so the registry's aliases decide what stays (:func:`index_versions_to_keep`).
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys_serving.index.base import IndexArtifact, IndexPublisher
from recsys_serving.registry import CANDIDATE, PRODUCTION, ModelRegistry

# Production indices kept besides the current one, so that `recsys models rollback`
# (which goes back one production at a time) still finds its model's index.
KEEP_PREVIOUS_PRODUCTIONS = 2


def index_versions_to_keep(registry: ModelRegistry, new_version: str) -> list[str]:
    """The versions whose index must survive a prune: the one just built, the
    candidate, production and the productions before it, newest first."""
    keep = [new_version]
    for alias in (CANDIDATE, PRODUCTION):
        current = registry.alias(alias)
        if current is not None and current.version is not None:
            keep.append(current.version)
    productions: list[str] = []
    for event in registry.history(alias=PRODUCTION):
        if event.version is not None and event.version not in productions:
            productions.append(event.version)
        if len(productions) > KEEP_PREVIOUS_PRODUCTIONS:
            break
    return list(dict.fromkeys([*keep, *productions]))


@dataclass(frozen=True, slots=True)
class Published:
    """Where the new index lives, and what retention kept and deleted."""

    index: str
    kept: list[str]
    pruned: list[str]


def publish_with_retention(
    publisher: IndexPublisher, artifact: IndexArtifact, registry: ModelRegistry
) -> Published:
    """Publish ``artifact``'s index, then prune the indices no kept version queries."""
    index = publisher.publish(artifact)
    keep = index_versions_to_keep(registry, artifact.version)
    return Published(index=index, kept=keep, pruned=publisher.prune(keep))
