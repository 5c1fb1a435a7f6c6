"""The runtime recommender the server calls: candidates -> features -> LightGBM -> top K.

``Recommender.load(path)`` verifies the bundle's checksums, loads the state and the
ranker once, and precomputes what requests share, so a request costs one user
lookup, a few hundred-row numpy gathers and one single-threaded LightGBM predict
(about a millisecond on a laptop core for a 200-item pool).

Instances are immutable after loading and safe to share between threads: the
server swaps whole instances (hot swap) instead of mutating one.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys_serving.index.base import CandidateIndex, CandidateQuery
from recsys_serving.logging import get_logger
from recsys_serving.model import candidates as cand
from recsys_serving.model.answers import ANSWERS_DIR, NO_ANSWER, AnswerTable, Ranked
from recsys_serving.model.bundle import BundleError, verify_bundle
from recsys_serving.model.context import UserContext, user_context
from recsys_serving.model.features import (
    FEATURE_NAMES,
    assemble_features,
    item_norms,
    padded_categories,
)
from recsys_serving.model.ranker import (
    DEFAULT_BLEND,
    Blend,
    BlendRanker,
    CompiledRanker,
    Ranker,
    RankerCompileError,
    compile_ranker,
    ranked_order,
)
from recsys_serving.model.state import IntArray, ModelState

RANKER_FILE = "ranker.txt"
STATE_DIR = "state"
INDEX_DIR = "index"
# Users whose candidate pools check a compiled ranker against LightGBM (plus a cold one),
# and whose stored answers are checked against their live ones.
CHECK_USERS = 8
REASONS_KEPT = 1 << 16

log = get_logger(__name__)

__all__ = ["Blend", "BlendRanker", "Ranker", "Recommender", "ScoredItem"]


def manifest_blend(manifest: Mapping[str, Any] | None) -> Blend | None:
    """The validated blend a manifest names (``ranking.blend``), if any."""
    ranking = (manifest or {}).get("ranking") or {}
    value = ranking.get("blend")
    return Blend.from_dict(value) if value else None


@dataclass(frozen=True, slots=True)
class ScoredItem:
    item_id: str
    score: float
    reason: str


class Recommender:
    """A loaded model bundle: see docs/architecture.md ("Runtime API")."""

    def __init__(
        self,
        state: ModelState,
        ranker: Ranker | CompiledRanker | BlendRanker,
        manifest: Mapping[str, Any] | None = None,
        path: Path | None = None,
        blend: Blend | None = None,
        answers: AnswerTable | None = None,
    ) -> None:
        self.state = state
        self.ranker = ranker
        self.manifest: dict[str, Any] = dict(manifest or {})
        # Breaks ties of ranker scores (and ranks alone when the ranker lost the gate).
        self.blend = blend or manifest_blend(self.manifest) or DEFAULT_BLEND
        self.path = path
        self.version: str = str(self.manifest.get("version", "unversioned"))
        self.pool = int(state.params.get("candidate_pool", cand.DEFAULT_POOL))
        self._retrieve = cand.exact_retriever(state)
        # Lookups built once here, not by the first requests (possibly concurrently).
        padded_categories(state)
        _ = state.item_index, state.user_index, state.category_index
        self._item_norms = item_norms(state)
        self._item_names: list[str] = [str(i) for i in state.item_ids.tolist()]
        # Reasons are words over (source, detail): a few thousand distinct ones serve
        # every answer, and formatting one from numpy strings costs more than a lookup.
        self._reason = lru_cache(maxsize=REASONS_KEPT)(partial(cand.reason, state))
        primary = padded_categories(state)[:, 0]
        self._primary = np.where(primary < state.n_categories, primary, -1)
        # The bundle's precomputed answers (model/answers.py) and, once checked against
        # this ranker, the ones requests may read (``answers``).
        self._table = answers
        self.answers: AnswerTable | None = None
        self._activate_answers()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path) -> Recommender:
        """Verify and load a bundle directory; ``BundleError`` when it is unusable."""
        root = Path(path)
        manifest = verify_bundle(root)
        names = manifest.get("feature_names")
        if names is not None and tuple(names) != FEATURE_NAMES:
            raise BundleError(
                f"{root}: bundle features {len(names)} do not match this code's "
                f"{len(FEATURE_NAMES)} (trained by another version of recsys)"
            )
        ranking = manifest.get("ranking") or {}
        try:
            state = ModelState.load(root / STATE_DIR)
            blend = manifest_blend(manifest)
            ranker: Ranker | BlendRanker
            if ranking.get("mode") == "blend" and blend is not None:
                # The ranker lost to the blend on validation: the blend ranks.
                ranker = BlendRanker(blend)
            else:
                ranker = Ranker.load(root / RANKER_FILE)
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"{root}: cannot load the model state ({exc})") from exc
        except Exception as exc:  # LightGBM raises its own error type for a bad model file
            raise BundleError(f"{root}: cannot load {RANKER_FILE} ({exc})") from exc
        try:  # optional: bundles written before answer tables have none and serve live
            answers = AnswerTable.load(root / STATE_DIR / ANSWERS_DIR, state.n_users)
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"{root}: cannot load the answer table ({exc})") from exc
        return cls(state, ranker, manifest, root, answers=answers)

    def compile_ranker(self, cache_dir: Path | None = None) -> CompiledRanker | BlendRanker:
        """Replace the LightGBM ranker by its native compilation (see ``model/ranker.py``),
        checked against LightGBM on real candidate pools first. Call it before the model
        serves (the server does, in its background loader); ``RankerCompileError`` when
        compilation is unavailable or wrong, leaving the LightGBM ranker in place. A
        model ranking by its blend has nothing to compile and keeps it."""
        if isinstance(self.ranker, CompiledRanker | BlendRanker):
            return self.ranker
        if self.path is None:
            raise RankerCompileError("unavailable", "a model without a bundle directory")
        entry = self.manifest.get("files", {}).get(RANKER_FILE, {})
        compiled = compile_ranker(
            self.path / RANKER_FILE,
            cache_dir,
            self.ranker,
            self._check_rows(),
            ranker_sha256=entry.get("sha256"),
        )
        self.ranker = compiled
        self._activate_answers()
        return compiled

    def _check_rows(self) -> npt.NDArray[np.float32]:
        """Feature rows of real requests: a few known users' pools and a cold user's."""
        state = self.state
        known = np.flatnonzero(np.diff(state.seen.indptr) > 0)[:CHECK_USERS]
        users = [str(state.user_ids[u]) for u in known.tolist()] + ["\0cold-check"]
        rows = []
        for user in users:
            ctx = user_context(state, user)
            allowed = cand.allowed_mask(state, ctx)
            pool = cand.generate(state, ctx, allowed, self.pool, None, self._retrieve)
            rows.append(assemble_features(state, ctx, pool.items))
        return np.concatenate(rows)

    def _activate_answers(self) -> None:
        """Let requests read the answer table only if it is this ranker's and a few
        users' stored answers equal their live ones bit for bit on this host (a
        compiled ranker built for another CPU may sum its trees in another order)."""
        table = self._table
        self.answers = None
        if table is None:
            return
        kind = str(getattr(self.ranker, "kind", type(self.ranker).__name__))
        if table.ranker != kind or table.depth > self.pool:
            log.info("answers.unused", version=self.version, table_ranker=table.ranker, ranker=kind)
            return
        answered = np.flatnonzero(np.diff(table.indptr) > 0)
        if not answered.size:
            return
        picks = answered[np.linspace(0, answered.size - 1, CHECK_USERS).astype(np.int64)]
        for row in np.unique(picks).tolist():
            user = str(self.state.user_ids[row])
            stored = table.answer(row, table.depth)
            live = self.ranked(user, table.depth)
            if not all(np.array_equal(a, b) for a, b in zip(stored, live, strict=True)):
                log.warning("answers.mismatch", version=self.version, user=user, ranker=kind)
                return
        self.answers = table
        log.info("answers.active", version=self.version, depth=table.depth, ranker=kind)

    # ------------------------------------------------------------------- lookup
    def knows_user(self, user_id: str) -> bool:
        return self.state.user_row(user_id) is not None

    def seen(self, user_id: str) -> frozenset[str]:
        row = self.state.user_row(user_id)
        if row is None:
            return frozenset()
        items, _ = self.state.seen.row(row)
        return frozenset(self.state.item_ids[items].tolist())

    # ----------------------------------------------------------------- requests
    def recommend(
        self,
        user_id: str,
        k: int,
        categories: Sequence[str] | None = None,
        exclude: Iterable[str] = frozenset(),
        user_doc: Mapping[str, Any] | None = None,
        index: CandidateIndex | None = None,
    ) -> list[ScoredItem]:
        """Top ``k`` unseen items for the user, best first, each with where it came from.

        ``categories`` keeps items in any of them; ``exclude`` ids are never returned;
        ``user_doc`` (the document store's record) gives cold users their stated
        interests; ``index`` replaces the bundle's embedded ALS retrieval (e.g. with
        Elasticsearch). Unknown users get a category-diverse popular/trending/new list.
        A known user's request that none of these change (``k`` up to the bundle's
        answer depth) is read from the answers training computed with :meth:`ranked`
        (``model/answers.py``); the rest runs :meth:`ranked` now.
        """
        if k <= 0:
            return []
        if not isinstance(exclude, Collection):
            exclude = tuple(exclude)  # read by the check below and again by the live path
        table = self.answers
        if table is not None and index is None and not categories and k <= table.depth:
            row = self.state.user_row(user_id)
            if row is not None and table.has(row) and self._excludes_nothing(row, exclude):
                return self._scored(table.answer(row, k))
        return self._scored(self.ranked(user_id, k, categories, exclude, user_doc, index))

    def ranked(
        self,
        user_id: str,
        k: int,
        categories: Sequence[str] | None = None,
        exclude: Iterable[str] = frozenset(),
        user_doc: Mapping[str, Any] | None = None,
        index: CandidateIndex | None = None,
    ) -> Ranked:
        """The live computation behind :meth:`recommend`: the shown items' rows, scores,
        source codes and source details. Training's answer table is this function's
        output for every known user (model/answers.py), so there is one implementation."""
        state = self.state
        ctx = user_context(state, user_id, user_doc)
        cat_rows = self._category_rows(categories)
        exclude_rows = self._item_rows(exclude)
        allowed = cand.allowed_mask(state, ctx, exclude_rows, cat_rows)
        retrieve = self._retrieve
        if index is not None:
            retrieve = self._index_retriever(index, ctx, exclude, categories)
        pool = cand.generate(state, ctx, allowed, max(self.pool, k), cat_rows, retrieve)
        if not len(pool):
            return NO_ANSWER
        features = assemble_features(state, ctx, pool.items)
        scores = self.ranker.score(features)
        order = ranked_order(scores, self.blend.score(features), pool.items)
        if not ctx.known:
            order = self._diversify(pool.items, order, k)
        shown = order[:k]
        return pool.items[shown], scores[shown], pool.source[shown], pool.refs(shown)

    def _scored(self, ranked: Ranked) -> list[ScoredItem]:
        # One conversion per array, then plain Python values per shown item.
        rows, scores, sources, refs = ranked
        names = self._item_names
        reason = self._reason
        return [
            ScoredItem(names[row], score, reason(source, ref))
            for row, score, source, ref in zip(
                rows.tolist(), scores.tolist(), sources.tolist(), refs.tolist(), strict=True
            )
        ]

    def _excludes_nothing(self, row: int, exclude: Collection[str]) -> bool:
        """Whether excluding ``exclude`` leaves the user's allowed items as they are:
        every id unknown, already seen by the user or unavailable."""
        if not exclude:
            return True
        rows = self._item_rows(exclude)
        if not rows.size:
            return True
        seen = self.state.seen.row(row)[0]
        at = np.minimum(np.searchsorted(seen, rows), max(seen.size - 1, 0))
        already = (seen[at] == rows) if seen.size else np.zeros(rows.size, dtype=bool)
        return bool(np.all(already | ~self.state.available[rows]))

    def similar(
        self,
        item_id: str,
        k: int,
        exclude: Iterable[str] = frozenset(),
        index: CandidateIndex | None = None,
    ) -> list[ScoredItem]:
        """Items like ``item_id``: co-visited in sessions or sharing an audience
        (item-kNN), then nearest in ALS space. ``KeyError`` for an unknown item."""
        state = self.state
        row = state.item_index.get(item_id)
        if row is None:
            raise KeyError(item_id)
        if k <= 0:
            return []
        excluded = frozenset(exclude) | {item_id}
        if index is not None:
            found = index.similar(item_id, k + len(excluded), excluded)
            return [
                ScoredItem(c.item_id, float(c.score), f"similar to {item_id}")
                for c in found
                if c.item_id not in excluded
            ][:k]
        allowed = state.available.copy()
        allowed[row] = False
        allowed[self._item_rows(excluded)] = False
        score: dict[int, float] = {}
        why: dict[int, str] = {}
        covisited, weights = state.covisit.row(row)
        if weights.size:
            for r, w in zip(covisited.tolist(), (weights / weights.max()).tolist(), strict=True):
                score[r] = w
                why[r] = f"co-visited with {item_id}"
        for r, w in zip(*(a.tolist() for a in state.item_knn.row(row)), strict=True):
            score[r] = score.get(r, 0.0) + w
            why.setdefault(r, f"similar to {item_id}")
        ranked = sorted((r for r in score if allowed[r]), key=lambda r: (-score[r], r))[:k]
        # Neighbour scores sit above 1 so the ALS fill-in below never outranks them.
        out = [ScoredItem(str(state.item_ids[r]), 1.0 + score[r], why[r]) for r in ranked]
        allowed[ranked] = False
        if len(out) < k:
            vector = state.item_factors[row]
            cosine = (state.item_factors @ vector) / np.maximum(
                self._item_norms * float(np.linalg.norm(vector)), 1e-12
            )
            for r in cand.top_k(cosine, allowed, k - len(out)).tolist():
                out.append(
                    ScoredItem(str(state.item_ids[r]), float(cosine[r]), f"similar to {item_id}")
                )
        return out

    def popular(
        self,
        k: int,
        categories: Sequence[str] | None = None,
        exclude: Iterable[str] = frozenset(),
    ) -> list[ScoredItem]:
        """The most popular available items (recent-decayed), touching nothing outside
        the bundle: the answer of last resort when a store or the index fails."""
        if k <= 0:
            return []
        state = self.state
        allowed = state.available.copy()
        allowed[self._item_rows(exclude)] = False
        cat_rows = self._category_rows(categories)
        if cat_rows is not None:
            in_cats = np.zeros(state.n_items, dtype=bool)
            for c in cat_rows.tolist():
                in_cats[state.category_popular.row(c)[0]] = True
            allowed &= in_cats
        rows = cand._walk(state.popular, allowed, k)
        popularity = state.item_column("log_pop_decayed")
        wanted = set(cat_rows.tolist()) if cat_rows is not None else set()
        out = []
        for r in rows:
            why = "popular"
            for c in state.item_categories.row(r)[0].tolist():
                if c in wanted:
                    why = f"popular in {state.categories[c]}"
                    break
            out.append(ScoredItem(str(state.item_ids[r]), float(popularity[r]), why))
        return out

    # ---------------------------------------------------------------- internals
    def _item_rows(self, item_ids: Iterable[str]) -> IntArray:
        index = self.state.item_index
        rows = [index[i] for i in item_ids if i in index]
        return np.asarray(rows, dtype=np.int64)

    def _category_rows(self, categories: Sequence[str] | None) -> IntArray | None:
        if not categories:
            return None
        index = self.state.category_index
        return np.asarray([index[c] for c in categories if c in index], dtype=np.int64)

    def _index_retriever(
        self,
        index: CandidateIndex,
        ctx: UserContext,
        exclude: Iterable[str],
        categories: Sequence[str] | None,
    ) -> cand.Retriever:
        state = self.state
        excluded = frozenset(exclude) | frozenset(state.item_ids[ctx.seen].tolist())

        def retrieve(vector: npt.NDArray[np.float32], k: int, allowed: npt.NDArray[np.bool_]):
            found = index.search(
                CandidateQuery(
                    k=k,
                    vector=vector,
                    exclude=excluded,
                    categories=tuple(categories) if categories else None,
                )
            )
            rows = [state.item_index.get(c.item_id) for c in found]
            return np.asarray([r for r in rows if r is not None and allowed[r]], dtype=np.int64)

        return retrieve

    def _diversify(self, items: IntArray, order: IntArray, k: int) -> IntArray:
        """Cap items per primary category so a cold-start list spans several categories."""
        cap = max(2, math.ceil(k / 4))
        counts: dict[int, int] = {}
        head: list[int] = []
        rest: list[int] = []
        for i in order.tolist():
            cat = int(self._primary[items[i]])
            if cat < 0 or counts.get(cat, 0) < cap:
                counts[cat] = counts.get(cat, 0) + 1
                head.append(i)
                if len(head) >= k:
                    break
            else:
                rest.append(i)
        if len(head) < k:
            head += rest[: k - len(head)]
        return np.asarray(head, dtype=np.int64)
