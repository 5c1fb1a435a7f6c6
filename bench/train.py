"""Training cost: wall time and peak memory of the whole graph, per asset.

For each size: simulate a history, land it with ``recsys ingest --no-process``, process
the weblogs partitions (business rules + Parquet, ``bench/process_only.py``), load the
catalogue into the document store and snapshot it, then run every training asset's
step function in its own process, in graph order (as Dagster's multiprocess executor
does), recording wall time and that process's peak RSS. ALS and LightGBM fit times
come from the steps' own reports.

30M and 100M events are copies of the 10M world with disjoint users (``REPLICATED``),
built from its processed partitions one partition at a time.

Usage::

    .venv/bin/python bench/train.py                       # 1M and 10M events
    .venv/bin/python bench/train.py --events 1000000      # one size
    .venv/bin/python bench/train.py --out bench/results/train.json
    # keep the worlds, then retrain on the same inputs (another checkout, or 100M):
    .venv/bin/python bench/train.py --events 10000000 --keep /tmp/k
    H=$(ls -d /tmp/k/recsys-train-10000000-*/home)
    .venv/bin/python bench/train.py --events 10000000 --from-home $H
    nice -n 10 .venv/bin/python bench/train.py --events 100000000 --from-home $H
    # one step again, in place, on a kept world whose earlier steps ran (other code):
    .venv/bin/python bench/train.py --rerun $K/home --steps model_evaluation
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CODE = {"root": ROOT}  # the checkout whose code the steps run (--code)
PYTHON = sys.executable
RECSYS = str(Path(PYTHON).parent / "recsys")

# World shape per size: users and items grow with the log, as a real site's would.
WORLDS: dict[int, dict[str, int]] = {
    1_000_000: {"users": 20_000, "items": 5_000, "categories": 30, "days": 14},
    10_000_000: {"users": 200_000, "items": 30_000, "categories": 50, "days": 30},
}
# Bigger worlds are copies of the 10M world's processed weblogs with disjoint users
# (ids, sessions, requests and event ids suffixed per copy; items and times shared):
# simulating and landing 100M events through `recsys ingest` would take longer than
# the retrain itself, and the retrain's cost is what this benchmark measures.
REPLICATED = {30_000_000: (10_000_000, 3), 100_000_000: (10_000_000, 10)}

STEP_CODE = """
import json, sys, time
from pathlib import Path
from recsys_assets.training import graph
from recsys_serving.lake import open_lake
from recsys_serving.settings import Settings
settings = Settings()
lake = open_lake(settings.resolved_lake_uri)
params = settings.training
cache = Path(settings.resolved_home) / "cache" / "training"
cache.mkdir(parents=True, exist_ok=True)
name = sys.argv[1]
def _catalog(kind):
    from recsys_serving.stores.catalog import write_items_snapshot, write_users_snapshot
    from recsys_serving.stores.docstore import open_docstore
    with open_docstore(settings) as store:
        snap = (write_items_snapshot if kind == "items" else write_users_snapshot)(store, lake)
    return {"rows": snap.rows}
if name in graph.BY_NAME:
    # The step as a Dagster step runs it: handed its inputs' records from the lake.
    env = graph.StepEnv(
        lake=lake,
        params=params,
        staging=cache / "bundles",
        cache_dir=cache,
        rule=settings.promotion,
    )
    result = graph.execute(graph.BY_NAME[name], env, graph.LakeOutputs(lake)).to_json()
else:
    result = _catalog({"item_catalog": "items", "user_profiles": "users"}[name])
print(json.dumps(result, default=str))
"""


def run_child(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a child to completion: wall and CPU seconds, its own peak RSS (wait4), its
    last stdout line (the step's JSON report)."""
    started = time.perf_counter()
    out_path = Path(tempfile.mkstemp(prefix="recsys-bench-", suffix=".out")[1])
    err_path = out_path.with_suffix(".err")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        # The checkout of --code first on sys.path: `python -c` puts the cwd there.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=CODE["root"])
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    out_path.unlink(missing_ok=True)
    err_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"step failed ({proc.returncode}): {' '.join(cmd[:5])}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "last_line": lines[-1] if lines else "",
    }


