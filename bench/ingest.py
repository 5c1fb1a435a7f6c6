"""Acquisition throughput: collector endpoint, ``recsys ingest`` and the ``weblogs`` asset.

Every measured piece of work runs in its own process, started exactly as an
operator would start it, so the peak RSS reported is that process's own (read from
``wait4`` or ``/proc/<pid>/status``) and no figure is flattered by the benchmark
sharing a GIL or a warm import cache with the code under test. Each scenario gets
a fresh ``RECSYS_HOME`` under a temp dir (all ``RECSYS_*`` variables are cleared so
defaults apply) which is deleted afterwards.

    .venv/bin/python bench/ingest.py            # full run (~10 min on 2 cores)
    .venv/bin/python bench/ingest.py --quick    # smaller sizes, shorter load
    # issue 13: recsys ingest of a 10M-event log, plain and .gz, this code beside a
    # checkout of the previous one (the log is simulated once and kept in --bulk-files)
    .venv/bin/python bench/ingest.py --only bulk --bulk-files /tmp/bulk10m \\
        --baseline ../wt-main --bulk-repeat 3 --out bench/results/ingest-bulk.json

Results (figures + machine) are written as JSON next to this file; see RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
BIN = Path(sys.executable).parent
RECSYS = BIN / "recsys"
TIME_BIN = Path("/usr/bin/time")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

COLLECTOR_TARGET = 50_000.0
PROCESS_TARGET = 1_000_000.0
# Simulated world for the file-based scenarios (the brief's sizes).
SIM_USERS, SIM_ITEMS, SIM_CATEGORIES, SIM_DAYS, SIM_SEED = 20_000, 5_000, 50, 30.0, 1
# NDJSON bytes per simulated event, plus the landed copy, plus Parquet: a disk budget.
DISK_BYTES_PER_EVENT = 700

T0 = time.perf_counter()


def say(message: str) -> None:
    """Progress on stdout with elapsed time, so a 10-minute run is never silent."""
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


# ----------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """What a reader needs to compare figures across machines."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    versions = {}
    for dist in ("polars", "pydantic", "orjson", "fastapi", "uvicorn", "dagster"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    versions["great-expectations"] = metadata.version("great-expectations")
    return {
        "load_at_start": load_average(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "packages": versions,
    }


def load_average() -> list[float]:
    """1/5/15-minute load: on a shared machine, the context every timing needs."""
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- processes
@dataclass
class Measured:
    """A finished subprocess: wall time, its own peak RSS and CPU, and its output."""

    returncode: int
    wall_s: float
    max_rss_mib: float
    cpu_s: float
    stdout: str
    stderr: str
    tree_cpu_s: float = 0.0  # every process of the tree, sampled (0.1 s resolution)

    def last_json(self) -> dict[str, Any]:
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"no JSON result in output:\n{self.stdout[-2000:]}\n{self.stderr}")


def _pump(stream: Any, sink: list[str], prefix: str | None) -> None:
    for line in stream:
        sink.append(line)
        # JSON result lines are parsed, not shown.
        if prefix is not None and line.strip() and not line.startswith("{"):
            print(f"{prefix}{line.rstrip()}", flush=True)


def run_measured(
    cmd: Sequence[str | Path],
    env: dict[str, str],
    prefix: str | None = "    | ",
    cwd: Path = PROJECT_ROOT,
) -> Measured:
    """Run a command and measure its own peak RSS, CPU and wall time.

    ``wait4``'s ``ru_maxrss`` cannot be used directly: Linux carries the RSS of the
    forked copy of *this* process across ``exec`` into the child's figure, so every
    child would inherit the driver's peak (e.g. after an in-process simulation).
    ``/usr/bin/time`` forks from a tiny process, so its figure is the command's own;
    without it, ``VmHWM`` (per address space, reset at exec) is polled instead.
    Either is one process's peak, while a command may have worker processes (the
    ``weblogs`` checks run in one): the sum of ``VmRSS`` over the whole process tree
    is sampled every 0.1 s too, and the peak reported is the larger of the two.
    Output is echoed live (prefixed) because the CLI's own progress is part of the
    story, and collected so results can be parsed from it. ``cwd``: the tree whose
    code runs (a fork server started by the command puts it first on its path).
    """
    out: list[str] = []
    err: list[str] = []
    argv = [str(c) for c in cmd]
    time_file = None
    if TIME_BIN.exists():
        fd, time_file = tempfile.mkstemp(prefix="bench-time-")
        os.close(fd)
        argv = [str(TIME_BIN), "-f", "%M %U %S", "-o", time_file, *argv]
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out, prefix), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, err, prefix), daemon=True),
    ]
    polled = [0.0]
    done = threading.Event()

    def poll_hwm() -> None:
        while not done.wait(0.02):
            polled[0] = max(polled[0], proc_peak_rss_mib(proc.pid))

    tree_peak = [0.0]
    # CPU of every process of the tree, as last seen: worker processes started by a
    # fork server are nobody's waited-for children, so wait4 never counts them.
    tree_cpu: dict[int, float] = {}

    def poll_tree() -> None:
        while not done.wait(0.1):
            pids = [proc.pid, *descendants(proc.pid)]
            tree_peak[0] = max(tree_peak[0], sum(proc_rss_mib(pid) for pid in pids))
            for pid in pids:
                tree_cpu[pid] = max(tree_cpu.get(pid, 0.0), proc_cpu_s(pid))

    pumps.append(threading.Thread(target=poll_tree, daemon=True))
    if time_file is None:
        pumps.append(threading.Thread(target=poll_hwm, daemon=True))
    for t in pumps:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in pumps:
        t.join()
    cpu_s = usage.ru_utime + usage.ru_stime
    max_rss = polled[0]
    if time_file is not None:
        last = Path(time_file).read_text().strip().splitlines()[-1].split()
        Path(time_file).unlink()
        max_rss = int(last[0]) / 1024  # kB
        cpu_s = float(last[1]) + float(last[2])
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        max_rss_mib=max(max_rss, tree_peak[0]),
        cpu_s=cpu_s,
        tree_cpu_s=sum(tree_cpu.values()),
        stdout="".join(out),
        stderr="".join(err),
    )


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (uvicorn's spawned workers do not show our port)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, pp in parents.items() if pp == current]
        found.extend(children)
        frontier.extend(children)
    return found


def proc_peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set, readable only while it is alive."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def proc_rss_mib(pid: int) -> float:
    """VmRSS: what a process holds now (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def isolated_env(home: Path) -> dict[str, str]:
    """Environment with a private RECSYS_HOME and Dagster instance, project defaults otherwise."""
    # RECSYS_BENCH is no setting: it marks a measurement for the machine's CPU
    # scheduler (a shared machine renices every other process), so it is kept.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RECSYS_") or k == "RECSYS_BENCH"
    }
    env.update(
        RECSYS_HOME=str(home),
        DAGSTER_HOME=str(home / "dagster"),
        GX_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def count_lines(root: Path) -> int:
    """Every NDJSON line under a lake area, sealed or still open."""
    if not root.exists():
        return 0
    total = 0
    for path in root.rglob("*.ndjson"):
        with path.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                total += chunk.count(b"\n")
    return total


def rate(events: float, seconds: float) -> float:
    return events / seconds if seconds > 0 else 0.0


# --------------------------------------------------------------------------- collector
def _wait_healthy(port: int, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/healthz"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"collector exited with {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"collector not healthy after {timeout:.0f}s")


def bench_collector(
    root: Path, workers: int, duration: float, connections: int, max_rate: float
) -> dict[str, Any]:
    """Collector in its own process tree, driven by bench/loadgen.py in another process."""
    home = root / f"collector-{workers}w"
    home.mkdir(parents=True)
    env = isolated_env(home)
    port = free_port()
    log_path = home / "collector.log"
    say(f"collector --workers {workers}: starting on 127.0.0.1:{port}")
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [
                *(str(RECSYS), "collector", "--host", "127.0.0.1"),
                *("--port", str(port), "--workers", str(workers)),
            ],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so a hung shutdown can be ended exactly
        )
    try:
        _wait_healthy(port, server)
        if workers > 1:
            deadline = time.monotonic() + 60
            while len(descendants(server.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2.0)  # spawned workers import the app before they accept
        tree = [server.pid, *descendants(server.pid)]
        cpu_before = sum(proc_cpu_s(p) for p in tree)
        load_cmd: list[str | Path] = [
            sys.executable,
            BENCH_DIR / "loadgen.py",
            "--port",
            str(port),
            "--connections",
            str(connections),
            "--duration",
            str(duration),
            "--max-rate",
            str(max_rate),
        ]
        say(f"collector --workers {workers}: load for {duration:g}s, {connections} connections")
        client = run_measured(load_cmd, env)
        if client.returncode != 0:
            raise RuntimeError(f"load generator failed ({client.returncode}):\n{client.stderr}")
        load = client.last_json()
        tree = [server.pid, *descendants(server.pid)]
        peaks = {pid: proc_peak_rss_mib(pid) for pid in tree}
        server_cpu = sum(proc_cpu_s(p) for p in tree) - cpu_before
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    landed = count_lines(home / "lake" / "landing")
    quarantined = count_lines(home / "lake" / "quarantine" / "intake")
    accounting_ok = landed == load["accepted_total"] and quarantined == 0
    say(
        f"collector --workers {workers}: {load['events_per_s']:,.0f} events/s, "
        f"errors {load['errors']}, landing lines {landed:,} vs accepted "
        f"{load['accepted_total']:,} ({'ok' if accounting_ok else 'MISMATCH'})"
    )
    for sample in load["error_samples"]:
        say(f"  error: {sample}")
    return {
        "workers": workers,
        "connections": connections,
        "batch": load["batch"],
        "duration_s": load["wall_s"],
        "requests": load["requests"],
        "warmup_requests": load["warmup_requests"],
        "errors": load["errors"],
        "error_samples": load["error_samples"],
        "accepted_timed": load["accepted_timed"],
        "events_per_s": load["events_per_s"],
        "requests_per_s": load["requests_per_s"],
        "p50_ms": load["p50_ms"],
        "p90_ms": load["p90_ms"],
        "p99_ms": load["p99_ms"],
        "max_ms": load["max_ms"],
        "body_kib": load["body_bytes_avg"] / 1024,
        "bodies_exhausted": load["exhausted"],
        "server_processes": len(peaks),
        "server_peak_rss_mib_max": max(peaks.values()),
        "server_peak_rss_mib_sum": sum(peaks.values()),
        "server_cpu_cores": rate(server_cpu, load["wall_s"]),
        "client_cpu_cores": load["client_cpu_cores"],
        "client_peak_rss_mib": client.max_rss_mib,
        "accepted_total": load["accepted_total"],
        "landing_lines": landed,
        "intake_quarantine_lines": quarantined,
        "accounting_ok": accounting_ok,
        "server_exit": server.returncode,
        "command": f"recsys collector --host 127.0.0.1 --port P --workers {workers}",
    }


# ------------------------------------------------------------------------------- files
def simulate(out_dir: Path, n_events: int) -> tuple[list[Path], float]:
    """Realistic weblogs via the project's simulator (deterministic by seed); not timed."""
    from recsys_assets.simulation.history import simulate_history

    say(f"simulate_history: {n_events:,} events into {out_dir}")
    last = [0.0]

    def on_progress(written: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 5 or written == total:
            last[0] = now
            say(f"  simulated {written:,}/{total:,}")

    started = time.perf_counter()
    summary = simulate_history(
        out_dir,
        n_users=SIM_USERS,
        n_items=SIM_ITEMS,
        n_categories=SIM_CATEGORIES,
        days=SIM_DAYS,
        n_events=n_events,
        seed=SIM_SEED,
        progress_cb=on_progress,
    )
    return summary.weblog_paths, time.perf_counter() - started


_INGESTED = re.compile(r"ingested ([\d,]+) events .*?: ([\d,]+) landed, ([\d,]+) quarantined")
_INGEST_RATE = re.compile(r" in ([\d.]+)s \(([\d,]+) events/s\)")


def _ingest_figures(measured: Measured) -> dict[str, Any]:
    text = measured.stdout
    got = _INGESTED.search(text)
    timing = _INGEST_RATE.search(text)
    if measured.returncode != 0 or got is None or timing is None:
        raise RuntimeError(
            f"recsys ingest failed ({measured.returncode}):\n{text}\n{measured.stderr}"
        )
    return {
        "received": int(got[1].replace(",", "")),
        "landed": int(got[2].replace(",", "")),
        "quarantined": int(got[3].replace(",", "")),
        "cli_s": float(timing[1]),
    }


def bench_ingest_file(root: Path, n_events: int) -> dict[str, Any]:
    """``recsys ingest FILE --no-process`` as an operator runs it, interpreter start included."""
    home = root / "ingest"
    home.mkdir(parents=True)
    env = isolated_env(home)
    files, sim_s = simulate(home / "sim", n_events)
    cmd: list[str | Path] = [RECSYS, "ingest", *files, "--no-process"]
    say(f"recsys ingest: {len(files)} file(s), {n_events:,} events")
    measured = run_measured(cmd, env)
    figures = _ingest_figures(measured)
    landed = count_lines(home / "lake" / "landing")
    ok = landed == figures["landed"] == n_events
    result = {
        "events": figures["received"],
        "landed": figures["landed"],
        "quarantined": figures["quarantined"],
        "simulate_s": sim_s,
        "wall_s": measured.wall_s,
        "events_per_s": rate(figures["received"], measured.wall_s),
        "cli_s": figures["cli_s"],
        "cli_events_per_s": rate(figures["received"], figures["cli_s"]),
        "peak_rss_mib": measured.max_rss_mib,
        "cpu_s": measured.cpu_s,
        "landing_lines": landed,
        "accounting_ok": ok,
        "command": f"recsys ingest {' '.join(p.name for p in files)} --no-process",
    }
    say(
        f"recsys ingest: {result['events_per_s']:,.0f} events/s (wall), "
        f"peak RSS {result['peak_rss_mib']:,.0f} MiB, landing lines {landed:,} "
        f"({'ok' if ok else 'MISMATCH'})"
    )
    return result


# ------------------------------------------------------------------ bulk ingest (issue 13)
_RUN = re.compile(
    r"weblogs \S+: ([\d,]+) rows, ([\d,]+) quarantined.*?; checks (\d+)/(\d+) passed; "
    r"run \w+ (succeeded|FAILED) in ([\d.]+)s"
)
LANDING_TARGET = 500_000.0
END_TO_END_TARGET = 250_000.0


def bulk_files(files_dir: Path, n_events: int, gz: bool) -> tuple[list[Path], float]:
    """The simulated part files for ``n_events`` (kept in ``files_dir`` between runs, so
    the old and the new code read the very same bytes), gzipped copies if asked."""
    marker = files_dir / "events.txt"
    plain = sorted((files_dir / "weblogs").glob("part-*.ndjson"))
    sim_s = 0.0
    if not (marker.exists() and marker.read_text().strip() == str(n_events) and plain):
        plain, sim_s = simulate(files_dir, n_events)
        marker.write_text(f"{n_events}\n")
    if not gz:
        return plain, sim_s
    out = []
    for path in plain:
        target = path.with_name(path.name + ".gz")
        if not target.exists():
            say(f"gzip {path.name} (level 6, as log rotation writes it; not timed)")
            tmp = target.with_name(target.name + ".tmp")
            with path.open("rb") as src, tmp.open("wb") as dst:
                subprocess.run(["gzip", "-6", "-c"], stdin=src, stdout=dst, check=True)
            tmp.replace(target)
        out.append(target)
    return out, sim_s


def bench_bulk_ingest(
    root: Path,
    n_events: int,
    files_dir: Path | None,
    formats: Sequence[str],
    baseline: Path | None,
    process: bool,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """``recsys ingest`` of a large simulated log as an operator runs it: the landing
    (validation, quarantine, fsync: the CLI's own "ingested ... in Xs") and, with
    ``process``, the whole command including the ``weblogs`` run and its checks.

    With ``baseline`` (a checkout of the previous code), every case runs twice in the
    same session: the code of this tree, then the baseline's (``PYTHONPATH``).
    ``repeat``: each case that many times, the codes taking turns, so a change of the
    shared host's speed (the same run costs up to ~1.6x the CPU seconds from one
    minute to the next, load near zero) falls on both; the report gives medians.
    """
    files_dir = files_dir or root / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    variants = [("new", None)] + ([("old", baseline)] if baseline else [])
    rows = []
    for fmt in formats:
        files, _ = bulk_files(files_dir, n_events, gz=fmt == "gz")
        for rep, (variant, code) in [(r, v) for r in range(1, repeat + 1) for v in variants]:
            home = root / f"{variant}-{fmt}-{rep}"
            home.mkdir(parents=True)
            env = isolated_env(home)
            if code is not None:
                env["PYTHONPATH"] = str(code)
            cmd: list[str | Path] = [RECSYS, "ingest", *files]
            if not process:
                cmd.append("--no-process")
            load = load_average()
            say(
                f"[{variant} code, {fmt}, run {rep}/{repeat}] recsys ingest of {n_events:,} "
                f"events; load {load}"
            )
            # Run from the code's own tree: Python 3.11's fork server (the ingest's
            # workers) puts its working directory before PYTHONPATH, so the old code
            # run from here had its workers import this tree's modules.
            m = run_measured(cmd, env, cwd=code or PROJECT_ROOT)
            figures = _ingest_figures(m)
            runs = _RUN.findall(m.stdout)
            landed_lines = count_lines(home / "lake" / "landing")
            intake_ok = (
                figures["received"] == n_events
                and figures["landed"] + figures["quarantined"] == n_events
                and landed_lines == figures["landed"]
            )
            row: dict[str, Any] = {
                "code": variant,
                "format": fmt,
                "run": rep,
                "events": n_events,
                "landed": figures["landed"],
                "quarantined": figures["quarantined"],
                "landing_s": figures["cli_s"],
                "landing_events_per_s": rate(n_events, figures["cli_s"]),
                "wall_s": m.wall_s,
                "wall_events_per_s": rate(n_events, m.wall_s),
                "peak_rss_mib": m.max_rss_mib,
                "cpu_s": m.cpu_s,
                "tree_cpu_s": m.tree_cpu_s,
                "load_before": load,
                "load_after": load_average(),
                "command": "recsys ingest "
                + " ".join(p.name for p in files)
                + ("" if process else " --no-process"),
            }
            if process:
                weblog_rows = sum(int(r[0].replace(",", "")) for r in runs)
                weblog_q = sum(int(r[1].replace(",", "")) for r in runs)
                row.update(
                    run_s=sum(float(r[5]) for r in runs),
                    weblog_rows=weblog_rows,
                    weblog_quarantined=weblog_q,
                    checks=", ".join(f"{r[2]}/{r[3]}" for r in runs),
                    runs_ok=bool(runs) and all(r[4] == "succeeded" for r in runs),
                )
                intake_ok = intake_ok and weblog_rows + weblog_q == figures["landed"]
            row["accounting_ok"] = intake_ok and m.returncode == 0
            rows.append(row)
            say(
                f"[{variant} code, {fmt}, run {rep}/{repeat}] landing "
                f"{row['landing_events_per_s']:,.0f} events/s "
                f"({row['landing_s']:.1f}s), whole command {row['wall_events_per_s']:,.0f} "
                f"events/s ({row['wall_s']:.1f}s), peak RSS {row['peak_rss_mib']:,.0f} MiB, "
                f"accounting {'ok' if row['accounting_ok'] else 'MISMATCH'}"
            )
            shutil.rmtree(home, ignore_errors=True)
    return rows


def bulk_medians(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (code, format): the median of its runs' rates, with their range."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["code"], r["format"]), []).append(r)
    medians = []
    for (code, fmt), runs in groups.items():
        row: dict[str, Any] = {
            "code": code,
            "format": fmt,
            "runs": len(runs),
            "processed": "run_s" in runs[0],  # the whole command ran, not only the landing
            "accounting_ok": all(r["accounting_ok"] for r in runs),
        }
        for key in ("landing_events_per_s", "wall_events_per_s"):
            values = [r[key] for r in runs]
            row[key] = statistics.median(values)
            row[f"{key}_range"] = (min(values), max(values))
        medians.append(row)
    return medians


_PROCESSED = re.compile(
    r"weblogs \S+: ([\d,]+) rows, ([\d,]+) quarantined; checks (\d+)/(\d+) passed; "
    r"run \w+ (succeeded|FAILED) in ([\d.]+)s"
)


def _land(home: Path, env: dict[str, str], files: list[Path], parallel: int) -> dict[str, Any]:
    """Preparation for the processing scenario: ingest in parallel, because it is not measured."""
    groups = [files[i::parallel] for i in range(parallel) if files[i::parallel]]
    results: list[Measured | None] = [None] * len(groups)

    def worker(i: int) -> None:
        cmd: list[str | Path] = [RECSYS, "ingest", *groups[i], "--no-process"]
        results[i] = run_measured(cmd, env, prefix=f"    | ingest[{i}] ")

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    landed = sum(_ingest_figures(m)["landed"] for m in results if m is not None)
    return {"ingest_s": wall, "ingest_processes": len(groups), "landed": landed}


def bench_process(root: Path, n_events: int, profile: int) -> dict[str, Any]:
    """Landed events -> weblogs Parquet: rules alone (all dates, then 5 for the memory
    bound), rules + GX checks without Dagster, then the full Dagster asset."""
    home = root / "process"
    home.mkdir(parents=True)
    env = isolated_env(home)
    files, sim_s = simulate(home / "sim", n_events)
    say(f"landing {n_events:,} events with recsys ingest --no-process (preparation)")
    prep = _land(home, env, files, parallel=max(1, min(2, len(os.sched_getaffinity(0)))))
    shutil.rmtree(home / "sim")  # the landed copy is what gets processed; free the disk
    landing_lines = count_lines(home / "lake" / "landing")
    say(
        f"landed {prep['landed']:,} events in {prep['ingest_s']:.1f}s "
        f"({landing_lines:,} landing lines)"
    )

    part_a = _process_only(env, "(a) process_partitions alone (rules + Parquet)", [], profile)
    # The same on the first 5 dates: peak memory follows a partition, not the range.
    part_a5 = _process_only(env, "(a) on the first 5 dates (memory bound)", ["--days", "5"], 0)
    part_c = _process_only(env, "(c) process_partitions + GX checks, no Dagster", ["--checks"], 0)

    load_b = load_average()
    say(f"(b) recsys process (weblogs_job through Dagster, GX checks); load {load_b}")
    b = run_measured([RECSYS, "process"], env)
    got = _PROCESSED.search(b.stdout)
    if got is None:
        raise RuntimeError(f"recsys process failed ({b.returncode}):\n{b.stdout}\n{b.stderr}")
    rows = int(got[1].replace(",", ""))
    quarantined = int(got[2].replace(",", ""))
    run_s = float(got[6])
    part_b = {
        "rows": rows,
        "quarantined": quarantined,
        "checks_passed": f"{got[3]}/{got[4]}",
        "run": got[5],
        "run_s": run_s,
        "events_per_s": rate(rows + quarantined, run_s),
        "wall_s": b.wall_s,
        "wall_events_per_s": rate(rows + quarantined, b.wall_s),
        "peak_rss_mib": b.max_rss_mib,
        "cpu_cores": rate(b.cpu_s, b.wall_s),
        "cpu_s": b.cpu_s,
        "load_before": load_b,
        "command": "recsys process",
    }
    say(
        f"(b) {part_b['events_per_s']:,.0f} events/s in the run "
        f"({part_b['wall_events_per_s']:,.0f} incl. start-up), "
        f"peak RSS {part_b['peak_rss_mib']:,.0f} MiB, checks {part_b['checks_passed']}"
    )
    return {
        "events": n_events,
        "simulate_s": sim_s,
        **prep,
        "landing_lines": landing_lines,
        "process_partitions": part_a,
        "process_partitions_5_days": part_a5,
        "process_partitions_checks": part_c,
        "weblogs_asset": part_b,
    }


def _process_only(
    env: dict[str, str], title: str, extra: list[str], profile: int
) -> dict[str, Any]:
    """bench/process_only.py in its own process: in-run throughput, peak RSS, CPU."""
    load = load_average()
    say(f"{title}; load {load}")
    cmd: list[str | Path] = [sys.executable, BENCH_DIR / "process_only.py", *extra]
    if profile:
        cmd += ["--profile", str(profile)]
    m = run_measured(cmd, env)
    if m.returncode != 0:
        raise RuntimeError(f"process_only failed ({m.returncode}):\n{m.stderr}")
    r = m.last_json()
    out = {
        "partitions": r["partitions"],
        "landing_rows": r["landing_rows"],
        "max_partition_rows": r["max_partition_rows"],
        "rows": r["rows"],
        "quarantined": r["quarantined"],
        "reasons": r["reasons"],
        "checks": r["checks"],
        "work_s": r["work_s"],
        "events_per_s": rate(r["landing_rows"], r["work_s"]),
        "wall_s": m.wall_s,
        "wall_events_per_s": rate(r["landing_rows"], m.wall_s),
        "peak_rss_mib": m.max_rss_mib,
        "cpu_s": m.cpu_s,
        "cpu_cores": rate(m.cpu_s, m.wall_s),
        "load_before": load,
        "command": " ".join(["python bench/process_only.py", *extra]),
    }
    say(
        f"  {out['events_per_s']:,.0f} events/s in-process "
        f"({out['wall_events_per_s']:,.0f} incl. start-up), peak RSS "
        f"{out['peak_rss_mib']:,.0f} MiB, {out['cpu_cores']:.2f} cores"
    )
    return out


# ----------------------------------------------------------------------------- report
def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    parts = [
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
        f"Python {m['python']}, kernel {m['kernel']}, {m['date']}, "
        f"load at start {m.get('load_at_start')}"
    ]
    if results.get("collector"):
        rows = [
            [
                str(c["workers"]),
                f"{c['events_per_s']:,.0f}",
                f"{c['requests_per_s']:,.0f}",
                f"{c['p50_ms']:.1f}",
                f"{c['p99_ms']:.1f}",
                str(c["errors"]),
                f"{c['server_peak_rss_mib_max']:,.0f}/{c['server_peak_rss_mib_sum']:,.0f}",
                f"{c['server_cpu_cores']:.2f}",
                f"{c['client_cpu_cores']:.2f}",
                "ok" if c["accounting_ok"] else "MISMATCH",
            ]
            for c in results["collector"]
        ]
        parts.append(
            _table(
                "1. collector POST /events (NDJSON, 500 events/request)",
                [
                    *("workers", "events/s", "req/s", "p50 ms", "p99 ms", "errors"),
                    *("peak RSS MiB max/sum", "server cores", "client cores", "accounting"),
                ],
                rows,
            )
        )
    if results.get("ingest_file"):
        i = results["ingest_file"]
        parts.append(
            _table(
                f"2. recsys ingest --no-process ({i['events']:,} events)",
                ["events/s (wall)", "events/s (CLI)", "wall s", "peak RSS MiB", "accounting"],
                [
                    [
                        f"{i['events_per_s']:,.0f}",
                        f"{i['cli_events_per_s']:,.0f}",
                        f"{i['wall_s']:.1f}",
                        f"{i['peak_rss_mib']:,.0f}",
                        "ok" if i["accounting_ok"] else "MISMATCH",
                    ]
                ],
            )
        )
    if results.get("bulk"):
        rows = [
            [
                f"{r['code']} {r['format']} {r.get('run', 1)}",
                f"{r['landing_events_per_s']:,.0f}",
                f"{r['landing_s']:.1f}",
                f"{r.get('run_s', 0):.1f}",
                f"{r['wall_events_per_s']:,.0f}",
                f"{r['wall_s']:.1f}",
                f"{r['peak_rss_mib']:,.0f}",
                f"{r.get('tree_cpu_s', 0):.1f}",
                f"{r['landed']:,}+{r['quarantined']:,}",
                "ok" if r["accounting_ok"] else "MISMATCH",
                str(r["load_before"]),
            ]
            for r in results["bulk"]
        ]
        parts.append(
            _table(
                f"4. bulk recsys ingest ({results['bulk'][0]['events']:,} events), each run",
                [
                    *("code, format, run", "landing ev/s", "landing s", "run s"),
                    *("whole ev/s", "wall s", "peak RSS MiB", "CPU s (tree)"),
                    "landed+quarantined",
                    *("accounting", "load before"),
                ],
                rows,
            )
        )

        def spread(m: dict[str, Any], key: str) -> str:
            low, high = m[f"{key}_range"]
            return f"{m[key]:,.0f} ({low:,.0f}-{high:,.0f})"

        medians = bulk_medians(results["bulk"])
        parts.append(
            _table(
                "   medians over the runs (lowest-highest)",
                ["code, format", "runs", "landing ev/s", "whole ev/s", "accounting"],
                [
                    [
                        f"{m['code']} {m['format']}",
                        str(m["runs"]),
                        spread(m, "landing_events_per_s"),
                        spread(m, "wall_events_per_s") if m["processed"] else "-",
                        "ok" if m["accounting_ok"] else "MISMATCH",
                    ]
                    for m in medians
                ],
            )
        )
    if results.get("process"):
        p = results["process"]
        b = p["weblogs_asset"]
        steps = [
            ("(a) process_partitions", p["process_partitions"]),
            ("(a) first 5 dates only", p.get("process_partitions_5_days")),
            ("(c) + GX checks, no Dagster", p.get("process_partitions_checks")),
        ]
        rows = [
            [
                label,
                f"{x['events_per_s']:,.0f}",
                f"{x['work_s']:.1f}",
                f"{x['wall_events_per_s']:,.0f}",
                f"{x['wall_s']:.1f}",
                f"{x['peak_rss_mib']:,.0f}",
                f"{x['cpu_cores']:.2f}",
                str(x.get("load_before", "")),
            ]
            for label, x in steps
            if x
        ]
        rows.append(
            [
                f"(b) recsys process (checks {b['checks_passed']})",
                f"{b['events_per_s']:,.0f}",
                f"{b['run_s']:.1f}",
                f"{b['wall_events_per_s']:,.0f}",
                f"{b['wall_s']:.1f}",
                f"{b['peak_rss_mib']:,.0f}",
                f"{b['cpu_cores']:.2f}",
                str(b.get("load_before", "")),
            ]
        )
        a = p["process_partitions"]
        parts.append(
            _table(
                f"3. weblogs processing ({p['events']:,} events, {a['partitions']} partitions of "
                f"up to {a.get('max_partition_rows', 0):,}; prep: simulate "
                f"{p['simulate_s']:.0f}s, ingest {p['ingest_s']:.0f}s)",
                [
                    *("step", "events/s (work)", "work s", "events/s (wall)", "wall s"),
                    *("peak RSS MiB", "cores", "load before"),
                ],
                rows,
            )
        )
    return "\n\n".join(parts)


def summary_line(results: dict[str, Any]) -> str:
    bits = []
    for c in results.get("collector", []):
        bits.append(f"collector {c['workers']}w {c['events_per_s']:,.0f} ev/s")
    if results.get("collector"):
        best = max(c["events_per_s"] for c in results["collector"])
        bits[-1] += f" (target 50k {'met' if best >= COLLECTOR_TARGET else 'MISSED'})"
    if results.get("ingest_file"):
        bits.append(f"ingest {results['ingest_file']['events_per_s']:,.0f} ev/s")
    for r in bulk_medians(results.get("bulk", [])):
        bits.append(
            f"bulk {r['code']} {r['format']}"
            + (f" (median of {r['runs']})" if r["runs"] > 1 else "")
            + f": landing {r['landing_events_per_s']:,.0f} ev/s "
            f"(target 500k {'met' if r['landing_events_per_s'] >= LANDING_TARGET else 'MISSED'})"
            + (
                f", whole {r['wall_events_per_s']:,.0f} ev/s (target 250k "
                f"{'met' if r['wall_events_per_s'] >= END_TO_END_TARGET else 'MISSED'})"
                if r["processed"]
                else ""
            )
        )
    if results.get("process"):
        a = results["process"]["process_partitions"]
        b = results["process"]["weblogs_asset"]
        c = results["process"].get("process_partitions_checks")
        met = {
            name: "met" if x["events_per_s"] >= PROCESS_TARGET else "MISSED"
            for name, x in (("a", a), ("b", b))
        }
        bits.append(
            f"process_partitions {a['events_per_s']:,.0f} ev/s (target 1M {met['a']}, "
            f"peak {a['peak_rss_mib']:,.0f} MiB)"
            + (f", with GX checks {c['events_per_s']:,.0f} ev/s" if c else "")
            + f", weblogs asset {b['events_per_s']:,.0f} ev/s (target 1M {met['b']}, "
            f"peak {b['peak_rss_mib']:,.0f} MiB)"
        )
    accounting = all(
        r.get("accounting_ok", True)
        for r in [
            *results.get("collector", []),
            results.get("ingest_file", {}),
            *results.get("bulk", []),
        ]
    )
    bits.append("accounting ok" if accounting else "ACCOUNTING MISMATCH")
    return "ingest bench: " + "; ".join(bits)


# -------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Acquisition throughput benchmark (collector, recsys ingest, weblogs)."
    )
    parser.add_argument("--quick", action="store_true", help="1M events to process, 5s load")
    parser.add_argument(
        "--only",
        choices=["collector", "ingest", "process", "bulk"],
        action="append",
        help="run only these scenarios (repeatable)",
    )
    parser.add_argument("--duration", type=float, help="collector load seconds (15, quick 5)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--max-rate", type=float, default=200_000, help="body budget, events/s")
    parser.add_argument("--ingest-events", type=int, default=1_000_000)
    parser.add_argument("--process-events", type=int, help="10M (quick: 1M)")
    parser.add_argument("--profile", type=int, default=0, help="cProfile top N of (a)")
    parser.add_argument(
        "--bulk-events", type=int, default=10_000_000, help="bulk: events in the log (10M)"
    )
    parser.add_argument(
        "--bulk-formats", nargs="+", choices=["plain", "gz"], default=["plain", "gz"]
    )
    parser.add_argument(
        "--bulk-no-process", action="store_true", help="bulk: landing only (--no-process)"
    )
    parser.add_argument(
        "--bulk-repeat",
        type=int,
        default=1,
        help="bulk: runs of each case, the codes taking turns; medians reported",
    )
    parser.add_argument(
        "--bulk-files",
        type=Path,
        help="bulk: keep the simulated log here and reuse it across runs",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="bulk: a checkout of the previous code, run beside this one (PYTHONPATH)",
    )
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    args = parser.parse_args(argv)

    only = set(args.only or ["collector", "ingest", "process"])
    duration = args.duration or (5.0 if args.quick else 15.0)
    process_events = args.process_events or (1_000_000 if args.quick else 10_000_000)
    out = args.out or BENCH_DIR / "results" / f"ingest{'-quick' if args.quick else ''}.json"
    if not RECSYS.exists():
        print(
            f"error: {RECSYS} not found; run with the project's .venv/bin/python", file=sys.stderr
        )
        return 2

    largest = max(
        args.ingest_events if "ingest" in only else 0,
        args.bulk_events if "bulk" in only else 0,
        process_events if "process" in only else 0,
    )
    need = largest * DISK_BYTES_PER_EVENT
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        print(f"error: {args.tmp} has {free / 2**30:.1f} GiB free, need ~{need / 2**30:.1f} GiB")
        return 2

    machine = machine_info()
    say(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_gib']} GiB, "
        f"Python {machine['python']}; temp {args.tmp} ({free / 2**30:.0f} GiB free)"
    )
    results: dict[str, Any] = {
        "machine": machine,
        "quick": args.quick,
        "command": " ".join([".venv/bin/python bench/ingest.py", *(argv or sys.argv[1:])]),
    }
    root = Path(tempfile.mkdtemp(prefix="recsys-bench-", dir=args.tmp))
    steps: list[tuple[str, Callable[[Path], Any]]] = []
    if "collector" in only:
        steps.append(
            (
                "collector",
                lambda r: [
                    bench_collector(r, w, duration, args.connections, args.max_rate)
                    for w in args.workers
                ],
            )
        )
    if "ingest" in only:
        steps.append(("ingest_file", lambda r: bench_ingest_file(r, args.ingest_events)))
    if "process" in only:
        steps.append(("process", lambda r: bench_process(r, process_events, args.profile)))
    if "bulk" in only:
        steps.append(
            (
                "bulk",
                lambda r: bench_bulk_ingest(
                    r,
                    args.bulk_events,
                    args.bulk_files,
                    args.bulk_formats,
                    args.baseline,
                    not args.bulk_no_process,
                    args.bulk_repeat,
                ),
            )
        )
    try:
        for name, step in steps:
            scenario_root = root / name
            try:
                results[name] = step(scenario_root)
            finally:
                shutil.rmtree(scenario_root, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["total_s"] = time.perf_counter() - T0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print()
    print(report(results))
    print()
    say(f"results written to {out} (bench driver peak RSS {usage.ru_maxrss / 1024:,.0f} MiB)")
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
