"""``recsys demo``: the whole system on embedded defaults, and the loop closing on its own.

1. simulate a history of weblogs (with some deliberately broken lines);
2. load the catalogue into the document store (``recsys catalog load``);
3. ingest the history (``recsys ingest``): quarantine accounting and quality checks;
4. train, evaluate and register the first model (``recsys retrain``): production;
5. start the service (``recsys serve``) and Dagster (``dagster dev``: UI + daemon) in
   the background, with the closed loop's windows shortened to minutes;
6. play live users against the service (``recsys simulate live``); half-way their tastes
   drift and yesterday's hits fade. From here the demo only watches: the daemon's
   sensors detect the CTR drop, retrain, phase the new model in as a canary, and
   promote it (or roll it back) on their own;
7. write the report (HTML + PNG) and print CTR before / during / after.

The service and Dagster keep running afterwards so the UI and the API can be explored;
``recsys demo --stop`` ends them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from recsys_assets.cli import app
from recsys_assets.cli.common import console, fail, out, progress, summary

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AFTER_PROMOTION_SECONDS = 60.0


def loop_environment(port: int) -> dict[str, str]:
    """The closed loop compressed from hours to minutes, for the background processes.

    Windows of a minute, a 10 s sensor tick, CTR buckets of 10 s; retraining on the last
    ~15 minutes (the live traffic) with a holdout of ~17 s and labels from the ~26 s
    before it, so a model trained a minute after the drift already knows what changed;
    a canary ramp 25% -> 50% -> 100% judged on a few hundred impressions per arm. The
    simulated users are hyperactive (a day of browsing in minutes), so the bot filter
    is relaxed. The first model (step 4) is trained with the normal settings, on the
    whole history. Retraining runs execute in one process (see the sensor).
    """
    return {
        "RECSYS_CTR_BUCKET_SECONDS": "10",
        "RECSYS_CTR_RECENT_MINUTES": "1",
        "RECSYS_CTR_BASELINE_MINUTES": "1",
        "RECSYS_CTR_CLICK_DELAY_SECONDS": "10",
        "RECSYS_CTR_MIN_IMPRESSIONS": "500",
        "RECSYS_CTR_MIN_RELATIVE_DROP": "0.15",
        "RECSYS_RETRAIN_COOLDOWN_MINUTES": "3",
        "RECSYS_CANARY_RAMP": "[0.25, 0.5, 1.0]",
        "RECSYS_CANARY_MIN_IMPRESSIONS": "600",
        "RECSYS_CANARY_MAX_MINUTES": "4",
        "RECSYS_CLOSED_LOOP_TICK_SECONDS": "10",
        "RECSYS_NIGHTLY_RETRAIN_ENABLED": "false",
        "RECSYS_ONLINE_CTR_CRON": "*/2 * * * *",
        "RECSYS_SERVICE_METRICS_URL": f"http://127.0.0.1:{port}/metrics",
        "RECSYS_LANDING_SEGMENT_MAX_AGE_SECONDS": "2",
        "RECSYS_MODEL_POLL_SECONDS": "1",
        "RECSYS_BOT_MAX_EVENTS_PER_MINUTE": "1000",
        "RECSYS_TRAIN_WINDOW_DAYS": "0.01",
        "RECSYS_HOLDOUT_DAYS": "0.0002",
        "RECSYS_LABEL_DAYS": "0.0003",
        "RECSYS_THREADS": "2",
        "RECSYS_LOG_LEVEL": "WARNING",
    }


# --------------------------------------------------------------- background processes
@contextlib.contextmanager
def default_signals_for_children() -> Iterator[None]:
    """Let processes started inside see SIGINT and SIGTERM with their default meaning.

    An ignored signal stays ignored across exec, and a shell running a command in the
    background (`make demo &`, CI runners) ignores SIGINT. `dagster dev` then maps
    SIGTERM to SIGINT's disposition (dagster's setup_interrupt_handlers), so the
    webserver, daemon and code servers ignored SIGTERM and `recsys demo --stop` could
    not end them. Signal dispositions can only change on the main thread; elsewhere
    nothing changes.
    """
    saved: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) == signal.SIG_IGN:
                saved[sig] = signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@dataclass
class Background:
    """Processes the demo started, recorded so `recsys demo --stop` can end them."""

    path: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh, default_signals_for_children():
            proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        self.save()

    def save(self) -> None:
        record = [
            {"name": n, "pid": p.pid, "cmd": " ".join(p.args)}  # type: ignore[arg-type]
            for n, p in self.procs.items()
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                fail(
                    f"{name} exited with code {proc.returncode}; see {self.path.parent}/{name}.log"
                )

    def stop(self) -> None:
        for proc in self.procs.values():
            _stop_group(proc.pid)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _stop_group(proc.pid, signal.SIGKILL)
        self.path.unlink(missing_ok=True)


def _stop_group(pid: int, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal the process group a demo process leads (its workers and runs included)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_previous(path: Path) -> int:
    """End the background processes a previous demo left running (by their recorded id)."""
    if not path.exists():
        return 0
    stopped: list[int] = []
    for record in orjson.loads(path.read_bytes()):
        pid = int(record["pid"])
        cmdline = _cmdline(pid)
        if cmdline is None:
            continue  # already gone
        if "recsys" not in cmdline and "dagster" not in cmdline:
            continue  # the id was reused by an unrelated process: leave it alone
        _stop_group(pid)
        stopped.append(pid)
    deadline = time.time() + 30
    for pid in stopped:
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
    path.unlink(missing_ok=True)
    return len(stopped)


def _cmdline(pid: int, patience: float = 2.0) -> str | None:
    """The process's command line, or None once it has ended.

    A process still inside execve reads as an empty command line: the kernel wakes the
    parent (vfork release, close-on-exec pipes) before it sets the new image's argument
    area. Waiting briefly for it keeps a just-started demo process from being taken for
    a stranger; kernel threads stay empty and are left alone after the wait.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if raw or not _alive(pid) or time.monotonic() >= deadline:
            return raw.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(what: str, ready: Any, background: Background, timeout: float) -> None:
    deadline = time.time() + timeout
    with console.status(f"waiting for {what}"):
        while time.time() < deadline:
            background.check()
            if ready():
                return
            time.sleep(0.5)
    fail(f"{what} not ready after {timeout:.0f}s; see the logs in {background.path.parent}")


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ----------------------------------------------------------------------- watching
class LoopWatcher:
    """Prints the closed loop's decisions as they land in the lake, and the retraining
    runs the daemon launches as their status changes; tracks the promotion."""

    def __init__(self, lake: Any, since: datetime, instance: Any = None) -> None:
        self.lake = lake
        self.since = since
        self.instance = instance
        self.run_status: dict[str, str] = {}
        self.seen: set[str] = set()
        self.promoted_at: float | None = None
        self.actions: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            try:
                self.poll()
            except Exception as exc:  # a half-written listing must not kill the demo
                console.print(f"[yellow]watcher: {exc}[/]")

    def poll(self) -> None:
        from recsys_assets.monitoring.promotion import read_decisions

        for d in read_decisions(self.lake, since=self.since):
            key = f"{d['at']}-{d['action']}"
            if key in self.seen:
                continue
            self.seen.add(key)
            self.actions.append(d["action"])
            if d["action"] == "promote" and self.promoted_at is None:
                self.promoted_at = time.monotonic()
            out.print(
                f"[bold magenta]loop[/] {d['at'][11:19]}  {d['action']:<15} "
                f"{(d.get('version') or '')[-8:]:<8}  {d['reason'][:150]}",
                highlight=False,
            )
        if self.instance is not None:
            self._poll_runs()

    def _poll_runs(self) -> None:
        import dagster as dg

        # Retrainings, and the canary_job runs that take each promotion step.
        for pipeline in ("retrain", "canary"):
            runs = self.instance.get_runs(
                filters=dg.RunsFilter(tags={"recsys/pipeline": pipeline}, created_after=self.since)
            )
            for run in reversed(runs):
                status = run.status.value.lower()
                if self.run_status.get(run.run_id) == status:
                    continue
                self.run_status[run.run_id] = status
                if pipeline == "canary" and status not in ("success", "failure"):
                    continue  # one line per promotion step: its outcome
                trigger = run.tags.get("recsys/trigger", "?")
                out.print(
                    f"[bold magenta]loop[/] {datetime.now(UTC):%H:%M:%S}  "
                    f"{pipeline + ' run':<15} {run.run_id[:8]}  {run.job_name} {status} "
                    f"(trigger: {trigger})",
                    highlight=False,
                )

    def done(self) -> bool:
        return (
            self.promoted_at is not None
            and time.monotonic() - self.promoted_at > AFTER_PROMOTION_SECONDS
        )


