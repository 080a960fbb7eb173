"""The optional access log: one line per HTTP request (``--access-log``), with its request id.

An ASGI wrapper around the OpenAI app: it sees the response status as it is sent and logs when
the request is done. In JSON format the fields are separate keys (method, path, status,
duration_ms, client, request_id, trace_id); secrets never appear (no headers, no bodies, no
query strings, and shared.redact runs on every line anyway).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shared.telemetry import bind_request, request_id_var, trace_id_var

log = logging.getLogger("baton.access")


class AccessLog:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        bind_request(None)  # a keep-alive connection's previous request must not leak its id
        status = 0
        t0 = time.perf_counter()

        async def send_and_see(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            client = scope.get("client")
            duration_ms = round((time.perf_counter() - t0) * 1e3, 1)
            fields = {"method": scope["method"], "path": scope["path"], "status": status or 499,
                      "duration_ms": duration_ms, "client": f"{client[0]}:{client[1]}" if client else "",
                      "request_id": request_id_var.get(), "trace_id": trace_id_var.get()}
            log.info("%s %s %s %.1fms %s", fields["method"], fields["path"], fields["status"], duration_ms,
                     fields["request_id"] or "-", extra=fields)
