"""Ranked answers of the known users, computed at training time and served from the bundle.

Why this is exact: the runtime folds no new events into a served state, so for a user
the state knows, ``Recommender.recommend(user, k)`` is a pure function of (bundle,
user, k) as long as the request adds nothing of its own. Checked in the code, a
request adds nothing when:

* it names no ``categories`` (a category filter changes the allowed items, the
  category source and therefore the pool the ranker sees);
* every ``exclude`` id it names is unknown, already seen by the user or unavailable
  (any other exclusion changes the allowed mask, so the sources fill the pool with
  other items, which can outrank the ones shown);
* it uses the bundle's embedded retrieval (no external ``index``, whose answers live
  outside the bundle);
* ``k`` is at most the table's depth, itself at most the candidate pool (the pool is
  ``max(pool, k)`` items, so every ``k <= pool`` ranks the same pool and the answer for
  ``k`` is the first ``k`` of the answer for ``depth``).

``user_doc`` plays no part: ``user_context`` reads it only for users without history,
who have no row here and are answered live. Everything else (cold users, filters,
exclusions, Elasticsearch, ``k > depth``) takes the live path, which stays the product.

The table is computed by ``Recommender.ranked``, the function the live path runs, for
every known user at ``depth``, and stored under the bundle's ``state/answers/`` as
flat ``.npy`` arrays (a CSR by user row: item rows, ranker scores as the live path
returns them, source codes and source details from which ``candidates.reason`` words
the reason at request time). They are memory-mapped, so a worker's RSS grows with the
answers it actually serves, not with users x depth. The bundle checksums cover them
like every other file; a bundle without them (older ones) serves everything live.

A table records the ranker kind that computed it (``compiled``, ``lightgbm``,
``blend``): compiled and LightGBM scores agree only to ~1e-9, so a table is used only
under a ranker of the same kind, and only after a few users' table answers have been
found equal, bit for bit, to their live answers on the serving host
(``Recommender._activate_answers``; ``Recommender.answers`` is the table in use).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from recsys_serving.logging import get_logger
from recsys_serving.model.state import ModelState

log = get_logger(__name__)

ANSWERS_DIR = "answers"
ANSWERS_META = "answers.json"
# Version of the answer table's layout, independent of STATE_FORMAT: the table is an
# optional addition to a state, so an unknown table version is ignored (served live),
# never a reason to refuse the bundle.
ANSWERS_FORMAT = 1
_ARRAYS = ("indptr", "items", "scores", "sources", "refs")
# Users per unit of work handed to a worker process (progress is logged per chunk).
CHUNK_USERS = 2_000

# One ranked answer as arrays: item rows, scores, source codes, source details.
Ranked = tuple[
    npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int8], npt.NDArray[np.int64]
]
# The answer to a request with no candidate (and the join of no answers).
NO_ANSWER: Ranked = (
    np.empty(0, np.int64),
    np.empty(0, np.float64),
    np.empty(0, np.int8),
    np.empty(0, np.int64),
)


class Answerer(Protocol):
    """What computes answers: ``Recommender`` (typed here without importing it, which
    imports this module)."""

    state: ModelState
    pool: int
    ranker: Any

    def ranked(self, user_id: str, k: int) -> Ranked: ...


@dataclass(frozen=True)
class AnswerTable:
    """Precomputed answers, user row -> the ``depth`` best (fewer when the pool is smaller)."""

    depth: int
    ranker: str  # the ranker kind that scored them
    indptr: npt.NDArray[np.int64]  # (n_users + 1,)
    items: npt.NDArray[np.int32]
    scores: npt.NDArray[np.float64]
    sources: npt.NDArray[np.int8]
    refs: npt.NDArray[np.int32]

    @property
    def n_users(self) -> int:
        return int(self.indptr.size - 1)

    @property
    def answered_users(self) -> int:
        """Users with an answer (known users whose pool was not empty)."""
        return int(np.count_nonzero(np.diff(self.indptr)))

    def has(self, row: int) -> bool:
        return bool(self.indptr[row + 1] > self.indptr[row])

    def answer(self, row: int, k: int) -> Ranked:
        """The first ``k`` of the user's answer (the caller checked ``k <= depth``)."""
        lo = int(self.indptr[row])
        hi = min(int(self.indptr[row + 1]), lo + k)
        # Views of the mapped arrays, in their stored dtypes (the caller lists them).
        return (
            self.items[lo:hi],  # type: ignore[return-value]
            self.scores[lo:hi],
            self.sources[lo:hi],
            self.refs[lo:hi],  # type: ignore[return-value]
        )

    # -------------------------------------------------------------- persistence
    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name in _ARRAYS:
            path = directory / f"{name}.npy"
            np.save(path, getattr(self, name), allow_pickle=False)
            written.append(path)
        meta = directory / ANSWERS_META
        meta.write_text(
            json.dumps(
                {
                    "format": ANSWERS_FORMAT,
                    "depth": self.depth,
                    "ranker": self.ranker,
                    "users": self.answered_users,
                    "answers": int(self.items.size),
                },
                indent=2,
                sort_keys=True,
            )
        )
        return [*written, meta]

    @classmethod
    def load(cls, directory: Path, n_users: int) -> AnswerTable | None:
        """The table under ``directory``, memory-mapped; ``None`` when the bundle has
        none or one this code does not read (the bundle then serves live)."""
        meta_path = directory / ANSWERS_META
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != ANSWERS_FORMAT:
            log.warning("answers.ignored", path=str(directory), format=meta.get("format"))
            return None
        # Plain ndarray views of the mappings: slicing an np.memmap builds a memmap per
        # slice (a few microseconds each, four per request).
        arrays = {
            name: np.asarray(np.load(directory / f"{name}.npy", mmap_mode="r")) for name in _ARRAYS
        }
        table = cls(depth=int(meta["depth"]), ranker=str(meta["ranker"]), **arrays)
        size = int(table.indptr[-1]) if table.indptr.size else -1
        if table.n_users != n_users or any(
            getattr(table, name).shape != (size,) for name in _ARRAYS[1:]
        ):
            raise ValueError(f"{directory}: answer table does not match the state")
        return table