def retrain_runs(instance: Any, since: datetime) -> list[Any]:
    """Retraining runs since the live traffic started, for the report's markers."""
    import dagster as dg

    from recsys_assets.report import RetrainRun

    runs = instance.get_runs(
        filters=dg.RunsFilter(tags={"recsys/pipeline": "retrain"}, created_after=since)
    )
    found = []
    for run in runs:
        stats = instance.get_run_stats(run.run_id)
        if stats.start_time is None:
            continue
        end = datetime.fromtimestamp(stats.end_time, UTC) if stats.end_time else None
        found.append(
            RetrainRun(
                run.run_id,
                datetime.fromtimestamp(stats.start_time, UTC),
                end,
                run.status.value,
                run.tags.get("recsys/trigger"),
            )
        )
    return sorted(found, key=lambda r: r.start)


def no_drift_verdict(
    runs: list[Any], new_model: bool, actions: list[str], live_minutes: float
) -> tuple[bool, str]:
    """A run without drift: every retraining the drop sensor launched is a false alarm.

    Nightly or manual retrainings are not the sensor's doing and do not count; a change
    of production does (nothing should have beaten the model on unchanged tastes).
    """
    false_retrains = [r for r in runs if r.trigger == "ctr_drop"]
    line = (
        f"demo without drift: {len(false_retrains)} false retraining(s) launched by "
        f"ctr_drop_sensor in {live_minutes:.1f} min of live traffic; production "
        f"{'changed' if new_model else 'unchanged'} (decisions: {', '.join(actions) or 'none'})"
    )
    return not false_retrains and not new_model, line


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.1%}"


