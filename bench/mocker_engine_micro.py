"""The mocker engine's own CPU per request, and the decode worker's around it, in one process: no bus.

    python bench/mocker_engine_micro.py [--concurrency 1 64] [--requests 4000] [--prompt 12] [--max-tokens 16]
        [--mode stream listen worker-stream worker-whole] [--repeats 5]

Each of ``concurrency`` clients sends requests back to back to one ``MockerEngine`` at speedup
1e9 (a step costs nothing simulated), ``max_tokens`` tokens each (ignore_eos), prompts of
``prompt`` distinct-per-request token ids. ``stream``: every output goes through the request's
stream (the non-streamed/`n > 1` path of the decode worker); ``listen``: outputs but the last are
taken by a listener on the step (the decode worker's streamed, batched path). ``worker-stream`` /
``worker-whole``: a real ``DecodeWorker`` (disaggregation on, as ``baton up`` runs it) serves each
request from its encoded GenerateRequest, streamed into batched replies or not streamed, onto a
bus stand-in that encodes each message and drops it. Run with ``PYTHONPATH`` at the tree to measure
(this file takes the engine and worker from there, so one copy measures any tree). Reports CPU
microseconds per request (process time) and per token, median and min-max over the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable

import anyio
import uvloop

from services.decode.disagg import DisaggSettings, RemotePrefill
from services.decode.worker import DecodeSettings, DecodeWorker
from shared.bus import ReplyBatcher
from shared.engines.base import EngineConfig, EngineOutput
from shared.engines.mocker import MockerEngine
from shared.messages import GenerateRequest, ReplyBatch, SamplingParams, TokenChunk, encode
from shared.runtime import settle_heap

_IDS = itertools.count()


async def client(engine: MockerEngine, n: int, prompt: int, sp: SamplingParams, mode: str) -> int:
    tokens = 0
    for _ in range(n):
        i = next(_IDS)
        rid = f"r{i}"
        ids = [(i * 7 + k) % 1000 + 1 for k in range(prompt)]
        taken: list[int] = []
        if mode == "listen":
            def on_output(out: EngineOutput, taken: list[int] = taken) -> bool:
                if out.finish_reason is not None or out.error:
                    return False
                taken.extend(out.token_ids)
                return True
            engine.listen(rid, on_output)
        async for out in engine.generate(rid, ids, sp):
            tokens += len(out.token_ids)
        engine.listen(rid, None)
        tokens += len(taken)
    return tokens


class _Msg:
    __slots__ = ("data", "headers", "reply")

    def __init__(self, data: bytes, reply: str) -> None:
        self.data, self.reply, self.headers = data, reply, None


class _Bus:
    """Encodes what the worker publishes (as the real bus does) and wakes the waiting client."""

    def __init__(self) -> None:
        self.done: dict[str, asyncio.Future[int]] = {}
        self.tokens: dict[str, int] = {}

    async def publish(self, subject: str, msg: object, reply: str = "", headers: object = None) -> None:
        encode(msg)
        for r in msg.replies if isinstance(msg, ReplyBatch) else [msg]:
            assert isinstance(r, TokenChunk), r
            self.tokens[r.request_id] = self.tokens.get(r.request_id, 0) + len(r.token_ids)
            if r.finish_reason is not None:
                self.done.pop(r.request_id).set_result(self.tokens.pop(r.request_id))

    def write_now(self) -> None:
        """Nothing is buffered here: publish has already taken the message."""


async def worker_client(worker: DecodeWorker, bus: _Bus, n: int, prompt: int, sp: SamplingParams,
                        stream: bool) -> int:
    tokens = 0
    loop = asyncio.get_running_loop()
    for _ in range(n):
        i = next(_IDS)
        rid = f"r{i}"
        ids = [(i * 7 + k) % 1000 + 1 for k in range(prompt)]
        req = GenerateRequest(request_id=rid, token_ids=ids, sampling=sp, stream=stream,
                              batch_reply="batch" if stream else "")
        done = bus.done[rid] = loop.create_future()
        worker._on_generate(_Msg(encode(req), "reply"))  # type: ignore[arg-type]
        tokens += await done
    return tokens


async def worker_run(concurrency: int, requests: int, prompt: int, max_tokens: int, stream: bool) -> tuple[float, int]:
    engine = MockerEngine(EngineConfig(engine="mocker", model="baton-tiny", speedup=1e9))
    worker = DecodeWorker(DecodeSettings(engine=engine.config, disagg=DisaggSettings()), engine)
    bus = _Bus()
    worker.bus = bus  # type: ignore[assignment]
    worker.replies = ReplyBatcher(bus)  # type: ignore[arg-type]
    worker.remote = RemotePrefill(bus, engine, None, None, worker.worker_id, worker.settings.disagg)  # type: ignore[arg-type]
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    per = max(1, requests // concurrency)
    async with anyio.create_task_group() as tg:
        worker._tg = tg
        tg.start_soon(engine.run)
        tg.start_soon(worker.replies.run)
        await worker_client(worker, bus, 20, prompt, sp, stream)  # warm up
        cpu, tokens = await cpu_of_clients(concurrency, lambda: worker_client(worker, bus, per, prompt, sp, stream))
        tg.cancel_scope.cancel()
    n = per * concurrency
    assert tokens == n * max_tokens, (tokens, n * max_tokens)
    return cpu, n


async def cpu_of_clients(concurrency: int, one: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    """This process's CPU seconds while ``concurrency`` clients each run ``one``, and their tokens."""
    totals: list[int] = []
    c0 = time.process_time()

    async def run_client() -> None:
        totals.append(await one())

    async with anyio.create_task_group() as clients:
        for _ in range(concurrency):
            clients.start_soon(run_client)
    return time.process_time() - c0, sum(totals)


async def one_run(concurrency: int, requests: int, prompt: int, max_tokens: int, mode: str) -> tuple[float, int]:
    engine = MockerEngine(EngineConfig(engine="mocker", model="baton-tiny", speedup=1e9))
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    per = max(1, requests // concurrency)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.wait_ready()
        await client(engine, 20, prompt, sp, mode)  # warm up
        cpu, tokens = await cpu_of_clients(concurrency, lambda: client(engine, per, prompt, sp, mode))
        tg.cancel_scope.cancel()
    n = per * concurrency
    assert tokens == n * max_tokens, (tokens, n * max_tokens)
    return cpu, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--prompt", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--mode", nargs="+", default=["stream", "listen", "worker-stream", "worker-whole"],
                    choices=["stream", "listen", "worker-stream", "worker-whole"])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    settle_heap()
    for mode in a.mode:
        for c in a.concurrency:
            per_req = []
            for _ in range(a.repeats):
                if mode.startswith("worker"):
                    run = worker_run(c, a.requests, a.prompt, a.max_tokens, mode == "worker-stream")
                else:
                    run = one_run(c, a.requests, a.prompt, a.max_tokens, mode)
                cpu, n = uvloop.run(run)  # as the services run: uvloop, heap settled
                per_req.append(cpu / n * 1e6)
            med = statistics.median(per_req)
            print(f"{mode:13s} c={c:<3d} CPU/request {med:7.1f} us (min {min(per_req):.1f}, max {max(per_req):.1f})"
                  f"  per token {med / a.max_tokens:6.2f} us  [{a.repeats} repeats x {n} requests]", flush=True)


if __name__ == "__main__":
    main()