def child_env(home: Path, threads: int) -> dict[str, str]:
    env = {
        **os.environ,
        "RECSYS_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "RECSYS_THREADS": str(threads),
        "PYTHONPATH": str(CODE["root"]),
    }
    for name in ("RECSYS_LAKE_URI", "RECSYS_MONGO_URI", "RECSYS_ES_URL", "RECSYS_TRAIN_PARAMS"):
        env.pop(name, None)
    return env


# What a retrain reads from a home: the processed weblogs, the quarantine (to explain
# an empty window) and the document store (the catalogue); not the landing files.
INPUTS = ("lake/weblogs", "lake/quarantine", "docstore")


def copy_inputs(source: Path, home: Path) -> None:
    """A fresh home holding only ``source``'s retrain inputs (no earlier training run,
    no registry: the first-model path, as in a fresh world)."""
    for name in INPUTS:
        if (source / name).exists():
            shutil.copytree(source / name, home / name, ignore=shutil.ignore_patterns("*.lock"))


def replicate_inputs(source: Path, home: Path, copies: int) -> dict[str, Any]:
    """``copies`` disjoint copies of ``source``'s users in one home, one partition at a
    time through polars' streaming sink (memory: one partition's morsels)."""
    import polars as pl

    from recsys_serving.lake import LocalLake
    from recsys_serving.layout import WEBLOGS_AREA, partitions

    copy_inputs(source, home)
    started = time.perf_counter()
    rows = 0
    for obj in partitions(LocalLake(source / "lake"), WEBLOGS_AREA).values():
        part = source / "lake" / obj.key
        target = home / "lake" / obj.key
        frames = []
        for k in range(copies):
            tag = f"~{k}" if k else ""
            frames.append(
                pl.scan_parquet(part).with_columns(
                    pl.col(c) + tag for c in ("event_id", "user_id", "session_id", "request_id")
                )
            )
        tmp = target.with_suffix(".tmp")
        pl.concat(frames).sink_parquet(tmp, compression="zstd", statistics=True)
        tmp.replace(target)
        rows += pl.scan_parquet(target).select(pl.len()).collect().item()
    return {"wall_s": round(time.perf_counter() - started, 2), "rows": rows, "copies": copies}


