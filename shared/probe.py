"""The TTFT probe: per-request timestamps at each hop of the first token's path.

Off unless ``BATON_TTFT_PROBE=<dir>`` is set in a process's environment when it starts (``baton
up`` passes it on to every service). Off, a hook costs one global lookup and one attribute read:
every hook is a single line, ``if probe.on: probe.mark("job_published", request_id)``.

On, each process keeps ``(hop, request id, time)`` records in memory and appends them to
``<dir>/probe-<pid>.tsv`` every :data:`FLUSH_EVERY` records and when it exits. Times are
``time.monotonic()`` (CLOCK_MONOTONIC on Linux), one clock for every process of a host, so hops
that cross processes compare; across hosts they do not. ``bench/ttft_breakdown.py`` joins the
files by request id and prints p50/p90 per hop (``bench/overhead.py --ttft-probe DIR`` per cell).

The hops, in the order a streamed request passes them (:data:`HOPS`):

- frontend: ``http_headers`` (the request's headers parsed), ``app_start`` (the app begins the
  generation: body read, dispatched), ``routed`` (a worker chosen), ``job_published`` (the job
  handed to the NATS client);
- decode worker: ``job_received`` (the NATS client's callback got the job), ``worker_task`` (the
  request's task runs, job decoded), ``engine_submit`` (handed to the engine), ``first_token``
  (the engine's step delivered it), ``worker_flush`` (the batch carrying it handed to the NATS
  client);
- frontend: ``reply_delivered`` (the reply inbox's callback got it), ``first_reply`` (the
  request's generation loop got it), ``first_write`` (the first body write: the first SSE event,
  or the whole response when not streamed).
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ENV = "BATON_TTFT_PROBE"
HOPS = ("http_headers", "app_start", "routed", "job_published", "job_received", "worker_task", "engine_submit",
        "first_token", "worker_flush", "reply_delivered", "first_reply", "first_write")
FLUSH_EVERY = 4096  # records held before a write (a write costs ~1 ms; a record ~0.1 us)
HEADERS_KEY = "baton.probe.http_headers"  # the ASGI scope key the HTTP protocol stamps

now = time.monotonic
_dir = os.environ.get(ENV, "")
on = bool(_dir)
_records: list[tuple[str, str, float]] = []
_arrivals: dict[int, float] = {}  # id(NATS message) -> when its callback ran, until the task decodes it


def mark(hop: str, request_id: str, t: float | None = None) -> None:
    """Record that ``request_id`` passed ``hop`` now (or at ``t``)."""
    _records.append((hop, request_id, now() if t is None else t))
    if len(_records) >= FLUSH_EVERY:
        flush()


def headers_parsed(scope: dict[str, Any]) -> None:
    """The HTTP protocol: this request's headers are parsed (the request id does not exist yet)."""
    scope[HEADERS_KEY] = now()


def app_start(request_id: str, scope: Mapping[str, Any]) -> None:
    """The app starts generating ``request_id``: records its header time too."""
    t = scope.get(HEADERS_KEY)
    if t is not None:
        mark("http_headers", request_id, t)
    mark("app_start", request_id)


def arrived(msg: Any) -> None:
    """A job's NATS callback: stamp the message; :func:`decoded` names the request once decoded."""
    _arrivals[id(msg)] = now()


def decoded(msg: Any, request_id: str) -> None:
    t = _arrivals.pop(id(msg), None)
    if t is not None:
        mark("job_received", request_id, t)
    mark("worker_task", request_id)


def _first_tokens(replies: Iterable[Any], hop: str) -> None:
    t = now()
    for r in replies:
        if getattr(r, "index", -1) == 0 and getattr(r, "token_ids", None):  # a request's first tokens
            mark(hop, r.request_id, t)


def flushing(pending: Mapping[str, list[Any]]) -> None:
    """The worker's reply batcher is about to publish ``pending`` (subject -> replies)."""
    for replies in pending.values():
        _first_tokens(replies, "worker_flush")


def delivered(reply: Any) -> None:
    """The frontend's reply inbox got ``reply`` (a ReplyBatch or one reply)."""
    _first_tokens(getattr(reply, "replies", None) or (reply,), "reply_delivered")


def flush() -> None:
    """Append the records held so far to this process's file."""
    if not _records or not _dir:
        return
    records = _records[:]
    _records.clear()
    path = Path(_dir) / f"probe-{os.getpid()}.tsv"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write(f"# {' '.join(sys.argv)}\n")
            f.write("".join(f"{hop}\t{rid}\t{t:.7f}\n" for hop, rid, t in records))
    except OSError as e:  # a diagnostic must not take the service down
        print(f"{ENV}: cannot write {path}: {e}", file=sys.stderr)


if on:
    atexit.register(flush)
