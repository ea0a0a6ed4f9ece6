"""Small helpers of the trace tests: waiting for spans, the message's trace id, log lines."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from services.cli.otlp_sink import ReceivedSpan, Receiver
from services.cli.stack import LocalStack


async def wait_for(
    receiver: Receiver, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 15
) -> list[ReceivedSpan]:
    """Every received span once `predicate(spans)` holds; the spans so far after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        with receiver.lock:
            spans = list(receiver.spans)
        if predicate(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


def of_task(spans: list[ReceivedSpan], task_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("orchestrator.task_id") == task_id]


def trace_id_of(action: dict[str, Any]) -> str:
    """The trace id a `chat.process` carries (the message's trace)."""
    return action["trace_context"]["traceparent"].split("-")[1]


def short(spans: list[ReceivedSpan]) -> list[tuple[str, str, str, str, int]]:
    return [
        (s.service.rsplit("-", 1)[-1], s.kind, s.name, s.trace_id[:8], s.status_code) for s in spans
    ]


def log_records(stack: LocalStack, role: str | None = None) -> list[dict[str, Any]]:
    """The complete JSON lines written so far by the stack's processes (of `role`)."""
    records = []
    for child in stack.children:
        if child.log_path is None or (role is not None and child.role != role):
            continue
        for line in child.log_path.read_text().split("\n")[:-1]:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return records


async def wait_for_log(
    stack: LocalStack, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in log_records(stack) if predicate(r)]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)
