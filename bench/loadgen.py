"""A lean HTTP/1.1 load generator for Baton's OpenAI API (keep-alive, streaming aware).

Written on raw asyncio streams so the client costs little CPU next to the stack it measures on
the same small machine (httpx would cost more than the frontend does). Two ways to load:

- closed loop (:func:`run_load`): ``concurrency`` connections, each sending its next request when
  its last one is done; every stack runs at saturation, so latency mostly says where requests queue;
- open loop (:func:`run_open_loop`): requests offered at a fixed rate (Poisson arrivals, or evenly
  spaced), each on a free keep-alive connection from a bounded pool, whether or not earlier ones
  are done; sweeping the rate shows latency below saturation and where saturation begins.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    status: int
    latency: float  # request sent -> response complete
    ttft: float  # request sent -> first body chunk (streaming) or complete response
    sent: float = 0.0  # perf_counter() when the request was written


@dataclass
class RunResult:
    concurrency: int
    stream: bool
    duration: float
    samples: list[Sample] = field(default_factory=list)
    completed: int = 0  # every response, warm-up included: the denominator of CPU per request
    window: tuple[float, float] = (0.0, 0.0)  # the measured part in time.monotonic() (the TTFT probe's clock)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def rps(self) -> float:
        return len(self.ok) / self.duration

    def pct(self, attr: str, q: float) -> float:
        xs = sorted(getattr(s, attr) for s in self.ok)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> dict:
        return {
            "concurrency": self.concurrency,
            "stream": self.stream,
            "requests": len(self.samples),
            "errors": len(self.samples) - len(self.ok),
            "rps": round(self.rps(), 1),
            "p50_ms": round(self.pct("latency", 0.5) * 1e3, 3),
            "p99_ms": round(self.pct("latency", 0.99) * 1e3, 3),
            "ttft_p50_ms": round(self.pct("ttft", 0.5) * 1e3, 3),
            "mean_ms": round(statistics.fmean(s.latency for s in self.ok) * 1e3, 3) if self.ok else None,
        }


class _QuickAckProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol that acknowledges every segment at once (``TCP_QUICKACK``, re-armed on each
    arrival because Linux drops back to delayed ACKs by itself).

    Why: a server that leaves Nagle's algorithm on (no ``TCP_NODELAY``) holds its next small write
    until the last one is acknowledged, and a client that delays its ACKs (Linux: up to 40 ms, on
    keep-alive connections once they look interactive) then stalls every streamed response by that
    much. Dynamo 1.6.1's HTTP frontend is such a server: with delayed ACKs a streamed completion
    takes ~44 ms, with quick ACKs ~1.3 ms. Quick ACKs take that artefact of the client out, so
    every side is measured at its best; ``quick_ack=False`` measures what a client with delayed
    ACKs (most HTTP clients) sees."""

    _sock: Any = None  # the transport's socket (asyncio's TransportSocket wrapper), for setsockopt

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        if self._sock is not None:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        super().data_received(data)


QUICK_ACK_SUPPORTED = hasattr(socket, "TCP_QUICKACK")  # Linux


