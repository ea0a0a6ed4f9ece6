"""Tracing: configured only from the standard `OTEL_*` variables, carried in `trace_context`.

Without an exporter (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
unset, or `OTEL_TRACES_EXPORTER=none`) no SDK is installed: every tracer is the API's no-op
and a span costs a function call. With one, each process exports OTLP/HTTP under its own
`service.name` (`OTEL_SERVICE_NAME`, else agent-orchestrator-<process>), with the Kubernetes
attributes the chart passes in, and the sampler of `OTEL_TRACES_SAMPLER`/`_ARG`.

Messaging spans follow OpenTelemetry's conventions: adding an action to a stream is a PRODUCER
`send <stream>` span whose W3C context travels in the action's `trace_context`; handling it is
a CONSUMER `process <stream>` span parented by that context.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_getter = DefaultGetter()
# Whether `configure_tracing` installed the SDK in this process (see `remote_parent`).
_installed = False

TRACER_NAME = "agent-orchestrator"
MESSAGING_SYSTEM = "redis"

_K8S_ATTRIBUTES = {
    "k8s.pod.name": "ORCHESTRATOR_POD_NAME",
    "k8s.namespace.name": "ORCHESTRATOR_POD_NAMESPACE",
    "k8s.node.name": "ORCHESTRATOR_NODE_NAME",
}


def exporter_configured() -> bool:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(process: str) -> bool:
    """Install the SDK for this process when an exporter is configured; True if installed."""
    if not exporter_configured():
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {
        name: os.environ[variable]
        for name, variable in _K8S_ATTRIBUTES.items()
        if os.environ.get(variable)
    }
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = f"agent-orchestrator-{process}"
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    global _installed
    _installed = True
    return True


def shutdown_tracing() -> None:
    """Flush what is buffered (at process exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(span: Span | None = None) -> dict[str, str]:
    """The W3C context of `span` (or the current one), for an action's `trace_context`."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(carrier, context=ctx)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context | None:
    if not carrier:
        return None
    return _propagator.extract(carrier, getter=_getter)


def remote_parent(carrier: Mapping[str, str]) -> otel_context.Context | None:
    """The context a CONSUMER span of an optional trace continues, or None: tracing is off in
    this process, or `carrier` holds no valid W3C `traceparent`. For the callbacks an AES may
    send untraced at a high rate (`websocket.send` with `trace_context: {}`, the delivery
    benchmark's 10 000/s): None means make no span at all, not even the API's no-op one, and
    an invalid context must not start a trace of its own (a root span per frame)."""
    if not _installed or not carrier.get("traceparent"):
        return None
    context = _propagator.extract(carrier, getter=_getter)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def remote_exemplar(carrier: Mapping[str, str]) -> dict[str, str] | None:
    """`exemplar` of the sampled trace `carrier` continues, without a span: a chunk gets none
    (they may come at thousands a second), yet the first one's time-to-first-chunk sample is
    a latency panel's dot that must lead to its trace."""
    context = remote_parent(carrier)
    return None if context is None else exemplar(trace.get_current_span(context))


def traceparent(span: Span) -> str:
    """The `traceparent` of a recording span, or "" (so untraced frames carry nothing)."""
    if not span.is_recording():
        return ""
    return inject(span).get("traceparent", "")


def messaging_attributes(
    stream: str,
    operation: str,
    *,
    message_id: str | None = None,
    group: str | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": stream,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    if group is not None:
        attributes["messaging.consumer.group.name"] = group
    if batch is not None:
        attributes["messaging.batch.message_count"] = batch
    return attributes


@contextmanager
def producer(stream: str, **attributes: Any) -> Iterator[Span]:
    """A PRODUCER `send <stream>` span; inject it into the action being added."""
    with tracer().start_as_current_span(
        f"send {stream}",
        kind=SpanKind.PRODUCER,
        attributes={**messaging_attributes(stream, "send"), **attributes},
    ) as span:
        yield span


@contextmanager
def consumer(
    stream: str,
    carrier: Mapping[str, str] | None,
    *,
    message_id: str | None = None,
    group: str | None = None,
    template: str | None = None,
    **attributes: Any,
) -> Iterator[Span]:
    """A CONSUMER `process <stream>` span, child of the context the producer injected. A
    destination named after a tenant or session gives its `template` instead (OpenTelemetry:
    span names are low-cardinality; the name itself stays in `messaging.destination.name`)."""
    extra = {} if template is None else {"messaging.destination.template": template}
    with tracer().start_as_current_span(
        f"process {template or stream}",
        context=extract(carrier),
        kind=SpanKind.CONSUMER,
        attributes={
            **messaging_attributes(stream, "process", message_id=message_id, group=group),
            **extra,
            **attributes,
        },
    ) as span:
        yield span


def exemplar(span: Span | None = None) -> dict[str, str] | None:
    """`{"trace_id": ...}` of a recording span (or the current one), for a metric exemplar."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x")}


def fail(span: Span, description: str, *, error_type: str, **attributes: Any) -> None:
    """Mark a span as an error with an event that says what happened, and `error.type` (a
    low-cardinality class of the error, OpenTelemetry's attribute for grouping failed spans:
    the description alone differs from span to span)."""
    span.set_status(Status(StatusCode.ERROR, description))
    span.set_attribute("error.type", error_type)
    span.add_event("error", {"message": description, **attributes})