def bench_size(
    n_events: int,
    workdir: Path,
    threads: int,
    from_home: Path | None = None,
    copies: int | None = None,
    stop_after: str | None = None,
) -> dict[str, Any]:
    if copies is not None:
        # Any kept world copied ``copies`` times, e.g. the 1M world x 100 for 100M.
        if from_home is None or n_events % copies:
            raise SystemExit("--copies needs --from-home and events divisible by copies")
        home = workdir / "home"
        base_events = n_events // copies
        shape = WORLDS.get(base_events, {})
        report = {
            "events": n_events,
            "world": {
                "replicated": {"of": base_events, "copies": copies, "from": str(from_home)},
                **shape,
                "users": shape.get("users", 0) * copies,
            },
            "steps": {"replicate weblogs": replicate_inputs(from_home, home, copies)},
        }
        return run_training(report, home, threads, stop_after)
    if n_events in REPLICATED:
        base_events, copies = REPLICATED[n_events]
        base_home = from_home
        report_base: dict[str, Any] | None = None
        if base_home is None:
            shape = WORLDS[base_events]
            base = {"events": base_events, "world": shape, "steps": {}}
            report_base = acquire(base, workdir / "base", threads, base_events, shape, True)
            base_home = workdir / "base" / "home"
        home = workdir / "home"
        report: dict[str, Any] = {
            "events": n_events,
            "world": {
                "replicated": {"of": base_events, "copies": copies, "from": str(base_home)},
                **WORLDS[base_events],
                "users": WORLDS[base_events]["users"] * copies,
            },
            "steps": dict(report_base["steps"]) if report_base else {},
        }
        report["steps"]["replicate weblogs"] = replicate_inputs(base_home, home, copies)
        return run_training(report, home, threads, stop_after)
    shape = WORLDS.get(n_events) or {
        "users": max(1000, n_events // 50),
        "items": 2000,
        "categories": 20,
        "days": 14,
    }
    home = workdir / "home"
    report = {"events": n_events, "world": shape, "steps": {}}
    if from_home is not None:
        copy_inputs(from_home, home)
        report["world"] = {**shape, "inputs_from": str(from_home)}
        return run_training(report, home, threads, stop_after)
    return acquire(report, workdir, threads, n_events, shape, False, stop_after)


def acquire(
    report: dict[str, Any],
    workdir: Path,
    threads: int,
    n_events: int,
    shape: dict[str, int],
    inputs_only: bool,
    stop_after: str | None = None,
) -> dict[str, Any]:
    """Simulate, land, process and load the catalogue, then (unless ``inputs_only``)
    retrain."""
    home = workdir / "home"
    env = child_env(home, threads)
    sim = workdir / "sim"
    report["steps"]["simulate"] = run_child(
        [
            RECSYS, "simulate", "--out", str(sim), "--events", str(n_events),
            "--users", str(shape["users"]), "--items", str(shape["items"]),
            "--categories", str(shape["categories"]), "--days", str(shape["days"]),
            "--seed", "5", "--end", "2024-06-01",
        ],
        env,
    )  # fmt: skip
    files = sorted(str(p) for p in (sim / "weblogs").glob("part-*.ndjson"))
    report["steps"]["landing (recsys ingest)"] = run_child(
        [RECSYS, "ingest", *files, "--no-process"], env
    )
    report["steps"]["weblogs (processing)"] = run_child(
        [PYTHON, str(ROOT / "bench" / "process_only.py")], env
    )
    report["steps"]["catalog load"] = run_child(
        [
            RECSYS, "catalog", "load", "--items", str(sim / "items.ndjson"),
            "--users", str(sim / "users.ndjson"),
        ],
        env,
    )  # fmt: skip
    if inputs_only:
        return report
    return run_training(report, home, threads, stop_after)


def rerun_steps(home: Path, steps: list[str], threads: int) -> dict[str, Any]:
    """Run ``steps`` again, in place, on a kept home whose earlier steps already ran
    (the home of a ``--keep`` run): one step's memory and CPU with other code, without
    paying for the whole retrain again (at 100M events, an hour of CPU)."""
    from recsys_assets.training.graph import RETRAIN_ASSETS

    unknown = [s for s in steps if s not in RETRAIN_ASSETS]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; known: {list(RETRAIN_ASSETS)}")
    env = child_env(home, threads)
    report: dict[str, Any] = {"home": str(home), "steps": {}}
    for step in steps:
        print(f"  rerun {step} ...", file=sys.stderr, flush=True)
        figures = run_child([PYTHON, "-c", STEP_CODE, step], env)
        figures.pop("last_line", None)
        report["steps"][step] = figures
        print(f"  rerun {step} {json.dumps(figures)}", file=sys.stderr, flush=True)
    report["peak_rss_mib"] = max(s["peak_rss_mib"] for s in report["steps"].values())
    return report


def run_training(
    report: dict[str, Any], home: Path, threads: int, stop_after: str | None = None
) -> dict[str, Any]:
    env = child_env(home, threads)
    n_events = report["events"]
    from recsys_assets.training.graph import RETRAIN_ASSETS

    training = list(RETRAIN_ASSETS)  # what retrain_job runs, in its order
    if stop_after is not None:
        training = training[: training.index(stop_after) + 1]
    for step in training:
        print(f"  {n_events:,} events: {step} ...", file=sys.stderr, flush=True)
        report["steps"][step] = run_child([PYTHON, "-c", STEP_CODE, step], env)
        figures = {k: v for k, v in report["steps"][step].items() if k != "last_line"}
        print(f"  {n_events:,} events: {step} {json.dumps(figures)}", file=sys.stderr, flush=True)
    if stop_after is not None and stop_after != "registered_model":
        report["stopped_after"] = stop_after
        report["retrain_s"] = round(sum(report["steps"][s]["wall_s"] for s in training), 1)
        report["retrain_peak_rss_mib"] = max(report["steps"][s]["peak_rss_mib"] for s in training)
        for step in report["steps"].values():
            step.pop("last_line", None)
        return report
    retrieval = json.loads(report["steps"]["retrieval_model"]["last_line"])
    ranker = json.loads(report["steps"]["ranking_model"]["last_line"])
    evaluation = json.loads(report["steps"]["model_evaluation"]["last_line"])
    report["als_fit_s"] = {k: v["seconds"] for k, v in retrieval["als"].items()}
    report["lightgbm_fit_s"] = ranker["seconds"]
    report["ranking_rows"] = ranker["rows"]
    report["metrics"] = {
        name: {k: v for k, v in (m or {}).items() if k.startswith(("ndcg", "recall", "cov"))}
        for name, m in evaluation["metrics"].items()
    }
    report["retrain_s"] = round(sum(report["steps"][s]["wall_s"] for s in training), 1)
    report["retrain_peak_rss_mib"] = max(report["steps"][s]["peak_rss_mib"] for s in training)
    for step in report["steps"].values():
        step.pop("last_line", None)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", default="1000000,10000000")
    parser.add_argument("--threads", type=int, default=0, help="RECSYS_THREADS (0 = all)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep work dirs under this path")
    parser.add_argument(
        "--from-home",
        type=Path,
        default=None,
        help="retrain on the inputs of a kept world's home (a --keep run's .../home) instead "
        "of simulating and landing one; for 30M/100M, the 10M world to replicate",
    )
    parser.add_argument(
        "--copies",
        type=int,
        default=None,
        help="with --from-home: retrain on that world's users copied this many times "
        "(--events is then the total, e.g. --events 100000000 --copies 100 on the 1M world)",
    )
    parser.add_argument(
        "--stop-after",
        default=None,
        help="stop after this training step (e.g. interactions), for sizes that would not "
        "finish in the time available",
    )
    parser.add_argument(
        "--code",
        type=Path,
        default=None,
        help="run every step with the code of this checkout (e.g. a worktree of the "
        "previous commit), to measure old and new code on the same inputs in one session",
    )
    parser.add_argument(
        "--rerun",
        type=Path,
        default=None,
        help="a kept run's home: run only --steps again there, in place (e.g. one step "
        "with new code on the 100M world's outputs)",
    )
    parser.add_argument("--steps", default=None, help="with --rerun: comma-separated steps")
    args = parser.parse_args()
    if args.code is not None:
        CODE["root"] = args.code.resolve()
    if args.rerun is not None:
        if not args.steps:
            raise SystemExit("--rerun needs --steps")
        rerun = rerun_steps(args.rerun, args.steps.split(","), args.threads)
        rerun["code"] = str(CODE["root"])
        rerun["date"] = datetime.now(UTC).isoformat()
        print(json.dumps(rerun, indent=2), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rerun, indent=2))
        return
    results = {
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(),
            "note": "shared machine: other processes were running; wall times are upper bounds",
            "code": str(CODE["root"]),
        },
        "runs": [],
    }
    for n in (int(x) for x in args.events.split(",")):
        workdir = Path(tempfile.mkdtemp(prefix=f"recsys-train-{n}-", dir=args.keep))
        try:
            started = time.perf_counter()
            run = bench_size(n, workdir, args.threads, args.from_home, args.copies, args.stop_after)
            run["total_s"] = round(time.perf_counter() - started, 1)
            results["runs"].append(run)
            print(json.dumps(run, indent=2), flush=True)
        finally:
            if args.keep is None:
                shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
