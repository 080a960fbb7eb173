"""The frontend's HTTP connection: uvicorn's httptools protocol, tuned for streamed responses.

Additions to uvicorn's protocol, each for a measured cost (docs/benchmarks.md, stack overhead):

- TCP_NODELAY: without it, Nagle plus delayed ACK add ~40 ms to small streamed writes on
  keep-alive connections.
- A request-header deadline: a client must finish sending a request's headers within
  ``header_timeout`` seconds of connecting (or of starting the next request), else the
  connection is closed. Idle sockets and slowloris clients cannot pin connections forever.
- One socket write per event-loop turn: what a response writes in one turn (the headers and the
  first event, several events, the last event and the end of the stream) leaves in one send().
- A client watch (:class:`ClientWatch`, in ``scope["extensions"]["baton.client"]``): the
  connection tells the request when its client is gone, so the app needs no task per request
  waiting on ``receive()`` for ``http.disconnect``, and whether the whole body has arrived, so a
  body sent with its headers is read without a deadline to keep.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from shared import probe

CLIENT_WATCH = "baton.client"  # the scope extension's name


class ClientWatch:
    """One request's view of its client's connection: :meth:`on_gone` registers what to do
    (cancel the request) when the connection is lost before the response is complete."""

    __slots__ = ("_callback", "body_complete", "gone")

    def __init__(self) -> None:
        self.gone = False
        self.body_complete = False  # the request's whole body has arrived (receive() will not wait)
        self._callback: Callable[[], Any] | None = None

    def on_gone(self, callback: Callable[[], Any] | None) -> None:
        """Call ``callback`` once the client is gone (at once if it already is); None: stop watching."""
        self._callback = callback
        if self.gone and callback is not None:
            self._fire()

    def _fire(self) -> None:
        self.gone = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class _TurnWriter:
    """The connection's transport, with the writes of one event-loop turn joined into one.

    Everything else passes through; ``close`` sends what is pending first."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending:
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BatonHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the additions in this module's docstring."""

    header_timeout: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None
    _watches: list[tuple[RequestResponseCycle, ClientWatch]]

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().connection_made(transport)
        self.transport = _TurnWriter(transport, self.loop)  # type: ignore[assignment]
        self._watches = []
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()
        if probe.on:  # the TTFT probe (shared/probe.py)
            probe.headers_parsed(self.scope)  # type: ignore[arg-type]
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a request (not a websocket upgrade)
            watch = ClientWatch()
            self.scope.setdefault("extensions", {})[CLIENT_WATCH] = watch  # type: ignore[typeddict-item]
            # keep-alive: forget the watches of responses already complete
            self._watches = [(c, w) for c, w in self._watches if not c.response_complete]
            self._watches.append((cycle, watch))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and self._watches and self._watches[-1][0] is cycle:
            self._watches[-1][1].body_complete = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Keep-alive: the next request's headers get the same deadline, counted from now.
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)
        watches, self._watches = getattr(self, "_watches", []), []
        for cycle, watch in watches:
            if not cycle.response_complete:
                watch._fire()


def protocol_with(header_timeout: float) -> type[BatonHttpProtocol]:
    return type("BatonHttpProtocolConfigured", (BatonHttpProtocol,), {"header_timeout": header_timeout})
