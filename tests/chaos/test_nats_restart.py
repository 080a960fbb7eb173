"""Chaos: nats-server restarted under load. Requests in flight fail fast with 503 rather than
hang; every service reconnects by itself; no acknowledged prefill job is lost."""

from __future__ import annotations

import threading
import time
import uuid

import anyio
import httpx
import nats
import pytest

from shared import subjects
from shared.messages import PrefillJob, encode
from tests.conftest import e2e_engine
from tests.procs import Stack, wait_until

pytestmark = pytest.mark.timeout(240)

CHAT = {"model": "baton-tiny", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}


@pytest.fixture()
def stack_with_prefill(tmp_path):
    s = Stack(tmp_path, e2e_engine(), prefill_workers=1, discovery_ttl=3.0)
    try:
        yield s.start()
    finally:
        s.stop()


def test_nats_restart_under_load(stack_with_prefill: Stack) -> None:
    s = stack_with_prefill
    wait_until(lambda: s.health().get("prefill_workers") == 1, 30, 0.1, "prefill worker")
    acked: list[str] = []
    stop_publishing = threading.Event()

    def publish_jobs() -> None:
        """Publish prefill jobs through the outage; remember those JetStream acknowledged."""

        async def main() -> None:
            nc = await nats.connect(s.nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
            js = nc.jetstream()
            try:
                while not stop_publishing.is_set():
                    job = PrefillJob(request_id=uuid.uuid4().hex, token_ids=[1, 2, 3, 4, 5, 6, 7, 8])
                    try:
                        await js.publish(subjects.PREFILL_JOBS, encode(job), timeout=1)
                        acked.append(job.request_id)
                    except Exception:
                        await anyio.sleep(0.1)  # not acknowledged: the server is away
                    await anyio.sleep(0.02)
            finally:
                await nc.close()

        anyio.run(main)

    publisher = threading.Thread(target=publish_jobs)
    publisher.start()
    try:
        assert httpx.post(f"{s.url}/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
        wait_until(lambda: len(acked) >= 20, 30, 0.05, "jobs acknowledged before the restart")

        s.nats.stop()
        # While the server is down, requests fail fast with a clear 503 instead of hanging.
        t0 = time.monotonic()
        r = httpx.post(f"{s.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable"
        assert time.monotonic() - t0 < 3.0

        s.nats.start()
        t_back = time.monotonic()

        def serving() -> bool:
            try:
                return httpx.post(f"{s.url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(serving, 30, 0.2, "stack serving again after the restart")
        recovery = time.monotonic() - t_back
        print(f"served again {recovery:.2f}s after nats-server came back")
        n_before = len(acked)
        wait_until(lambda: len(acked) >= n_before + 10, 30, 0.05, "jobs acknowledged after the restart")
    finally:
        stop_publishing.set()
        publisher.join(30)

    # Every acknowledged job was consumed and acked by the prefill worker: the work queue empties.
    async def queue_drained() -> tuple[int, int]:
        nc = await nats.connect(s.nats.url)
        try:
            js = nc.jetstream()
            with anyio.fail_after(60):
                while True:
                    info = await js.consumer_info(subjects.PREFILL_STREAM, subjects.PREFILL_CONSUMER)
                    stream = await js.stream_info(subjects.PREFILL_STREAM)
                    if stream.state.messages == 0 and info.num_ack_pending == 0:
                        return stream.state.messages, info.delivered.stream_seq
                    await anyio.sleep(0.1)
        finally:
            await nc.close()

    remaining, delivered_seq = anyio.run(queue_drained)
    assert remaining == 0
    assert delivered_seq >= len(acked)  # the consumer got as far as every acknowledged job
    assert all(p.alive() for p in s.procs)  # nothing had to be restarted