async def open_connection(host: str, port: int, quick_ack: bool = True
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection``, acknowledging every segment at once when ``quick_ack`` (see
    :class:`_QuickAckProtocol`; where the platform has no ``TCP_QUICKACK`` a plain connection)."""
    if not (quick_ack and QUICK_ACK_SUPPORTED):
        return await asyncio.open_connection(host, port)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    transport, protocol = await loop.create_connection(lambda: _QuickAckProtocol(reader, loop=loop), host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def build_request(host: str, port: int, path: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> Sample:
    t0 = time.perf_counter()
    writer.write(raw)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    length = -1
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
    ttft = 0.0
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if not ttft:
                ttft = time.perf_counter() - t0
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length >= 0:
        await reader.readexactly(length)
    end = time.perf_counter() - t0
    return Sample(status, end, ttft or end, t0)


async def run_load(host: str, port: int, path: str, payload: dict, concurrency: int, duration: float,
                   warmup: float = 0.5, request_timeout: float = 30.0, quick_ack: bool = True) -> RunResult:
    """``concurrency`` keep-alive connections, each sending back-to-back for ``duration`` seconds.

    A response that never comes fails the run with :class:`TimeoutError` ``request_timeout``
    seconds after its end. The bound is on the whole run, not on each request, so the load
    generator spends nothing per request on it."""
    raw = build_request(host, port, path, payload)
    result = RunResult(concurrency, bool(payload.get("stream")), duration)
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration
    result.window = _on_monotonic(t_start, t_end)

    async def client() -> None:
        reader, writer = await open_connection(host, port, quick_ack)
        try:
            while True:
                now = time.perf_counter()
                if now >= t_end:
                    return
                s = await _one(reader, writer, raw)
                result.completed += 1
                if now >= t_start:
                    result.samples.append(s)
        finally:
            writer.close()

    try:
        async with asyncio.timeout(warmup + duration + request_timeout):
            await asyncio.gather(*(client() for _ in range(concurrency)))
    except TimeoutError:
        raise TimeoutError(f"{concurrency} connections to {host}:{port}{path}: a response was still missing "
                           f"{request_timeout:g} s after the run's end") from None
    return result


def _on_monotonic(start: float, end: float) -> tuple[float, float]:
    """A window of perf_counter() times on the time.monotonic() clock (the TTFT probe's), both ends
    moved by one reading of the clocks' offset, so the window keeps its length exactly."""
    offset = time.monotonic() - time.perf_counter()
    return start + offset, end + offset


# --- open loop -----------------------------------------------------------------------------------

ARRIVALS = ("poisson", "uniform")
LATE_S = 0.001  # a request written more than this after its scheduled time counts as late
# asyncio's timers wake up to 1 ms after their time (epoll takes whole milliseconds, rounded up):
# waking half a millisecond before a request is due centres that error on the schedule.
EARLY_S = 0.0005


def arrival_times(rate: float, duration: float, arrivals: str = "poisson", seed: object = 0) -> list[float]:
    """Offsets in seconds from the start of the requests offered at ``rate`` a second for
    ``duration`` seconds: a Poisson process (exponential gaps, seeded, so every side of a
    comparison gets the same schedule) or evenly spaced (``uniform``)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, not {rate}")
    if arrivals == "uniform":
        return [i / rate for i in range(math.ceil(rate * duration))]
    if arrivals != "poisson":
        raise ValueError(f"arrivals must be one of {ARRIVALS}, not {arrivals!r}")
    rng = random.Random(str(seed))  # a str seed: the same sequence in every process
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class OpenSample:
    status: int  # 0: no response (connection error or timeout)
    scheduled: float  # perf_counter() when it was due
    lag: float  # due -> written (waiting for the event loop, a free connection, a connect)
    latency: float = float("nan")  # written -> response complete
    ttft: float = float("nan")  # written -> first body chunk (or the complete response)
    held: bool = False  # it waited for a connection: all max_connections were busy (the server is behind)

    @property
    def done(self) -> float:
        return self.scheduled + self.lag + self.latency


def _ms(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 3) if xs else float("nan")


@dataclass
class OpenRunResult:
    rate: float  # offered, requests a second
    arrivals: str
    stream: bool
    duration: float
    start: float = 0.0  # perf_counter() at the measured window's start
    samples: list[OpenSample] = field(default_factory=list)  # every request, warm-up included
    completed: int = 0  # responses (any status), warm-up and drain included: CPU per request's denominator
    connections: int = 0  # connections opened
    window: tuple[float, float] = (0.0, 0.0)  # the measured window in time.monotonic()

    @property
    def measured(self) -> list[OpenSample]:
        """The requests due inside the measured window (after the warm-up)."""
        end = self.start + self.duration
        return [s for s in self.samples if self.start <= s.scheduled < end]

    def summary(self) -> dict:
        measured = self.measured
        ok = [s for s in measured if s.status == 200]
        end = self.start + self.duration
        # Achieved: responses completed inside the window, whenever sent; at saturation this
        # falls behind the offered rate while the backlog grows.
        achieved = sum(1 for s in self.samples if s.status == 200 and self.start <= s.done < end) / self.duration
        lags = [s.lag for s in measured]
        # Late on the load generator's account: not held for a connection, yet written behind time.
        late = sum(1 for s in measured if s.lag > LATE_S and not s.held)
        return {
            "rate": self.rate, "arrivals": self.arrivals, "stream": self.stream, "requests": len(measured),
            "errors": len(measured) - len(ok), "rps": round(achieved, 1),
            "ttft_p50_ms": _ms([s.ttft for s in ok], 0.5), "ttft_p90_ms": _ms([s.ttft for s in ok], 0.9),
            "p50_ms": _ms([s.latency for s in ok], 0.5), "p90_ms": _ms([s.latency for s in ok], 0.9),
            "p99_ms": _ms([s.latency for s in ok], 0.99),
            "late": late, "held": sum(1 for s in measured if s.held),
            "lag_p50_ms": _ms(lags, 0.5), "lag_p99_ms": _ms(lags, 0.99),
            "connections": self.connections,
        }


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Pool:
    """Idle keep-alive connections: a new one when none is free, at most ``limit`` open; past
    that, a request waits for one to come free (the wait shows in its lag)."""

    def __init__(self, host: str, port: int, limit: int, connect_timeout: float, quick_ack: bool = True) -> None:
        self.host, self.port, self.limit, self.connect_timeout = host, port, limit, connect_timeout
        self.quick_ack = quick_ack
        self.idle: list[Conn] = []
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.open = 0
        self.opened = 0

    async def get(self, sample: OpenSample) -> Conn:
        while True:
            if self.idle:
                return self.idle.pop()
            if self.open < self.limit:
                self.open += 1
                self.opened += 1
                try:
                    return await asyncio.wait_for(open_connection(self.host, self.port, self.quick_ack),
                                                  self.connect_timeout)
                except BaseException:
                    self._closed()
                    raise
            sample.held = True
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def put(self, conn: Conn) -> None:
        self.idle.append(conn)
        self._wake()

    def discard(self, conn: Conn) -> None:
        conn[1].close()
        self._closed()

    def _closed(self) -> None:
        self.open -= 1
        self._wake()  # a waiter may open a new one now

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


# What a request can fail with short of a bug here: counted as an error, its connection dropped.
_REQUEST_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                   IndexError)


async def run_open_loop(host: str, port: int, path: str, payload: dict, rate: float, duration: float,
                        warmup: float = 0.5, arrivals: str = "poisson", seed: object = 0,
                        max_connections: int = 512, request_timeout: float = 30.0,
                        quick_ack: bool = True) -> OpenRunResult:
    """Offer requests at ``rate`` a second for ``warmup + duration`` seconds on the schedule of
    :func:`arrival_times`, then wait for those in flight (each bounded by ``request_timeout``).

    Latency and TTFT count from when a request is written, as in the closed loop; the lag from its
    scheduled time to then is kept apart, so a load generator that falls behind shows as such
    instead of passing for a slow server: ``late`` counts requests written more than
    :data:`LATE_S` behind time on the load generator's account, ``held`` those that waited for a
    connection because all ``max_connections`` were busy (the server fell behind). asyncio's timers wake
    with millisecond granularity (epoll), so requests go out within about half a millisecond either
    side of their time (:data:`EARLY_S`) when the load generator keeps up."""
    raw = build_request(host, port, path, payload)
    result = OpenRunResult(rate, arrivals, bool(payload.get("stream")), duration)
    schedule = arrival_times(rate, warmup + duration, arrivals, seed)
    pool = _Pool(host, port, max_connections, request_timeout, quick_ack)
    t0 = time.perf_counter() + 0.01
    result.start = t0 + warmup
    result.window = _on_monotonic(result.start, result.start + duration)

    async def one(due: float) -> None:
        sample = OpenSample(0, due, 0.0)
        result.samples.append(sample)
        conn = None
        try:
            async with asyncio.timeout(request_timeout):
                conn = await pool.get(sample)
                s = await _one(conn[0], conn[1], raw)
        except _REQUEST_ERRORS:
            sample.lag = time.perf_counter() - due
            if conn is not None:
                pool.discard(conn)
            return
        sample.status, sample.lag, sample.latency, sample.ttft = s.status, s.sent - due, s.latency, s.ttft
        result.completed += 1
        pool.put(conn)

    try:
        async with asyncio.TaskGroup() as tg:
            for offset in schedule:
                due = t0 + offset
                delay = due - EARLY_S - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tg.create_task(one(due))
    finally:
        pool.close()
    result.connections = pool.opened
    return result
