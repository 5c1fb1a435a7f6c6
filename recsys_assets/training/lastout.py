"""Leave-last-out ranking queries: every sampled user's own recent past as a query.

The global cut-offs of the ranking dataset only see users who happen to be active
right after them; on logs where users come in short bursts at different times (ratings
sites), that is a handful of users, and the ranker learns little (one tree, in the
measurement of issue 11). Here each sampled user's last ``lastout_share`` of events
before the holdout (in their own time order) is held out, and ONE extra state
(snapshot ``lastout``) is built as of the holdout start from everything else, so the
held-out events are every sampled user's own future and nobody else's past: leak-free
for those users, and shaped like serving a user whose burst ended months before "now".

The same split chooses the EASE regularisation (``ease.py``): per-user validation
built from training data only, never from the holdout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl

from recsys_assets.training.data import Encoded, TrainingWindow, impression_slices
from recsys_assets.training.params import TrainingParams
from recsys_assets.training.ranking import best_grades

SNAPSHOT = "lastout"


@dataclass
class LastOut:
    """Which events are held out (``mask`` over the encoded rows) and for whom."""

    mask: npt.NDArray[np.bool_]
    users: npt.NDArray[np.int64]
    as_of: float

    def kept(self, enc: Encoded) -> Encoded:
        """The encoding without the held-out events, nor the impressions their users
        saw from their first held-out event on (shown-but-not-clicked counts would
        otherwise lose their clicks)."""
        keep = ~self.mask
        n_users = int(max(enc.user.max(initial=-1), enc.imp_user.max(initial=-1))) + 1
        first = np.full(max(n_users, 1), np.inf)
        np.minimum.at(first, enc.user[self.mask], enc.ts[self.mask])
        # One slice of the impressions at a time: whole-array temporaries (a float64
        # limit per impression) are over a gigabyte at 100M events.
        keep_imp = np.empty(enc.imp_user.size, dtype=bool)
        for part in impression_slices(enc.imp_user.size):
            imp_user = enc.imp_user[part]
            known = imp_user >= 0
            keep_imp[part] = ~(known & (enc.imp_ts[part] >= first[np.where(known, imp_user, 0)]))
        values = {}
        for f in dataclasses.fields(enc):
            value = getattr(enc, f.name)
            values[f.name] = value[keep_imp] if f.name.startswith("imp_") else value[keep]
        return Encoded(**values)

    def labels(self, enc: Encoded) -> dict[int, dict[int, int]]:
        """Grades per (user, item) of the held-out events, items the user had not
        interacted with in the kept events (recommenders never repeat seen items)."""
        held = pl.DataFrame(
            {"u": enc.user[self.mask], "i": enc.item[self.mask], "g": enc.grade[self.mask]}
        )
        kept_mask = ~self.mask & (enc.ts < self.as_of) & np.isin(enc.user, self.users)
        kept = pl.DataFrame({"u": enc.user[kept_mask], "i": enc.item[kept_mask]}).unique()
        return best_grades(held.join(kept, on=["u", "i"], how="anti"))


def leave_last_out(enc: Encoded, window: TrainingWindow, params: TrainingParams) -> list[LastOut]:
    """Up to ``lastout_rounds`` disjoint samples of users with at least
    ``lastout_min_events`` events before the holdout, each at most
    ``lastout_max_users_share`` of them (and ``lastout_users`` over all rounds), with
    their held-out events; one snapshot each. Empty when switched off or when no user
    qualifies."""
    as_of = window.holdout_start
    if params.lastout_users <= 0 or params.lastout_rounds <= 0:
        return []
    before = np.flatnonzero(enc.ts < as_of)
    if not before.size:
        return []
    counts = np.bincount(enc.user[before])
    eligible = np.flatnonzero(counts >= params.lastout_min_events)
    if not eligible.size:
        return []
    rng = np.random.default_rng([params.seed, 0x1A57])
    per_round = min(
        -(-params.lastout_users // params.lastout_rounds),
        max(1, int(eligible.size * params.lastout_max_users_share)),
    )
    shuffled = rng.permutation(eligible)
    out = []
    for j in range(params.lastout_rounds):
        chosen = np.sort(shuffled[j * per_round : (j + 1) * per_round])
        if not chosen.size:
            break
        out.append(_held_out(enc, before, counts, chosen, params, float(as_of)))
    return out


def _held_out(
    enc: Encoded,
    before: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    users: npt.NDArray[np.int64],
    params: TrainingParams,
    as_of: float,
) -> LastOut:
    rows = before[np.isin(enc.user[before], users)]
    # Each user's events in time order (ties: encoded order), the last share held out.
    order = np.lexsort((rows, enc.ts[rows], enc.user[rows]))
    rows = rows[order]
    owner = enc.user[rows]
    starts = np.searchsorted(owner, owner, side="left")
    rank = np.arange(rows.size) - starts
    n = counts[owner]
    held = np.maximum(np.floor(n * params.lastout_share), 1)
    mask = np.zeros(enc.ts.size, dtype=bool)
    mask[rows[rank >= n - held]] = True
    return LastOut(mask=mask, users=users.astype(np.int64), as_of=as_of)
