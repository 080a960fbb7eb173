"""Scale-down never drops work: the local connector stops the chosen decode worker while it streams a
request; the worker deregisters at once, refuses new work, finishes the request, and exits 0."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from baton.nats_server import EmbeddedNats
from services.planner.connectors import LocalProcessConnector, LocalWorkerSettings
from shared.bus import Bus
from shared.discovery import WorkerView
from shared.engines import EngineConfig
from shared.messages import (
    GenerateError,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
    generate_reply_decoder,
)

pytestmark = pytest.mark.timeout(90)


def test_scale_down_drains_the_chosen_worker(tmp_path: Path) -> None:
    server = EmbeddedNats(data_dir=tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()
    # Slow mocker: 60 tokens take about 1.2 s.
    conn = LocalProcessConnector(LocalWorkerSettings(
        nats_url=server.url, engine=EngineConfig(engine="mocker", speedup=0.25), discovery_ttl=3,
        log_dir=str(tmp_path / "logs"),
        stop_timeout=30))

    async def main() -> None:
        bus = await Bus.connect(server.url, "test")
        view = WorkerView(bus, 3)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(view.run)
                await conn.start({"decode": 2, "prefill": 0})
                with anyio.fail_after(30):
                    await view.wait_for("decode", 2)
                victim, other = view.workers("decode")
                inbox = bus.inbox.open("r1")
                req = GenerateRequest(request_id="r1", token_ids=list(range(20, 60)), model="baton-tiny",
                                      sampling=SamplingParams(max_tokens=60, ignore_eos=True))
                await bus.publish(victim.generate_subject, req, reply=inbox.subject)
                first = generate_reply_decoder.decode((await inbox.next(10)).data)
                assert isinstance(first, TokenChunk) and first.finish_reason is None
                await conn.scale("decode", 1, [victim, other])  # mid-stream
                tokens = len(first.token_ids)
                gone_while_streaming = False
                while True:
                    reply = generate_reply_decoder.decode((await inbox.next(10)).data)
                    assert isinstance(reply, TokenChunk), reply
                    tokens += len(reply.token_ids)
                    if view.get(victim.worker_id) is None and reply.finish_reason is None:
                        gone_while_streaming = True  # deregistered, still serving what it holds
                    if reply.finish_reason is not None:
                        break
                assert reply.finish_reason == "length" and tokens == 60
                assert gone_while_streaming
                bus.inbox.close("r1")
                with anyio.fail_after(20):
                    while conn.stopping("decode"):
                        await conn.reconcile()
                        await anyio.sleep(0.1)
                assert [w.worker_id for w in conn.active("decode")] == [other.worker_id]
                assert [w.worker_id for w in view.workers("decode")] == [other.worker_id]
                tg.cancel_scope.cancel()
        finally:
            await conn.close(timeout=10)
            await bus.close()

    try:
        anyio.run(main)
        log = next((tmp_path / "logs").glob("decode-*.log")).parent
        texts = {p.name: p.read_text() for p in log.glob("decode-*.log")}
        drained = [t for t in texts.values() if "received SIGTERM: draining" in t]
        assert len(drained) == 2  # the victim mid-stream, the other at close()
    finally:
        server.cleanup()


def test_draining_worker_refuses_new_work_with_503(tmp_path: Path) -> None:
    """What a router that still held the old fleet would hit: a 503 the frontend retries elsewhere."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()
    conn = LocalProcessConnector(LocalWorkerSettings(nats_url=server.url,
                                                     engine=EngineConfig(engine="mocker", speedup=0.25),
                                                     discovery_ttl=3, stop_timeout=30))

    async def main() -> None:
        bus = await Bus.connect(server.url, "test")
        view = WorkerView(bus, 3)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(view.run)
                await conn.start({"decode": 1, "prefill": 0})
                with anyio.fail_after(30):
                    await view.wait_for("decode", 1)
                (w,) = view.workers("decode")
                busy = bus.inbox.open("long")
                await bus.publish(w.generate_subject, GenerateRequest(
                    request_id="long", token_ids=[30, 31, 32], sampling=SamplingParams(max_tokens=80, ignore_eos=True)),
                    reply=busy.subject)
                await busy.next(10)
                await conn.scale("decode", 0, [w])
                await anyio.sleep(0.3)
                late = bus.inbox.open("late")
                await bus.publish(w.generate_subject, GenerateRequest(request_id="late", token_ids=[1, 2, 3]),
                                  reply=late.subject)
                reply = generate_reply_decoder.decode((await late.next(5)).data)
                assert isinstance(reply, GenerateError) and reply.code == 503
                while True:  # the held request still completes
                    r = generate_reply_decoder.decode((await busy.next(10)).data)
                    if isinstance(r, TokenChunk) and r.finish_reason is not None:
                        assert r.finish_reason == "length"
                        break
                tg.cancel_scope.cancel()
        finally:
            await conn.close(timeout=10)
            await bus.close()

    try:
        anyio.run(main)
    finally:
        server.cleanup()
