"""Training on real-data-shaped logs: what the window and the interactions make of them."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from model_support import land_and_process

from recsys_assets.training import steps
from recsys_assets.training.data import TrainingDataError, quarantined_reasons
from recsys_assets.training.params import TrainingParams
from recsys_serving.lake import LocalLake
from recsys_serving.settings import Settings


def _ratings(path: Path, first_ts: int, n: int = 300) -> Path:
    """MovieLens-style lines: integer ids, epoch seconds, explicit values."""
    path.write_bytes(
        b"\n".join(
            orjson.dumps(
                {
                    "event_id": f"ml-{k}",
                    "event_type": "rating",
                    "user_id": k % 17,
                    "item_id": k % 23,
                    "ts": first_ts + 3_600 * k,
                    "value": float(1 + k % 5),
                }
            )
            for k in range(n)
        )
    )
    return path


def test_a_window_emptied_by_the_catalog_epoch_says_so_and_what_to_do(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    # 1990: before the default RECSYS_CATALOG_EPOCH, so processing quarantines all of it.
    land_and_process(
        lake, Settings(home=tmp_path), [_ratings(tmp_path / "old.ndjson", 631_152_000)]
    )
    assert quarantined_reasons(lake) == {"before_catalog_epoch": 300}
    with pytest.raises(TrainingDataError) as info:
        steps.run_interactions(lake, TrainingParams.create(threads=1))
    message = str(info.value)
    assert message.startswith("no interactions in the training window")
    assert "300 were quarantined" in message
    assert "before_catalog_epoch 300" in message and "RECSYS_CATALOG_EPOCH" in message


def test_an_empty_lake_still_says_to_ingest_first(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path / "lake")
    with pytest.raises(TrainingDataError, match="ingest weblogs first"):
        steps.run_interactions(lake, TrainingParams.create(threads=1))
