"""One retraining at a time, whoever starts it: ``recsys retrain``, a sensor, a schedule
or the UI.

The run queue's tag limit (``dagster.yaml``) only orders the runs the daemon launches;
``recsys retrain`` executes in its own process, past the queue. So every retraining
holds one exclusive lock for as long as it runs: an ``flock`` on
``training/.retrain.lock`` in a local lake (every process that writes that lake sees
it, whichever Dagster instance launched it). Taking it is one atomic system call, so
two retrainings started at the same instant cannot both pass (no check-then-run), and
the kernel releases it when its holder dies, however it dies: a crashed run never
blocks the next one.

``recsys retrain`` asks once and refuses with one line naming the holder; a run of
``retrain_job`` launched by the daemon waits for the lock (a queue of one), logging
who holds it, for up to :data:`WAIT_SECONDS`. ``recsys retrain`` then executes its
run in the thread that holds the lock, so the run's executor finds the lock already
held by that thread and only writes its run id into it (the lock is re-entrant per
thread, never across threads or processes).

S3 lake: there is no lock file shared between machines. The lock then lives in the
Dagster instance directory (``$DAGSTER_HOME``), which serializes the CLI and the runs
of one host; runs on other hosts are ordered only by the run queue's tag limit, so
every retraining must go through that queue (``dagster job launch`` or the UI), not
``recsys retrain`` on several machines. Even then two retrainings cannot mix their
artifacts: each writes under its own run directory (``artifacts.run_scope``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from recsys_serving.lake import Lake, open_lake
from recsys_serving.layout import RETRAIN_LOCK_KEY
from recsys_serving.logging import get_logger
from recsys_serving.settings import Settings

log = get_logger(__name__)

WAIT_SECONDS = 6 * 3600.0  # a queued run gives up after this (the holder is stuck)
POLL_SECONDS = 1.0


# Lock files this thread holds, with their descriptors (re-entrancy, see the docstring).
_held = threading.local()


def _held_here() -> dict[str, int]:
    if not hasattr(_held, "fds"):
        _held.fds = {}
    return _held.fds


def _write_holder(fd: int, holder: Holder) -> None:
    data = json.dumps(asdict(holder)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


class RetrainBusy(Exception):
    """Another retraining holds the lock; the message names it, in one line."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds the lock (written into the lock file once it is taken)."""

    pid: int
    host: str
    run_id: str | None
    trigger: str
    since: str

    def describe(self) -> str:
        run = f"run {self.run_id[:8]}, " if self.run_id else ""
        return f"{run}{self.trigger}, pid {self.pid} on {self.host}, since {self.since}"


def lock_path(settings: Settings, lake: Lake | None = None) -> Path:
    """The lake's lock file when the lake is local, else one in the Dagster instance."""
    if lake is None:
        lake = open_lake(
            settings.resolved_lake_uri, settings.lake.s3_endpoint_url, settings.lake.aws_region
        )
    local = lake.local_path(RETRAIN_LOCK_KEY)
    if local is not None:
        return Path(local)
    home = os.environ.get("DAGSTER_HOME")
    return (Path(home) if home else settings.dagster_home) / "locks" / "retrain.lock"


def read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(**data)
    except (OSError, ValueError, TypeError):
        return None  # never held, or being written right now


