"""JSON log lines on stdout, one object per line, for every process.

Records carry `service`, the `trace_id`/`span_id` of the current span (so a log line leads to
its trace), the fields bound with `log_context` (tenant, session, task) and any `extra=`
fields. Message bodies and tokens are never passed to the logger by our code;
`REDACTED_KEYS` is a second line of defence for extras.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import msgspec
from opentelemetry import trace

REDACTED_KEYS = frozenset({"token", "authorization", "jwt", "secret", "password", "message"})
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
    "websocket",
}
_encoder = msgspec.json.Encoder(enc_hook=str)
_bound: ContextVar[dict[str, str]] = ContextVar("log_context", default={})  # noqa: B039


def bind_for_this_task(**fields: str) -> None:
    """Bind fields to every later line of the current asyncio task (a request's: uvicorn runs
    each in a task of its own), with no scope to leave: a request's exception handlers run
    after its dependencies have returned, and the tenant those resolved is still known."""
    _bound.set({**_bound.get(), **fields})


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Bind fields (tenant_id, session_id, task_id) to every log line written inside."""
    token = _bound.set({**_bound.get(), **fields})
    try:
        yield
    finally:
        _bound.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = format(span.trace_id, "032x")
            line["span_id"] = format(span.span_id, "016x")
        line.update(_bound.get())
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            line[key] = "[redacted]" if key.lower() in REDACTED_KEYS else value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode("utf-8", "replace")


class RepeatLimiter(logging.Filter):
    """At most `burst` lines a minute of each message template of each logger, for
    warnings; the first line let through after some were dropped says how many
    (`suppressed`). Clients decide how often some lines are written (a malformed request, a
    body too deep, a refused send while Redis is down): one line each let a client, even one
    without a token, write as much log as it liked. Errors are never dropped."""

    def __init__(self, burst: int = 20, window_seconds: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.window = window_seconds
        self._seen: dict[tuple[str, object], list[float]] = {}  # [window start, lines, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            # Errors are never dropped; below, lines of one template tell different things
            # (a tenant's quota applied, a partition taken): 20 of 30 tenants' lines kept.
            return True
        key = (record.name, record.msg)
        state = self._seen.get(key)
        if state is None or record.created - state[0] >= self.window:
            if len(self._seen) >= 10_000:  # templates are few; a bound all the same
                self._seen.clear()
            dropped = 0 if state is None else int(state[2])
            self._seen[key] = [record.created, 1, 0]
            if dropped:
                record.suppressed = dropped
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


def configure_logging(level: str, service: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(RepeatLimiter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings become JSON lines too
    # uvicorn logs every socket's open and close at INFO: far too much at 1000s of sockets.
    for noisy in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