# -------------------------------------------------------------------------- command
@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Simulated history size.")] = 300_000,
    days: Annotated[float, typer.Option(help="Days of simulated history.")] = 14,
    users: Annotated[int, typer.Option(help="Users in the simulated world.")] = 2_000,
    items: Annotated[int, typer.Option(help="Items in the simulated world.")] = 1_000,
    seed: Annotated[int, typer.Option()] = 7,
    live_users: Annotated[int, typer.Option(help="Users playing live (few, very active).")] = 200,
    rps: Annotated[float, typer.Option(help="Live recommendation requests per second.")] = 20,
    drift_after: Annotated[
        float, typer.Option(help="Seconds of live traffic before the drift.")
    ] = 120,
    max_live: Annotated[float, typer.Option(help="Longest live phase, seconds.")] = 480,
    no_drift: Annotated[
        bool,
        typer.Option(
            "--no-drift",
            help="Live traffic without any drift for the whole --max-live: measures false "
            "retrains (exit 1 if ctr_drop_sensor launched one).",
        ),
    ] = False,
    port: Annotated[int, typer.Option(help="Port of the recommendation service.")] = 8000,
    ui_port: Annotated[int, typer.Option(help="Port of the Dagster UI.")] = 3000,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the service and Dagster running afterwards.")
    ] = True,
    fresh: Annotated[
        bool, typer.Option(help="Start from an empty lake (the Dagster run history is kept).")
    ] = True,
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop what a previous demo left running, then exit.")
    ] = False,
) -> None:
    """Simulate, ingest, train, serve, then watch the loop close on its own; write a report."""
    from recsys_assets.instance import ensure_dagster_home
    from recsys_serving.settings import Settings

    if not stop:
        _check_live_options(live_users, rps, drift_after, max_live, no_drift)
    settings = Settings()
    home = settings.resolved_home
    demo_dir = home / "demo"
    pid_file = demo_dir / "processes.json"
    if stop:
        summary(f"demo: stopped {stop_previous(pid_file)} background process(es)")
        return
    if settings.resolved_lake_uri.startswith("s3://"):
        fail("the demo runs on the embedded defaults: unset RECSYS_LAKE_URI")
    if stop_previous(pid_file):
        console.print("stopped the service and Dagster a previous demo left running")
    for p in (port, ui_port):
        if not _port_free(p):
            fail(f"port {p} is in use; free it or pass --port/--ui-port")
    started = time.perf_counter()
    ensure_dagster_home(settings)
    if fresh:
        for path in (home / "sim", Path(settings.resolved_lake_uri), home / "docstore", demo_dir):
            shutil.rmtree(path, ignore_errors=True)
    demo_dir.mkdir(parents=True, exist_ok=True)

    first_version, lake = _build(settings, events, days, users, items, seed)
    background = Background(pid_file)
    ok = False
    try:
        key = _start_services(settings, background, port, ui_port)
        drift_at = None if no_drift else drift_after
        result = _live(
            settings, lake, background, key, port, seed, live_users, rps, drift_at, max_live
        )
        ok = _report(settings, lake, result, first_version, port, ui_port, started)
    finally:
        if not keep_running or not ok:
            background.stop()
    if keep_running:
        out.print(
            f"the service (http://127.0.0.1:{port}) and Dagster (http://127.0.0.1:{ui_port}) "
            "keep running; stop them with `recsys demo --stop`"
        )
    if not ok:
        raise typer.Exit(1)