def _holder_of(path: Path, patience: float = 0.5) -> Holder | None:
    """The holder, allowing it the moment between taking the lock and writing its name."""
    deadline = time.monotonic() + patience
    while (holder := read_holder(path)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder


def _holder_with_run(path: Path, patience: float) -> Holder | None:
    """The holder once it has written its run id (None if it did not within ``patience``)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        holder = read_holder(path)
        if holder is not None and holder.run_id is not None:
            return holder
        time.sleep(0.1)
    return None


@contextmanager
def retrain_lock(
    path: Path,
    *,
    run_id: str | None,
    trigger: str,
    wait_seconds: float = 0.0,
    on_wait: Callable[[Holder | None], None] | None = None,
    reentrant: bool = False,
    name_run_within: float = 0.0,
) -> Iterator[Holder]:
    """Hold the retraining lock for the duration of the block.

    ``wait_seconds=0`` refuses at once (:class:`RetrainBusy`); otherwise waits up to that
    long, calling ``on_wait`` once with the holder. ``reentrant``: a nested call in
    this thread (the run this thread goes on to execute) joins this hold instead of
    waiting for it: it only writes its run id into the lock file, and the outer block
    keeps and releases the lock. ``name_run_within``: when refusing a holder that has
    no run yet (a ``recsys retrain`` between taking the lock and creating its run),
    wait up to that long for its run id, so the refusal names the run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    held = _held_here()
    key = str(path.resolve())
    if key in held:
        outer = read_holder(path)
        holder = Holder(
            pid=os.getpid(),
            host=socket.gethostname(),
            run_id=run_id or (outer.run_id if outer else None),
            trigger=outer.trigger if outer else trigger,
            since=outer.since if outer else datetime.now(UTC).isoformat(timespec="seconds"),
        )
        _write_holder(held[key], holder)
        yield holder
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_seconds
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder_of(path)
                if time.monotonic() >= deadline:
                    if holder is not None and holder.run_id is None and name_run_within > 0:
                        holder = _holder_with_run(path, name_run_within) or holder
                    who = holder.describe() if holder else "another process"
                    raise RetrainBusy(
                        f"another retraining is running ({who}); wait for it to finish "
                        "(it shows in the Dagster UI)"
                    ) from None
                if not told and on_wait is not None:
                    on_wait(holder)
                    told = True
                time.sleep(POLL_SECONDS)
        holder = Holder(
            pid=os.getpid(),
            host=socket.gethostname(),
            run_id=run_id,
            trigger=trigger,
            since=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        _write_holder(fd, holder)
        log.info("retrain.lock_taken", path=str(path), run_id=run_id, trigger=trigger)
        if reentrant:
            held[key] = fd
        try:
            yield holder
        finally:
            held.pop(key, None)
            os.ftruncate(fd, 0)  # no stale holder for the next reader
    finally:
        os.close(fd)  # releases the lock (the kernel does the same if we die)


# --------------------------------------------------------------- retrain_job's executor
class ExclusiveExecutor(dg.Executor):
    """Runs the plan with Dagster's own executor while holding the retraining lock in the
    run worker, which lives as long as the run (its steps may be other processes)."""

    def __init__(self, inner: dg.Executor) -> None:
        self.inner = inner

    @property
    def retries(self) -> Any:
        return self.inner.retries

    @property
    def step_dependency_config(self) -> Any:
        return self.inner.step_dependency_config

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[Any]:
        run = plan_context.dagster_run
        settings = Settings()

        def waiting(holder: Holder | None) -> None:
            who = holder.describe() if holder else "another process"
            plan_context.log.info(f"waiting for the retraining lock, held by {who}")

        with retrain_lock(
            lock_path(settings),
            run_id=run.run_id,
            trigger=f"retrain_job ({run.tags.get('recsys/trigger', 'dagster')})",
            wait_seconds=WAIT_SECONDS,
            on_wait=waiting,
        ):
            yield from self.inner.execute(plan_context, execution_plan)


def _exclusive(init_context: Any) -> dg.Executor:
    base = dg.multi_or_in_process_executor
    assert base.executor_creation_fn is not None
    return ExclusiveExecutor(base.executor_creation_fn(init_context))


exclusive_executor = dg.ExecutorDefinition(
    name="retrain_exclusive",
    config_schema=dg.multi_or_in_process_executor.config_schema,
    requirements=dg.multi_or_in_process_executor.get_requirements,
    executor_creation_fn=_exclusive,
    description=(
        "Dagster's default executor (multiprocess or in-process) holding the retraining "
        "lock for the whole run: one retraining at a time, CLI included."
    ),
)
