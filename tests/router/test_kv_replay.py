"""Routers in this process against a real nats-server, fed by fake workers' KV events.

A router started late, a second replica and a router started from a snapshot all reach the same
index as one that watched from the start; a sequence gap asks the worker to resync; a worker
whose discovery key goes away is dropped; route requests follow the cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from baton.nats_server import EmbeddedNats
from services.router.service import Router, RouterSettings
from shared.bus import Bus
from shared.discovery import WorkerRegistration
from shared.kv_hash import block_hashes
from shared.messages import (
    KvEventBatch,
    KvStored,
    RouteDecision,
    RouteRequest,
    WorkerInfo,
    route_reply_decoder,
)
from shared.routing.kv_policy import KvRouter
from shared.subjects import ROUTE, cancel, generate, kv_events, kv_resync

pytestmark = pytest.mark.timeout(120)

TTL = 2.0
BLOCK = 16


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory):
    d: Path = tmp_path_factory.mktemp("kvnats")
    server = EmbeddedNats(data_dir=d / "js", log_file=d / "nats.log").start()
    yield server.url
    server.cleanup()


def prompt(seed: int, blocks: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 2000 for i in range(blocks * BLOCK)]


class FakeWorker:
    """Registers in discovery and publishes KV event batches with its own sequence numbers."""

    def __init__(self, bus: Bus, worker_id: str) -> None:
        self.bus = bus
        self.worker_id = worker_id
        self.seq = 0
        self.info = WorkerInfo(worker_id=worker_id, role="decode", model="m", generate_subject=generate(worker_id),
                               cancel_subject=cancel(worker_id), block_size=BLOCK)
        self.reg = WorkerRegistration(bus, self.info, TTL)

    async def publish(self, stored: list[list[int]] = (), removed: list[int] = (), skip: int = 0,
                      cleared: bool = False) -> None:
        self.seq += 1 + skip
        await self.bus.publish(kv_events(self.worker_id), KvEventBatch(
            worker_id=self.worker_id, seq=self.seq, stored=[KvStored(block_hashes=h) for h in stored],
            removed=list(removed), cleared=cleared))


@asynccontextmanager
async def running_router(url: str, **kw) -> AsyncIterator[Router]:
    settings = RouterSettings(nats_url=url, mode="kv", discovery_ttl=TTL, snapshot_interval=0, seed=1, **kw)
    router = Router(settings)
    async with anyio.create_task_group() as tg:
        tg.start_soon(router.run)
        with anyio.fail_after(20):
            await router.started.wait()
        try:
            yield router
        finally:
            router._stop.set()


def index_state(router: Router) -> dict[str, set[int]]:
    assert isinstance(router.policy, KvRouter)
    idx = router.policy.index
    return {w: idx.worker_blocks(w) for w in idx.worker_ids if idx.block_count(w)}


async def wait_for(pred, limit_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` (state changed by NATS callbacks) until true; fail after ``limit_s``."""
    with anyio.fail_after(limit_s):
        while True:
            if pred():
                return
            await anyio.sleep(0.02)


async def route(bus: Bus, tokens: list[int]) -> RouteDecision:
    msg = await bus.request(ROUTE, RouteRequest(request_id="r", model="m", token_ids=tokens), timeout=5)
    reply = route_reply_decoder.decode(msg.data)
    assert isinstance(reply, RouteDecision), reply
    return reply


def test_replicas_restarts_and_snapshots_agree(nats_url: str) -> None:
    async def main() -> None:
        bus = await Bus.connect(nats_url, "test-workers")
        workers = [FakeWorker(bus, f"decode-w{i}") for i in range(3)]
        async with anyio.create_task_group() as tg:
            for w in workers:
                await w.reg.register()
                tg.start_soon(w.reg.run)
            p = [prompt(i, 12) for i in range(3)]
            h = [block_hashes(x, BLOCK) for x in p]
            async with running_router(nats_url) as first:
                # Events before and after the first router: it sees them all from the stream.
                await workers[0].publish(stored=[h[0][:6], h[0][6:]])
                await workers[1].publish(stored=[h[1]])
                await workers[2].publish(stored=[h[2][:4]])
                await workers[1].publish(removed=h[1][8:])
                expected = {"decode-w0": set(h[0]), "decode-w1": set(h[1][:8]), "decode-w2": set(h[2][:4])}
                await wait_for(lambda: index_state(first) == expected, what="first router's index")

                # Route by cache: each long prefix goes where it is cached.
                for i, blocks in enumerate((12, 8, 4)):
                    d = await route(bus, p[i] + [5] * 20)
                    assert d.worker_id == f"decode-w{i}" and d.overlap_blocks == blocks, d

                # A second replica, started now, replays the stream to the same index.
                async with running_router(nats_url) as second:
                    assert index_state(second) == expected
                    await workers[2].publish(stored=[h[2][4:]], removed=h[2][:1])
                    expected["decode-w2"] = set(h[2][1:])
                    await wait_for(lambda: index_state(first) == expected == index_state(second))

                # Snapshot, more events, then a router that starts from the snapshot plus the tail.
                assert first.feed is not None and await first.feed.save_snapshot()
                snap_seq = first.feed.applied_stream_seq
                await workers[0].publish(removed=h[0][10:])
                expected["decode-w0"] = set(h[0][:10])
                await wait_for(lambda: index_state(first) == expected)
                async with running_router(nats_url) as third:
                    assert third.feed is not None and third.feed.resumed_from_snapshot == snap_seq
                    assert index_state(third) == expected

                # A sequence gap: the worker's blocks are dropped and it is asked to resync.
                asked = anyio.Event()

                async def on_resync(msg) -> None:
                    asked.set()

                await bus.subscribe(kv_resync("decode-w1"), on_resync)
                await workers[1].publish(stored=[h[1][8:9]], skip=3)
                expected["decode-w1"] = {h[1][8]}
                await wait_for(lambda: index_state(first) == expected)
                with anyio.fail_after(5):
                    await asked.wait()
                # The worker answers with a cleared batch listing its whole cache: exact again.
                await workers[1].publish(stored=[h[1]], cleared=True)
                expected["decode-w1"] = set(h[1])
                await wait_for(lambda: index_state(first) == expected)
                assert "decode-w1" not in first.policy.index.needs_resync  # type: ignore[attr-defined]

                # A worker that leaves discovery is dropped from the index.
                await workers[2].reg.withdraw()
                await wait_for(lambda: "decode-w2" not in index_state(first), limit_s=8, what="w2 dropped")
            tg.cancel_scope.cancel()
        await bus.close()

    anyio.run(main)