# ------------------------------------------------------------------ precomputing
# The recommender the worker processes answer with: set before they fork, inherited
# (with its compiled ranker's code) instead of pickled.
_FORKED: Answerer | None = None


def _answer_rows(
    recommender: Answerer, rows: npt.NDArray[np.int64], depth: int
) -> tuple[Ranked, npt.NDArray[np.int64]]:
    """The answers of user ``rows`` concatenated, and each one's length."""
    names = recommender.state.user_ids
    parts = [recommender.ranked(str(names[r]), depth) for r in rows.tolist()]
    lengths = np.asarray([p[0].size for p in parts], dtype=np.int64)
    if not parts:
        return NO_ANSWER, lengths
    joined = tuple(np.concatenate([p[i] for p in parts]) for i in range(4))
    return joined, lengths  # type: ignore[return-value]


def _forked_chunk(job: tuple[npt.NDArray[np.int64], int]) -> tuple[Ranked, npt.NDArray[np.int64]]:
    if _FORKED is None:
        raise RuntimeError("answer workers start by fork from precompute_answers")
    return _answer_rows(_FORKED, job[0], job[1])


def _chunks(
    recommender: Answerer, rows: npt.NDArray[np.int64], depth: int, workers: int
) -> Iterator[tuple[Ranked, npt.NDArray[np.int64]]]:
    jobs = [(rows[i : i + CHUNK_USERS], depth) for i in range(0, rows.size, CHUNK_USERS)]
    if workers <= 1 or len(jobs) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for chunk, _ in jobs:
            yield _answer_rows(recommender, chunk, depth)
        return
    global _FORKED
    _FORKED = recommender
    # fork: the children share the state's pages and the compiled ranker's code (spawn
    # would load the state again per worker and recompile or reload the ranker). An
    # executor shut down by waiting, not multiprocessing.Pool, whose terminate() can
    # hang joining a worker it started while terminating (seen in a retrain).
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        yield from executor.map(_forked_chunk, jobs)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        _FORKED = None


def precompute_answers(
    recommender: Answerer,
    depth: int,
    workers: int = 1,
    progress: Callable[[int, int, float], None] | None = None,
) -> AnswerTable:
    """Every known user's ``Recommender.ranked(user, depth)`` answer as a table.

    ``depth`` is capped at the candidate pool (see the module docstring); ``workers``
    > 1 answers user chunks in forked processes (one per core: the per-request work is
    hundreds of small numpy calls that hold the GIL, so threads would not scale).
    ``progress(done_users, total_users, seconds)`` is called after each chunk.
    """
    depth = min(depth, recommender.pool)
    if depth <= 0:
        raise ValueError("answer depth must be positive")
    state = recommender.state
    known = np.flatnonzero(np.diff(state.seen.indptr) > 0).astype(np.int64)
    counts = np.zeros(state.n_users, dtype=np.int64)
    pieces: list[Ranked] = []
    started = time.perf_counter()
    done = 0
    for (items, scores, sources, refs), lengths in _chunks(recommender, known, depth, workers):
        chunk = known[done : done + lengths.size]
        counts[chunk] = lengths
        pieces.append((items, scores, sources, refs))
        done += lengths.size
        if progress is not None:
            progress(done, int(known.size), time.perf_counter() - started)
    indptr = np.zeros(state.n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])

    def joined(i: int, dtype: Any) -> Any:
        if not pieces:
            return np.empty(0, dtype=dtype)
        return np.concatenate([p[i] for p in pieces]).astype(dtype, copy=False)

    if state.n_items >= np.iinfo(np.int32).max:
        raise ValueError("answer tables store item rows as int32")
    return AnswerTable(
        depth=depth,
        ranker=str(recommender.ranker.kind),
        indptr=indptr,
        items=joined(0, np.int32),
        scores=joined(1, np.float64),
        sources=joined(2, np.int8),
        refs=joined(3, np.int32),
    )
