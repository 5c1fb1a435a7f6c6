"""Peak memory of ``retrieval_model``'s window-dependent data path, without its fits.

The same loop as ``steps.run_retrieval`` over a kept world whose ``interactions`` step
ran (a ``bench/train.py --keep`` home): ``load_prepared``, then per snapshot the
encoding it is built from (``prep.enc_for``, held until the next one, as the step holds
it), the ALS interaction matrix and session co-visitation. The ALS, EASE and kNN fits
are skipped: at 100M events they take an hour of CPU, while what grows with the log is
this part. Prints peak RSS and CPU seconds after each snapshot, one JSON line each.

Usage::

    RECSYS_BENCH=1 nice -n 10 .venv/bin/python bench/probe_retrieval.py $HOME_OF_KEPT_WORLD
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def mark(label: str) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = {
        "at": label,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }
    print(json.dumps(figures), flush=True)


def main() -> None:
    os.environ["RECSYS_HOME"] = str(Path(sys.argv[1]).resolve())
    from recsys_assets.training import steps
    from recsys_assets.training.params import TrainingParams
    from recsys_assets.training.retrieval import als_matrix, covisitation
    from recsys_serving.lake import open_lake
    from recsys_serving.settings import Settings

    settings = Settings()
    lake = open_lake(settings.resolved_lake_uri)
    params = TrainingParams.from_settings(settings)
    prep = steps.load_prepared(lake)
    mark("load_prepared")
    for snap in prep.snapshots():
        enc = prep.enc_for(snap)
        matrix = als_matrix(enc, prep.vocab, prep.as_of(snap), params)
        covisitation(enc, prep.vocab.item_ids.size, prep.as_of(snap), params)
        del matrix
        mark(snap)


if __name__ == "__main__":
    main()
