"""The logging policy: what the site showed before any learned model existed.

Historic logs are only as useful as the policy that produced them. This one mixes
popularity (so the logs look like a real, unpersonalised site) with uniform
exploration among published items (so every item gets some impressions and
off-policy estimates have support everywhere). The same function calibrates the
ground truth's CTR and can serve as the control arm when live traffic is simulated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from recsys_assets.simulation.truth import GroundTruth, IntArray

SLATE_SIZE = 10
RANDOM_SHARE = 0.3
MODEL_VERSION = "logging-policy"
# Draws per slot before de-duplication; popular items repeat, so sample generously.
OVERSAMPLE = 3


def logging_slates(
    truth: GroundTruth,
    rng: np.random.Generator,
    at_ms: IntArray,
    *,
    k: int = SLATE_SIZE,
    random_share: float = RANDOM_SHARE,
) -> npt.NDArray[np.int64]:
    """One ranked slate of distinct item indices per request, shape ``(len(at_ms), k)``.

    Only items published by the request time are eligible. Each slot is filled by a
    popularity-weighted draw (probability ``1 - random_share``) or a uniform draw;
    drawing in sequence without replacement makes the popularity part a
    Plackett-Luce ranking, so popular items tend to, but do not always, rank first.
    Rows are padded with ``-1`` when fewer than ``k`` items exist yet.
    """
    at = np.asarray(at_ms, dtype=np.int64)
    n = at.size
    order = truth.publish_order
    cum_weight = np.cumsum(truth.item_popularity[order])
    n_elig = truth.published_count(at)
    want = np.minimum(n_elig, k)
    if n == 0:
        return np.empty((0, k), dtype=np.int64)

    m = k * OVERSAMPLE
    elig = np.maximum(n_elig, 1)[:, None]
    u = rng.random((n, m))
    uniform_pick = np.minimum((u * elig).astype(np.int64), elig - 1)
    total = cum_weight[elig[:, 0] - 1][:, None]
    popular_pick = np.minimum(np.searchsorted(cum_weight, u * total, side="right"), elig - 1)
    explore = rng.random((n, m)) < random_share
    cand = np.where(explore, uniform_pick, popular_pick)

    # Keep the first occurrence of each candidate, in draw order.
    srt = np.argsort(cand, axis=1, kind="stable")
    vals = np.take_along_axis(cand, srt, axis=1)
    first_sorted = np.ones_like(vals, dtype=bool)
    first_sorted[:, 1:] = vals[:, 1:] != vals[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, srt, first_sorted, axis=1)
    keep = first & (np.cumsum(first, axis=1) <= want[:, None])

    compact = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    slates = np.take_along_axis(cand, compact, axis=1)
    have = keep.sum(axis=1)
    slates[np.arange(k)[None, :] >= have[:, None]] = -1

    for row in np.flatnonzero(have < want):
        # Rare: tiny catalogues or extreme popularity. Top up uniformly.
        chosen = [int(x) for x in slates[row, : have[row]]]
        seen = set(chosen)
        while len(chosen) < want[row]:
            for x in rng.integers(0, n_elig[row], size=2 * (want[row] - len(chosen)) + 4):
                if int(x) not in seen and len(chosen) < want[row]:
                    seen.add(int(x))
                    chosen.append(int(x))
        slates[row, : len(chosen)] = chosen

    return np.where(slates >= 0, order[np.maximum(slates, 0)], -1)


__all__ = ["MODEL_VERSION", "RANDOM_SHARE", "SLATE_SIZE", "logging_slates"]