def _check_live_options(
    live_users: int, rps: float, drift_after: float, max_live: float, no_drift: bool
) -> None:
    """Usage errors before anything starts (the live phase comes after minutes of set-up)."""
    if max_live <= 0:
        raise typer.BadParameter(f"must be positive, not {max_live:g}", param_hint="--max-live")
    if live_users <= 0:
        raise typer.BadParameter(f"must be positive, not {live_users}", param_hint="--live-users")
    if rps <= 0:
        raise typer.BadParameter(f"must be positive, not {rps:g}", param_hint="--rps")
    if not no_drift and not 0 <= drift_after <= max_live:
        raise typer.BadParameter(
            f"{drift_after:g}s is outside the live phase (0..{max_live:g}s, --max-live); "
            "pass a smaller --drift-after, a larger --max-live, or --no-drift",
            param_hint="--drift-after",
        )


def _build(
    settings: Any, events: int, days: float, users: int, items: int, seed: int
) -> tuple[str, Any]:
    """Steps 1-4: history, catalogue, ingestion with checks, the first model."""
    from recsys_assets.cli.catalog import load as catalog_load
    from recsys_assets.cli.training import retrain
    from recsys_assets.ingest import ingest_files
    from recsys_assets.runs import materialize_weblogs
    from recsys_assets.simulation.history import simulate_history
    from recsys_serving.events.intake import EventIntake
    from recsys_serving.lake import open_lake
    from recsys_serving.landing import list_sealed
    from recsys_serving.layout import PRODUCTION
    from recsys_serving.logging import configure_logging
    from recsys_serving.registry import ModelRegistry

    configure_logging("WARNING")  # the demo prints what matters itself
    home = settings.resolved_home
    console.rule("1/7  simulate a history of user weblogs")
    with progress() as bar:
        task = bar.add_task("simulating", total=events)
        sim = simulate_history(
            home / "sim",
            n_users=users,
            n_items=items,
            n_categories=20,
            days=days,
            n_events=events,
            seed=seed,
            corrupt_fraction=0.0005,
            end=datetime.now(UTC),
            progress_cb=lambda done, total: bar.update(task, completed=done, total=total),
        )
    out.print(
        f"{sim.n_events:,} events ({sim.n_corrupt} deliberately corrupt), {sim.n_users:,} users, "
        f"{sim.n_items:,} items, logging-policy CTR {sim.ctr:.1%}"
    )

    console.rule("2/7  load the catalogue into the document store (`recsys catalog load`)")
    catalog_load(items=sim.items_path, users=sim.users_path, batch_size=1000, show_errors=5)

    console.rule("3/7  ingest the history (`recsys ingest`): quarantine and quality checks")
    lake = open_lake(
        settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
    )
    with progress() as bar:
        task = bar.add_task("ingesting", total=sim.n_events)
        report = ingest_files(
            sim.weblog_paths,
            EventIntake(lake, settings),
            on_progress=lambda _p, n, _r: bar.update(task, advance=n),
        )
    r = report.result
    days_landed = sorted({f.date for f in list_sealed(lake)})
    with console.status(f"processing weblogs {days_landed[0]}..{days_landed[-1]} in Dagster"):
        outcome = materialize_weblogs(settings, days_landed)
    meta = outcome.materialized.get("weblogs", {})
    checks = ", ".join(
        f"{n} {'ok' if ok else 'FAILED'}" for n, ok in sorted(outcome.checks.items())
    )
    out.print(
        f"{r.accepted:,} landed + {r.rejected:,} quarantined at intake {dict(r.reasons)}; "
        f"{meta.get('dagster/row_count', 0):,} weblog rows + {meta.get('quarantined', 0):,} "
        f"quarantined by business rules in {len(days_landed)} partitions"
    )
    out.print(f"checks: {checks}")
    if not outcome.success:
        fail(f"processing the history failed: {outcome.failure}")

    console.rule("4/7  train, evaluate and register the first model (`recsys retrain`)")
    retrain(process=False)
    production = ModelRegistry(lake).alias(PRODUCTION)
    if production is None:
        fail("the first model was not promoted to production")
    return production.version, lake


