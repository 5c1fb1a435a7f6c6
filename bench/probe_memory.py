"""Where a training step's peak memory goes: one step in-process, its phases timed.

Runs one step of the retrain (as ``bench/train.py`` does, in a process of its own) on
a kept world whose earlier steps ran (a ``bench/train.py --keep`` home), with the
functions that make up the evaluation and the snapshot builds wrapped: for each call,
the resident set at entry and exit and how far the process's peak (``ru_maxrss``) rose
during it. A call that raises the peak while its wrapped callees do not is where the
memory goes. One JSON line per call (nested calls indented by depth), then the step's
peak.

Usage::

    RECSYS_BENCH=1 .venv/bin/python bench/probe_memory.py $HOME_OF_KEPT_WORLD model_evaluation
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# module:attribute of the functions to time; wrapped in every module below that
# imported them by name, so the step's own calls go through the wrapper.
WRAPPED = (
    "recsys_assets.training.steps:load_prepared",
    "recsys_assets.training.steps:load_state",
    "recsys_assets.training.steps:run_per_user_evaluation",
    "recsys_assets.training.steps:snapshot_state",
    "recsys_assets.training.steps:_listed",
    "recsys_assets.training.evaluation:build_holdout",
    "recsys_assets.training.evaluation:per_user_split",
    "recsys_assets.training.evaluation:evaluate",
    "recsys_assets.training.snapshot:item_snapshot",
    "recsys_assets.training.snapshot:user_snapshot",
    "recsys_assets.training.snapshot:assemble_state",
    "recsys_assets.training.retrieval:als_matrix",
    "recsys_assets.training.retrieval:fit_als",
    "recsys_assets.training.retrieval:retrieval_snapshot",
    "recsys_assets.training.retrieval:user_factors",
    "recsys_assets.training.retrieval:covisitation",
    "recsys_assets.training.retrieval:item_knn",
    "recsys_assets.training.ease:ease_graph",
    "recsys_assets.training.ease:select_lambda",
    "recsys_assets.training.ease:_gram",
    "recsys_assets.training.ease:ease_weights",
    "recsys_assets.training.ease:_graph",
)
MODULES = (
    "recsys_assets.training.steps",
    "recsys_assets.training.evaluation",
    "recsys_assets.training.snapshot",
    "recsys_assets.training.retrieval",
    "recsys_assets.training.ease",
)
_depth = [0]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        rss0, peak0 = _rss_mib(), _peak_mib()
        _depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth[0] -= 1
            peak1 = _peak_mib()
            line = {
                "call": "  " * _depth[0] + name,
                "rss_in": round(rss0),
                "rss_out": round(_rss_mib()),
                "peak_before": round(peak0),
                "peak_after": round(peak1),
                "raised": round(peak1 - peak0),
            }
            print(json.dumps(line), flush=True)

    timed.__wrapped_probe__ = True  # type: ignore[attr-defined]
    return timed


def install() -> None:
    modules = [importlib.import_module(m) for m in MODULES]
    for spec in WRAPPED:
        module_name, attr = spec.split(":")
        original = getattr(importlib.import_module(module_name), attr)
        if getattr(original, "__wrapped_probe__", False):
            continue
        wrapped = _wrap(attr, original)
        for module in modules:
            if getattr(module, attr, None) is original:
                setattr(module, attr, wrapped)


def main() -> None:
    home, step = Path(sys.argv[1]).resolve(), sys.argv[2]
    os.environ["RECSYS_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    from recsys_assets.training import graph
    from recsys_serving.lake import open_lake
    from recsys_serving.settings import Settings

    install()
    settings = Settings()
    lake = open_lake(settings.resolved_lake_uri)
    cache = Path(settings.resolved_home) / "cache" / "training"
    cache.mkdir(parents=True, exist_ok=True)
    env = graph.StepEnv(
        lake=lake,
        params=settings.training,
        staging=cache / "bundles",
        cache_dir=cache,
        rule=settings.promotion,
    )
    graph.execute(graph.BY_NAME[step], env, graph.LakeOutputs(lake))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "step": step,
                "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
