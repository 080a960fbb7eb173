"""Tracing with opentelemetry-sdk: one trace per request, spans per hop, context in NATS headers.

Off by default (no exporter, no span objects on the hot path). It is switched on when:
- ``BATON_TRACE_FILE`` is set: spans are appended as JSON lines to that file. Each process may
  share one file, since lines are written whole; meant for tests and debugging.
- ``OTEL_TRACES_EXPORTER=otlp`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set: spans go over OTLP.
  This needs ``opentelemetry-exporter-otlp``, from the ``otlp`` extra.

The W3C ``traceparent`` travels in NATS message headers, so the frontend, router, decode and
prefill spans of one request join into one trace. Attribute names follow OTel's GenAI
conventions where they fit (``gen_ai.*``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

ENABLED = False
_tracer: trace.Tracer = trace.get_tracer("baton")


class JsonLinesExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object a line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for s in spans:
            ctx = s.get_span_context()
            lines.append(json.dumps({
                "name": s.name,
                "service": s.resource.attributes.get("service.name"),
                "trace_id": format(ctx.trace_id, "032x"),
                "span_id": format(ctx.span_id, "016x"),
                "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
                "kind": s.kind.name,
                "start": s.start_time,
                "end": s.end_time,
                "attributes": dict(s.attributes or {}),
                "status": s.status.status_code.name,
            }))
        with self._lock, open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS


def setup_tracing(service: str) -> bool:
    """Configure this process's tracer from the environment; returns whether tracing is on."""
    global ENABLED, _tracer
    trace_file = os.environ.get("BATON_TRACE_FILE")
    otlp = os.environ.get("OTEL_TRACES_EXPORTER") == "otlp" or bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if not (trace_file or otlp):
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                       f"baton-{service}")}))
    if trace_file:
        # Simple (synchronous) processor: spans reach the file before the process may be killed.
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_file)))
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("baton")
    ENABLED = True
    return True


def context_from(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The trace context a message or HTTP request carried (W3C traceparent), if any."""
    if not ENABLED or not headers:
        return None
    return extract(dict(headers))


Parent = otel_context.Context | trace.Span | None


def start(name: str, kind: SpanKind = SpanKind.INTERNAL, parent: Parent = None, **attributes: Any) -> Any:
    """Start a span explicitly (None when tracing is off). Explicit, not "current": our hops are
    async generators and tasks, where a context-variable span would leak across yields."""
    if not ENABLED:
        return None
    ctx = trace.set_span_in_context(parent) if isinstance(parent, trace.Span) else parent
    return _tracer.start_span(name, context=ctx, kind=kind,
                              attributes={k: v for k, v in attributes.items() if v is not None})


def end(span: Any, error: str | None = None, **attributes: Any) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def event(span: Any, name: str, **attributes: Any) -> None:
    if span is not None:
        span.add_event(name, attributes={k: v for k, v in attributes.items() if v is not None})


def headers_for(span: Any) -> dict[str, str] | None:
    """NATS headers carrying ``span`` as the parent of whatever the message causes."""
    if span is None:
        return None
    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def trace_id_of(span: Any) -> str | None:
    if span is None:
        return None
    return format(span.get_span_context().trace_id, "032x")


def trace_id_from_headers(headers: Mapping[str, str] | None) -> str | None:
    """The trace id in a message's W3C ``traceparent`` header (``00-<trace id>-<span id>-<flags>``),
    read without the SDK: a worker's log lines carry it even when its own tracing is off."""
    parts = (headers or {}).get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1].lower()
    return None


__all__ = ["ENABLED", "SpanKind", "context_from", "end", "event", "headers_for", "setup_tracing", "start",
           "trace_id_from_headers", "trace_id_of"]
