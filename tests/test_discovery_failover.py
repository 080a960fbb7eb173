"""A SIGKILLed decode worker vanishes from discovery within the TTL; traffic goes to the survivors."""

from __future__ import annotations

import time

import anyio
import httpx
import nats
import pytest

from shared.bus import Bus
from shared.discovery import WorkerView
from tests.procs import Stack

pytestmark = pytest.mark.timeout(180)

TTL = 3.0


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import e2e_engine

    s = Stack(tmp_path_factory.mktemp("failover"), e2e_engine(), decode_workers=2, discovery_ttl=TTL)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def live_decode_ids(url: str) -> set[str]:
    async def main() -> set[str]:
        bus = await Bus.connect(url, "test-view", connect_timeout=5)
        try:
            view = WorkerView(bus, TTL)
            async with anyio.create_task_group() as tg:
                tg.start_soon(view.run)
                with anyio.fail_after(5):
                    await view.synced.wait()
                tg.cancel_scope.cancel()
            return {w.worker_id for w in view.workers("decode")}
        finally:
            await bus.close()

    return anyio.run(main)


def test_killed_worker_vanishes_and_traffic_survives(two_workers: Stack) -> None:
    s = two_workers
    before = live_decode_ids(s.nats.url)
    assert len(before) == 2
    victim = s.decoders[0]

    async def watch_for_removal() -> float:
        """Watch the bucket directly: seconds from SIGKILL to the key's removal."""
        nc = await nats.connect(s.nats.url)
        try:
            kv = await nc.jetstream().key_value("baton_workers")
            watcher = await kv.watchall()
            keys = set()
            while (e := await watcher.updates(timeout=5)) is not None:
                keys.add(e.key)
            s.kill(victim)
            t_kill = time.time()
            # Before the TTL passes, the router may still pick the dead worker: the frontend sees
            # "no responders", excludes it and re-routes, so these succeed too.
            async with httpx.AsyncClient(timeout=60) as client:
                for i in range(10):
                    r = await client.post(f"{s.url}/v1/completions",
                                          json={"model": "baton-tiny", "prompt": f"early {i}", "max_tokens": 2})
                    early.append(r.status_code)
            with anyio.fail_after(TTL * 3):
                while True:
                    try:
                        e = await watcher.updates(timeout=TTL * 3)
                    except nats.errors.TimeoutError:
                        continue
                    if e is not None and e.operation in ("DEL", "PURGE"):
                        # The marker's own server timestamp: busy test machinery cannot inflate it.
                        at = e.created.timestamp() if e.created is not None else time.time()
                        return at - t_kill
        finally:
            await nc.close()

    early: list[int] = []
    vanished_after = anyio.run(watch_for_removal)
    print(f"key removed {vanished_after:.2f}s after SIGKILL (TTL {TTL}s)")
    assert early == [200] * 10
    # The key expires TTL after its last refresh, which was at most TTL/3 before the kill.
    assert vanished_after <= TTL + 1.5, vanished_after
    after = live_decode_ids(s.nats.url)
    assert len(after) == 1 and after < before
    s.wait_ready(decode_workers=1, timeout=TTL * 2)
    statuses = []
    for i in range(20):
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": f"req {i}", "max_tokens": 3},
                       timeout=60)
        statuses.append(r.status_code)
    assert statuses == [200] * 20
