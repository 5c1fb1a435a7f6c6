"""Answers precomputed at training time (model/answers.py) are the live answers, exactly."""

from __future__ import annotations

import dataclasses
import json
import mmap
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from model_support import tiny_bundle, tiny_outcome, tiny_world

from recsys_serving.index.base import Candidate, CandidateQuery
from recsys_serving.model.answers import ANSWERS_DIR, AnswerTable, precompute_answers
from recsys_serving.model.bundle import MANIFEST, verify_bundle
from recsys_serving.model.recommender import STATE_DIR, Recommender, ScoredItem

__all__ = ["tiny_bundle", "tiny_outcome", "tiny_world"]  # fixtures used below


@pytest.fixture(scope="module")
def served(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    """The bundle as the server runs it: loaded, then its ranker compiled."""
    model = Recommender.load(tiny_bundle)
    model.compile_ranker(tmp_path_factory.mktemp("ranker-cache"))
    return model


class CountingLive:
    """Counts the live computations a Recommender runs (its ``ranked`` calls)."""

    def __init__(self, model: Recommender, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        live = model.ranked

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return live(*args, **kwargs)

        monkeypatch.setattr(model, "ranked", counted)


def mapped(array: Any) -> bool:
    """Whether an array's memory is a file mapping (``mmap``), looking through views."""
    while array is not None:
        if isinstance(array, mmap.mmap):
            return True
        array = getattr(array, "base", None)
    return False


def known_users(model: Recommender) -> list[str]:
    return [u for u in model.state.user_ids.tolist() if model.knows_user(u)]


def live_answer(model: Recommender, user: str, k: int, **request: Any) -> list[ScoredItem]:
    return model._scored(model.ranked(user, k, **request))


def test_training_writes_a_checksummed_table_for_every_known_user(
    tiny_bundle: Path, served: Recommender
) -> None:
    manifest = verify_bundle(tiny_bundle)
    listed = {name for name in manifest["files"] if name.startswith(f"{STATE_DIR}/{ANSWERS_DIR}/")}
    assert {Path(name).name for name in listed} == {
        "answers.json",
        "indptr.npy",
        "items.npy",
        "scores.npy",
        "sources.npy",
        "refs.npy",
    }
    depth = manifest["params"]["answer_depth"]
    assert manifest["answers"]["depth"] == depth == 20
    table = served.answers
    assert table is not None, "the served (compiled) ranker must use the bundle's table"
    assert table.ranker == served.ranker.kind == manifest["answers"]["ranker"]
    # Mapped from the bundle's file, not read into each worker's memory.
    assert all(mapped(getattr(table, name)) for name in ("items", "scores", "sources", "refs"))
    users = known_users(served)
    assert manifest["answers"]["users"] == len(users) > 50
    for user in users:
        row = served.state.user_index[user]
        assert 0 < table.indptr[row + 1] - table.indptr[row] <= depth


def test_every_known_user_is_answered_from_the_table_exactly_as_live(
    served: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = served.answers
    assert table is not None
    depth = table.depth
    users = known_users(served)
    expected = {
        (user, k): live_answer(served, user, k) for user in users for k in (1, 10, depth, depth + 1)
    }
    live = CountingLive(served, monkeypatch)
    for (user, k), want in expected.items():
        got = served.recommend(user, k)
        assert got == want, (user, k)  # items, scores (float equality) and reasons
        assert len(got) == min(k, len(expected[(user, depth + 1)]))
    # Only the k > depth requests ran the live path.
    assert live.calls == len(users)
    # A deeper live answer starts with the table's (one pool for every k <= pool).
    for user in users:
        assert expected[(user, depth + 1)][:depth] == expected[(user, depth)]


def test_requests_that_change_the_answer_bypass_the_table(
    served: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = known_users(served)[:25]
    shown = {user: served.recommend(user, 10) for user in users}
    category = str(served.state.categories[0])
    live = CountingLive(served, monkeypatch)
    for user in users:
        top = shown[user][0].item_id
        want = live_answer(served, user, 10, exclude=frozenset({top}))
        assert served.recommend(user, 10, exclude={top}) == want
        assert top not in {s.item_id for s in want}
        want = live_answer(served, user, 10, categories=[category])
        assert served.recommend(user, 10, categories=[category]) == want
    assert live.calls == 4 * len(users)

    class EveryItem:  # an external index (Elasticsearch's role) answering from the bundle
        def search(self, query: CandidateQuery) -> list[Candidate]:
            ids = [i for i in served.state.item_ids.tolist() if i not in query.exclude]
            return [Candidate(i, 1.0, "knn") for i in ids[: query.k]]

    before = live.calls
    for user in users:
        served.recommend(user, 10, index=EveryItem())  # type: ignore[arg-type]
    assert live.calls == before + len(users)


def test_requests_that_cannot_change_the_answer_still_read_the_table(
    served: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = known_users(served)[:25]
    live = CountingLive(served, monkeypatch)
    for user in users:
        seen_item = sorted(served.seen(user))[0]
        exclude = (i for i in (seen_item, "no-such-item"))  # a one-shot iterable
        want = live_answer(served, user, 10, exclude={seen_item, "no-such-item"})
        # user_doc is read only for users without history (user_context).
        doc = {"categories": [str(served.state.categories[-1])]}
        assert served.recommend(user, 10, exclude=exclude, user_doc=doc) == want
        assert served.recommend(user, 10, categories=[]) == live_answer(served, user, 10)
    assert live.calls == 2 * len(users)  # only the expected answers above ran live
    cold = served.recommend("nobody-we-know", 10)
    assert cold == live_answer(served, "nobody-we-know", 10)


def test_a_table_that_disagrees_with_this_host_is_not_used(served: Recommender) -> None:
    table = served.answers
    assert table is not None
    scores = np.array(table.scores)
    scores[:] += 1e-12  # what a ranker compiled for another CPU could give
    altered = dataclasses.replace(table, scores=scores)
    model = Recommender(served.state, served.ranker, served.manifest, answers=altered)
    assert model.answers is None
    user = known_users(served)[0]
    assert model.recommend(user, 10) == served.recommend(user, 10)
    # The table of one ranker kind is not read under another (LightGBM's scores differ
    # from the compiled ones by ~1e-9).
    assert Recommender.load(served.path).answers is None  # not compiled yet


def test_a_bundle_without_a_table_loads_and_serves_live(
    tiny_bundle: Path, served: Recommender, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / tiny_bundle.name
    shutil.copytree(tiny_bundle, old)
    shutil.rmtree(old / STATE_DIR / ANSWERS_DIR)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["files"] = {
        name: entry
        for name, entry in manifest["files"].items()
        if not name.startswith(f"{STATE_DIR}/{ANSWERS_DIR}/")
    }
    manifest.pop("answers")
    (old / MANIFEST).write_text(json.dumps(manifest))
    model = Recommender.load(old)
    model.compile_ranker(tmp_path / "cache")
    assert model.answers is None
    live = CountingLive(model, monkeypatch)
    users = known_users(model)[:30]
    for user in users:
        assert model.recommend(user, 10) == served.recommend(user, 10)
    assert live.calls == len(users)


def test_forked_workers_compute_the_same_table(served: Recommender) -> None:
    table = served.answers
    assert table is not None
    progress: list[tuple[int, int]] = []

    def note(done: int, total: int, seconds: float) -> None:
        progress.append((done, total))

    import recsys_serving.model.answers as answers

    serial = precompute_answers(served, table.depth, workers=1)
    original = answers.CHUNK_USERS
    answers.CHUNK_USERS = 40  # several chunks on the tiny world
    try:
        forked = precompute_answers(served, table.depth, workers=2, progress=note)
    finally:
        answers.CHUNK_USERS = original
    for name in ("indptr", "items", "scores", "sources", "refs"):
        assert np.array_equal(getattr(serial, name), getattr(forked, name)), name
        assert np.array_equal(getattr(serial, name), getattr(table, name)), name
    assert len(progress) > 1 and progress[-1][0] == progress[-1][1] == len(known_users(served))


def test_a_table_of_another_format_is_ignored(tmp_path: Path, served: Recommender) -> None:
    table = served.answers
    assert table is not None
    table.save(tmp_path / "answers")
    meta = json.loads((tmp_path / "answers" / "answers.json").read_text())
    assert AnswerTable.load(tmp_path / "answers", served.state.n_users) is not None
    (tmp_path / "answers" / "answers.json").write_text(json.dumps({**meta, "format": 99}))
    assert AnswerTable.load(tmp_path / "answers", served.state.n_users) is None
    with pytest.raises(ValueError, match="does not match the state"):
        (tmp_path / "answers" / "answers.json").write_text(json.dumps(meta))
        AnswerTable.load(tmp_path / "answers", served.state.n_users + 1)


@pytest.fixture(autouse=True)
def _answers_are_active(served: Recommender) -> Iterator[None]:
    yield
    assert served.answers is not None
