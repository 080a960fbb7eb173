"""A lean HTTP/1.1 load generator for Baton's OpenAI API (keep-alive, streaming aware).

Written on raw asyncio streams so the client costs little CPU next to the stack it measures on
the same small machine (httpx would cost more than the frontend does).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    status: int
    latency: float  # request sent -> response complete
    ttft: float  # request sent -> first body chunk (streaming) or complete response


@dataclass
class RunResult:
    concurrency: int
    stream: bool
    duration: float
    samples: list[Sample] = field(default_factory=list)
    completed: int = 0  # every response, warm-up included: the denominator of CPU per request

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
    return Sample(status, end, ttft or end)


async def run_load(host: str, port: int, path: str, payload: dict, concurrency: int, duration: float,
                   warmup: float = 0.5) -> RunResult:
    """``concurrency`` keep-alive connections, each sending back-to-back for ``duration`` seconds."""
    raw = build_request(host, port, path, payload)
    result = RunResult(concurrency, bool(payload.get("stream")), duration)
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
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

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return result
