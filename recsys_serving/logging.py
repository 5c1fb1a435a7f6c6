"""One log format for every process: structlog renders every line, JSON by default.

structlog's loggers hand their events to the standard library, and one handler on the
root logger renders them with a :class:`structlog.stdlib.ProcessorFormatter`, together
with whatever the standard library's loggers say (uvicorn's startup and access lines,
httpx, Python warnings, any library). A deployment's log collector therefore parses one
format, and every line carries the same keys (:data:`BASE_KEYS`); structlog events add
their own fields, uvicorn's access lines add the request's.

Going through the standard library is also what lets Dagster show these lines: a run
attaches its handler to the loggers ``dagster.yaml`` lists under
``python_logs.managed_python_loggers`` (``recsys_assets``, ``recsys_serving``), so what
plain functions log during a run reaches the run's event log, as ``context.log`` does.

Set ``RECSYS_LOG_FORMAT=console`` for human-readable output while developing, and
``RECSYS_LOG_LEVEL`` for the level of the project's own loggers (``INFO`` by default;
other libraries log from ``WARNING`` on, uvicorn at ``recsys serve --log-level``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# Keys of every line, whoever logged it.
BASE_KEYS = ("timestamp", "level", "logger", "event")
# Fields of a uvicorn access line, from the arguments of its message.
ACCESS_KEYS = ("client_addr", "method", "path", "http_version", "status_code")
# The event dict as logged, kept on the stdlib record: a handler that runs before ours
# (Dagster's, on managed loggers) rewrites ``record.msg`` in place.
_EVENT_ATTR = "recsys_event"
# The project's loggers log at RECSYS_LOG_LEVEL; everyone else's (httpx logs every
# request at INFO, mail servers every connection) only from WARNING on.
OWN_LOGGERS = ("recsys", "recsys_assets", "recsys_serving")  # recsys.alerts: alert log channel
_LEVEL_ENV = "RECSYS_LOG_LEVEL"
_FORMAT_ENV = "RECSYS_LOG_FORMAT"

_structlog_configured = False


class _Event(dict[str, Any]):
    """A structlog event on its way through the standard library.

    ``str()`` is what ``LogRecord.getMessage()`` returns to handlers that do not know
    structlog (Dagster's run log): the event name and its fields, not a dict repr.
    """

    def __str__(self) -> str:
        fields = [
            f"{key}={value}"
            for key, value in self.items()
            if key not in BASE_KEYS and not key.startswith("_")
        ]
        return " ".join([str(self.get("event", "")), *fields])


def _to_stdlib(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Last structlog processor: hand the event to the stdlib logger (as
    ``ProcessorFormatter.wrap_for_formatter`` does) and keep a reference to it."""
    event = _Event(event_dict)
    return (event,), {"extra": {"_logger": logger, "_name": method_name, _EVENT_ATTR: event}}


def _uvicorn_access_fields(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Foreign records: turn uvicorn's access-line arguments into fields (a collector
    filters on ``status_code`` without parsing the message); drop everyone else's."""
    args = event_dict.pop("positional_args", ())
    record = event_dict.get("_record")
    if record is not None and record.name == "uvicorn.access" and len(args) == len(ACCESS_KEYS):
        event_dict.update(zip(ACCESS_KEYS, args, strict=True))
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


class RecsysFormatter(structlog.stdlib.ProcessorFormatter):
    """The formatter of the root handler (also named by uvicorn's ``log_config``)."""

    def __init__(self, console: bool | None = None) -> None:
        if console is None:
            console = os.environ.get(_FORMAT_ENV) == "console"
        renderer: list[Processor] = (
            [structlog.dev.ConsoleRenderer()]
            if console
            else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        )
        super().__init__(
            foreign_pre_chain=[*_shared_processors(), _uvicorn_access_fields],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
            pass_foreign_args=True,
        )

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, _EVENT_ATTR, None)
        if event is not None and record.msg is not event:
            record = logging.makeLogRecord({**record.__dict__, "msg": event, "args": ()})
        return super().format(record)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _level(level: str | None) -> int:
    name = (level or os.environ.get(_LEVEL_ENV, "INFO")).upper()
    value = logging.getLevelName(name)
    return value if isinstance(value, int) else logging.INFO


def configure_logging(level: str | None = None) -> None:
    """Route structlog through the standard library and give the root logger the one
    handler that renders everything. Safe to call again: it sets the level and never
    adds a second handler (uvicorn's ``log_config`` may have installed it already)."""
    global _structlog_configured
    root = logging.getLogger()
    if not any(isinstance(h.formatter, RecsysFormatter) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(RecsysFormatter())
        root.addHandler(handler)
    value = _level(level)
    if level is not None or not _structlog_configured:
        root.setLevel(max(value, logging.WARNING))
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(value)
    logging.captureWarnings(True)
    if _structlog_configured:
        return
    _structlog_configured = True
    structlog.configure(
        processors=[
            # The stdlib logger's level decides (Dagster sets its managed loggers'),
            # before any work is done for a line nobody will see.
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            _to_stdlib,
        ],
        # Calls below the configured level are no-ops (a few hundred ns).
        wrapper_class=structlog.make_filtering_bound_logger(value),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def uvicorn_log_config(level: str | None = None) -> dict[str, Any]:
    """uvicorn's ``log_config``: every process it starts (each worker is a fresh
    interpreter) renders its own and the app's lines through :class:`RecsysFormatter`
    from its first line on, instead of uvicorn's plain-text default."""
    value = _level(level)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"recsys": {"()": f"{__name__}.RecsysFormatter"}},
        "handlers": {"recsys": {"()": f"{__name__}.StderrHandler", "formatter": "recsys"}},
        "root": {"handlers": ["recsys"], "level": max(value, logging.WARNING)},
        "loggers": {
            **{
                name: {"handlers": [], "propagate": True}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
            },
            **{name: {"level": value} for name in OWN_LOGGERS},
        },
    }


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
