"""Logging, Prometheus metrics and a tiny /metrics + /health endpoint for services without HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import redact


def setup_logging(service: str, level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s {service}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
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
