"""The traced deployment of tests/e2e (api, worker, executor exporting to a real OTLP sink),
with a sink that also keeps every span event's attributes (the e2e `Receiver` keeps only
event names): the tests check that no token or message body is in any of them. Written by
the tracing review."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from services.cli.embedded import RedisServer
from services.cli.otlp_sink import Receiver, _value
from services.cli.stack import Child, LocalStack
from tests.e2e.conftest import e2e_redis, new_stack  # noqa: F401  (fixture reused)


@dataclass
class FullReceiver(Receiver):
    """`Receiver`, plus each span's events with their attributes, keyed by span id."""

    events: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)

    def collect(self, request: ExportTraceServiceRequest) -> None:
        super().collect(request)
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.events[span.span_id.hex()] = [
                            (e.name, {a.key: _value(a.value) for a in e.attributes})
                            for e in span.events
                        ]


@pytest.fixture(scope="module")
def traced(
    e2e_redis: RedisServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalStack, Child, FullReceiver]]:
    """As tests/e2e/conftest.py `traced`: api, worker and executor exporting to the sink."""
    receiver = FullReceiver().start()
    stack = new_stack(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        executor_chunk_delay_ms="1",
        retry_backoff_seconds="0.05",
        retry_backoff_max_seconds="0.1",
    )
    stack.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    stack.env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        yield stack, api, receiver
    finally:
        stack.stop()
        receiver.stop()
