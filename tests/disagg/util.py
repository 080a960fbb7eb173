"""Helpers for disaggregation tests and the benchmark: a Stack whose prefill workers take extra
arguments, direct generate requests over NATS, metric scrapes and block-pool checks."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import msgspec
import nats

from shared import subjects
from shared.messages import (
    GenerateError,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
    generate_reply_decoder,
    load_report_decoder,
    prefill_job_decoder,
)
from tests.procs import ServiceProcess, Stack, running, wait_until


class DisaggStack(Stack):
    """A :class:`Stack` whose prefill workers get ``prefill_args`` (engine limits, speed)."""

    def __init__(self, workdir: Path, engine: str, prefill_args: list[str] | None = None,
                 decode_args: list[list[str]] | None = None, **kw: object) -> None:
        super().__init__(workdir, engine, **kw)  # type: ignore[arg-type]
        self.prefill_args = prefill_args or []
        self.decode_args = decode_args or []  # per decode worker started by start(), in order

    def add_decode(self, extra: list[str] | None = None) -> ServiceProcess:
        i = len(self.decoders)
        per_worker = self.decode_args[i] if i < len(self.decode_args) else []
        return super().add_decode([*(extra or []), *per_worker])

    def add_prefill(self) -> ServiceProcess:
        i = len(self.prefillers)
        p = self._proc("prefill", f"prefill-{i}", [*self.common(), "--engine", self.engine, "--model", self.model,
                                                   *self.prefill_args])
        self.prefillers.append(p)
        return p

    def metrics_text(self, label: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_ports[label]}/metrics", timeout=5).text

    def metric(self, label: str, name: str, **labels: str) -> float:
        """Sum of a metric's samples on one service whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics_text(label).splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if m is None or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def wait_metric(self, label: str, name: str, pred, timeout: float, **labels: str) -> float:  # type: ignore[no-untyped-def]
        wait_until(lambda: pred(self.metric(label, name, **labels)), timeout, 0.1, f"{label} {name}{labels}")
        return self.metric(label, name, **labels)


@dataclass
class Result:
    request_id: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    ttft: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival time of each chunk


async def generate_direct(nc: nats.NATS, worker_id: str, request_id: str, prompt: list[int], sampling: SamplingParams,
                          timeout: float = 60.0, model: str = "") -> Result:
    """One streamed generate request straight to a decode worker (no frontend, no router)."""
    res = Result(request_id)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    t0 = time.perf_counter()
    try:
        req = GenerateRequest(request_id=request_id, token_ids=prompt, sampling=sampling, model=model)
        await nc.publish(subjects.generate(worker_id), msgspec.msgpack.encode(req), reply=inbox)
        with anyio.fail_after(timeout):
            while True:
                msg = await sub.next_msg(timeout=timeout)
                reply = generate_reply_decoder.decode(msg.data)
                if isinstance(reply, GenerateError):
                    res.error = f"{reply.code}: {reply.message}"
                    return res
                assert isinstance(reply, TokenChunk)
                now = time.perf_counter() - t0
                if reply.token_ids:
                    if not res.tokens:
                        res.ttft = now
                    res.token_times.append(now)
                res.tokens += reply.token_ids
                if reply.finish_reason is not None:
                    res.finish_reason = reply.finish_reason
                    return res
    finally:
        await sub.unsubscribe()


async def latest_loads(nc: nats.NATS, worker_ids: list[str], pred, timeout: float) -> dict:  # type: ignore[no-untyped-def]
    """Wait until every worker's latest LoadReport satisfies ``pred``; return those reports."""
    latest: dict = {}
    ok = anyio.Event()

    async def on_load(msg) -> None:  # type: ignore[no-untyped-def]
        r = load_report_decoder.decode(msg.data)
        latest[r.worker_id] = r
        if all(w in latest and pred(latest[w]) for w in worker_ids):
            ok.set()

    sub = await nc.subscribe(subjects.LOAD_ALL, cb=on_load)
    try:
        with anyio.fail_after(timeout):
            await ok.wait()
    except TimeoutError:
        raise AssertionError(f"load reports never satisfied the condition: {latest}") from None
    finally:
        await sub.unsubscribe()
    return latest


async def queued_jobs(nc: nats.NATS) -> list:  # type: ignore[type-arg]
    """Prefill jobs still in the work queue (published, not yet acked)."""
    js = nc.jetstream()
    info = await js.stream_info(subjects.PREFILL_STREAM)
    jobs = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await js.get_msg(subjects.PREFILL_STREAM, seq)
        except Exception:  # acked and deleted meanwhile
            continue
        jobs.append(prefill_job_decoder.decode(raw.data))
    return jobs


@contextmanager
def aggregated_beside_disaggregated(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[DisaggStack]:
    """Torch engine: decode worker ``decode-agg`` (no disaggregation) beside ``decode-dis`` (remote
    prefill from 16 tokens on), one prefill worker chunking at 128 tokens; started, prefill registered."""
    s = DisaggStack(tmp_path, "torch", decode_workers=2, prefill_workers=1, metrics=True,
                    decode_ids=["decode-agg", "decode-dis"], prefill_args=["--max-batched-tokens", "128"],
                    decode_args=[["--no-disagg"], ["--remote-prefill-min-tokens", "16", "--prefill-timeout", "60"]],
                    env=env or {})
    with running(s):
        wait_until(lambda: s.health().get("prefill_workers") == 1, 60, 0.1, "prefill worker registered")
        yield s
