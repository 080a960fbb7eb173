"""Logging, Prometheus metrics and a tiny /metrics + /health endpoint for services without HTTP."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Callable

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import redact

LOG_FORMATS = ("text", "json")

# The request a log line is about, where known: set by whoever handles the request (contextvars,
# so concurrent requests on one event loop each keep their own).
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("baton_request_id", default=None)
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("baton_trace_id", default=None)


def bind_request(request_id: str | None, trace_id: str | None = None) -> None:
    """Tag this task's log lines with ``request_id`` (and ``trace_id`` when tracing is on)."""
    request_id_var.set(request_id)
    trace_id_var.set(trace_id)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, service, pid, logger, message, and request_id /
    trace_id when the line is about a request (from the record's extras or the task's context)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        trace_id = getattr(record, "trace_id", None) or trace_id_var.get()
        if request_id:
            line["request_id"] = request_id
        if trace_id:
            line["trace_id"] = trace_id
        for key in ("method", "path", "status", "duration_ms", "client"):  # access-log fields
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(service: str, level: str = "info", log_format: str = "text") -> None:
    """Log to stderr as text (default) or JSON lines; secrets are masked either way (shared.redact)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; choose one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service}[{os.getpid()}] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    redact.install()
    # nats-py logs every reconnect attempt at error level; our callbacks say it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)


async def serve_metrics(port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> None:
    """Serve ``GET /metrics`` (Prometheus text) and ``GET /health`` (200 when ready, else 503)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with anyio.fail_after(5):
                line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            path = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
            if path.startswith(b"/metrics"):
                status, ctype, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), generate_latest()
            elif path.startswith(b"/health"):
                ok = ready()
                status = b"200 OK" if ok else b"503 Service Unavailable"
                ctype, body = b"application/json", b'{"status":"ready"}' if ok else b'{"status":"not ready"}'
            else:
                status, ctype, body = b"404 Not Found", b"text/plain", b"not found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    try:
        await anyio.sleep_forever()
    finally:
        server.close()