def _start_services(settings: Any, background: Background, port: int, ui_port: int) -> str:
    """Step 5: the service and Dagster in the background, and an API key."""
    from recsys_serving.keys import KeyFile

    home = settings.resolved_home
    console.rule("5/7  start the service and Dagster (UI + daemon) in the background")
    env = {**os.environ, **loop_environment(port), "RECSYS_HOME": str(home)}
    env["DAGSTER_HOME"] = os.environ["DAGSTER_HOME"]
    background.start(
        "serve",
        [str(BIN / "recsys"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env,
        home / "demo" / "serve.log",
    )
    background.start(
        "dagster",
        [
            str(BIN / "dagster"),
            "dev",
            "-w",
            str(ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(ui_port),
        ],
        env,
        home / "demo" / "dagster.log",
    )
    _, key = KeyFile.in_home(home).create(["recommend", "events"], name="demo")
    _wait(
        "the service (/readyz)",
        lambda: _http_ok(f"http://127.0.0.1:{port}/readyz"),
        background,
        120,
    )
    _wait(
        "the Dagster UI",
        lambda: _http_ok(f"http://127.0.0.1:{ui_port}/server_info"),
        background,
        180,
    )
    out.print(f"service   http://127.0.0.1:{port}  (API docs /docs, dashboard /dashboard)")
    out.print(f"Dagster   http://127.0.0.1:{ui_port}  (sensors tick every 10 s)")
    out.print(f"API key   {key}   (scopes recommend, events; stored hashed under {home})")
    return key


@dataclass
class LiveOutcome:
    summary: Any
    timeline: Path
    started: datetime
    watcher: LoopWatcher
    drift_at: float | None = None  # None: a run without drift (false-retrain measurement)


def _live(
    settings: Any,
    lake: Any,
    background: Background,
    key: str,
    port: int,
    seed: int,
    live_users: int,
    rps: float,
    drift_after: float | None,
    max_live: float,
) -> LiveOutcome:
    """Step 6: live users, a drift (unless None), and the loop acting on its own."""
    from recsys_assets.simulation.live import LiveConfig, run_live
    from recsys_assets.simulation.truth import GroundTruth

    home = settings.resolved_home
    if drift_after is None:
        console.rule("6/7  live traffic without drift; any retraining now is a false alarm")
        out.print(
            f"{live_users} users at {rps:g} requests/s for {max_live:.0f}s; tastes never "
            "change, so the loop should leave the model alone: watch for `loop` lines."
        )
    else:
        console.rule("6/7  live traffic; tastes drift after a while; the system repairs itself")
        out.print(
            f"{live_users} users at {rps:g} requests/s; at {drift_after:.0f}s tastes drift and "
            "yesterday's hits fade. From then on nobody touches anything: watch the `loop` lines."
        )
    timeline = home / "demo" / "live.ndjson"
    config = LiveConfig(
        base_url=f"http://127.0.0.1:{port}",
        api_key=key,
        users=live_users,
        rps=rps,
        duration=max_live,
        drift_at=drift_after,
        drift_strength=0.2,
        trend_shift=1.0,
        browse=2.0,
        interval=10.0,
        seed=seed,
        timeline_path=timeline,
    )
    truth = GroundTruth.load(home / "sim" / "truth")
    from recsys_assets.instance import get_instance

    started = datetime.now(UTC)
    watcher = LoopWatcher(lake, started, get_instance(settings))
    watcher.start()

    def should_stop() -> bool:
        background.check()
        return watcher.done()

    try:
        result = run_live(
            truth,
            config,
            on_line=lambda line: out.print(f"[dim]live[/] {line}", highlight=False),
            should_stop=should_stop,
        )
    finally:
        watcher.stop()
    return LiveOutcome(result, timeline, started, watcher, drift_after)


def _mlflow_lines(settings: Any, lake: Any) -> list[str]:
    """Where the retrainings' MLflow runs and the mirrored alias moves can be seen (after
    one last sync, so a move the loop made in the last seconds is there too)."""
    from recsys_assets.tracking.mirror import browse_hint, mirror_for, mirror_registry
    from recsys_serving.registry import ModelRegistry

    mirror = mirror_for(settings)
    if mirror is None:
        return ["MLflow:      off (RECSYS_MLFLOW_TRACKING_URI=off)"]
    outcome = mirror_registry(mirror, ModelRegistry(lake))
    if outcome["mlflow"] != "ok":
        return [f"MLflow:      not updated ({outcome['error']}); `recsys models sync-mlflow`"]
    try:
        seen = mirror.overview()
    except Exception as exc:  # the demo's verdict never depends on MLflow
        return [f"MLflow:      {browse_hint(mirror.tracking_uri)} (overview failed: {exc})"]
    aliases = ", ".join(
        f"{alias} -> version {number} ({version})"
        for alias, (number, version) in sorted(seen["aliases"].items())
    )
    return [
        f"MLflow runs: {seen['runs']} retraining run(s) in experiment {seen['experiment']}",
        f"MLflow model: {seen['model']}, {seen['versions']} version(s), {aliases or 'no alias'}; "
        f"{seen['moves']} alias move(s) as tags move.<alias>.<time>",
        f"MLflow UI:   {browse_hint(mirror.tracking_uri)}",
    ]


def _report(
    settings: Any,
    lake: Any,
    live: LiveOutcome,
    first_version: str,
    port: int,
    ui_port: int,
    started: float,
) -> bool:
    """Step 7: the report, before / during / after, and where to look."""
    from recsys_assets.instance import get_instance
    from recsys_assets.monitoring.promotion import read_decisions
    from recsys_assets.report import build_report_data, render_report
    from recsys_serving.layout import PRODUCTION
    from recsys_serving.registry import ModelRegistry

    home = settings.resolved_home
    console.rule("7/7  report")
    decisions = read_decisions(lake, since=live.started)
    runs = retrain_runs(get_instance(settings), live.started)
    data = build_report_data(live.timeline, decisions, runs, initial_version=first_version)
    links = {
        "Dagster UI (runs, sensors, asset metadata)": f"http://127.0.0.1:{ui_port}",
        "decisions as asset metadata": f"http://127.0.0.1:{ui_port}/assets/production_model",
        "API docs": f"http://127.0.0.1:{port}/docs",
        "service dashboard": f"http://127.0.0.1:{port}/dashboard",
    }
    files = render_report(data, home / "report", decisions, links)
    production = ModelRegistry(lake).alias(PRODUCTION)
    new_model = production is not None and production.version != first_version
    for name, label in (
        ("before", "before the drift"),
        ("during", "during (stale model)"),
        ("after", "after promotion"),
    ):
        phase = data.phases.get(name)
        if phase is None:
            out.print(f"CTR {label:<22} n/a")
            continue
        out.print(
            f"CTR {label:<22} {_pct(phase.ctr)} observed, {_pct(phase.expected_ctr)} expected "
            f"(ground truth), oracle {_pct(phase.oracle_ctr)}, {phase.impressions:,} impressions"
        )
    recovery = data.recovery
    if recovery is not None and recovery.expected is not None:
        out.print(
            f"recovered {recovery.expected:.0%} of the expected CTR the drift took "
            f"({_pct(recovery.observed).strip()} observed); users and tastes are the same during "
            "and after, so that recovery is the new model's doing"
        )
    runs_text = ", ".join(f"{r.run_id[:8]} {r.status.lower()} ({r.trigger})" for r in runs)
    out.print(f"retraining runs: {runs_text or 'none'}")
    out.print(f"report:      {files.html}")
    out.print(f"chart:       {files.png}")
    for name, url in links.items():
        out.print(f"{name}: {url}")
    for line in _mlflow_lines(settings, lake):
        out.print(line, highlight=False)
    actions = live.watcher.actions
    closed = new_model and "promote" in actions
    elapsed = time.perf_counter() - started
    if live.drift_at is None:
        live_minutes = (datetime.now(UTC) - live.started).total_seconds() / 60
        ok, line = no_drift_verdict(runs, new_model, actions, live_minutes)
        summary(f"{line}; report {files.html}")
        return ok
    if closed:
        summary(
            f"demo: the loop closed on its own ({' -> '.join(dict.fromkeys(actions))}); "
            f"production {first_version[-8:]} -> {production.version[-8:]} "  # type: ignore[union-attr]
            f"in {elapsed / 60:.1f} min; report {files.html}"
        )
    else:
        summary(
            f"demo: the loop did NOT close (decisions: {', '.join(actions) or 'none'}); "
            f"see the report {files.html} and the Dagster UI; {elapsed / 60:.1f} min"
        )
    return closed
