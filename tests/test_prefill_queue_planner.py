"""The prefill work queue and the planner, with real processes: jobs are consumed, acked once,
announced; the planner sees the backlog and the fleet."""

from __future__ import annotations

import time
import uuid

import anyio
import msgspec
import nats
import pytest

from shared import subjects
from shared.messages import (
    PlannerObservation,
    PrefillDone,
    PrefillFailed,
    PrefillJob,
    encode,
    planner_observation_decoder,
    prefill_reply_decoder,
)
from tests.procs import Stack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pstack(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import e2e_engine

    s = Stack(tmp_path_factory.mktemp("prefill"), e2e_engine(), prefill_workers=1, planner=True, discovery_ttl=3.0)
    try:
        s.start()
        yield s
    finally:
        s.stop()


async def stream_messages(js) -> int:
    info = await js.stream_info(subjects.PREFILL_STREAM)
    return info.state.messages


async def run_jobs(url: str, jobs: list[PrefillJob]) -> dict[str, PrefillDone | PrefillFailed]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    results: dict[str, PrefillDone | PrefillFailed] = {}
    done = anyio.Event()

    async def on_done(msg) -> None:
        r = prefill_reply_decoder.decode(msg.data)
        results[r.request_id] = r
        if len(results) == len(jobs):
            done.set()

    sub = await nc.subscribe(subjects.prefill_done("*"), cb=on_done)
    try:
        for job in jobs:
            ack = await js.publish(subjects.PREFILL_JOBS, encode(job), timeout=5)
            assert ack.stream == subjects.PREFILL_STREAM
        with anyio.fail_after(60):
            await done.wait()
        return results
    finally:
        await sub.unsubscribe()
        await nc.close()


def wait_prefill_registered(s: Stack) -> None:
    from tests.procs import wait_until

    wait_until(lambda: s.health().get("prefill_workers") == 1, 30, 0.1, "prefill worker registered")


def test_prefill_jobs_consumed_acked_and_announced(pstack: Stack) -> None:
    wait_prefill_registered(pstack)
    jobs = [PrefillJob(request_id=uuid.uuid4().hex, token_ids=list(range(1, 40 + i)), decode_worker_id="test")
            for i in range(4)]
    late = PrefillJob(request_id=uuid.uuid4().hex, token_ids=[1, 2, 3], deadline=time.time() - 1)
    results = anyio.run(run_jobs, pstack.nats.url, [*jobs, late])
    for job in jobs:
        r = results[job.request_id]
        assert isinstance(r, PrefillDone), r
        assert r.num_tokens == len(job.token_ids)
        assert r.prefill_worker_id.startswith("prefill-")
    assert isinstance(results[late.request_id], PrefillFailed)

    async def queue_empty() -> int:
        nc = await nats.connect(pstack.nats.url)
        try:
            js = nc.jetstream()
            with anyio.fail_after(10):
                while (n := await stream_messages(js)) != 0:  # acked work-queue messages are deleted
                    await anyio.sleep(0.05)
            return n
        finally:
            await nc.close()

    assert anyio.run(queue_empty) == 0


def test_planner_sees_backlog_then_drain(pstack: Stack) -> None:
    """Kill the only prefill worker, queue jobs: the planner reports them pending; a new worker drains them."""
    wait_prefill_registered(pstack)
    pstack.kill(pstack.prefillers[0])
    jobs = [PrefillJob(request_id=uuid.uuid4().hex, token_ids=[3, 4, 5, 6, 7]) for _ in range(5)]

    async def main() -> tuple[PlannerObservation, dict]:
        nc = await nats.connect(pstack.nats.url)
        js = nc.jetstream()
        observations: list[PlannerObservation] = []
        results: dict = {}
        all_done = anyio.Event()

        async def on_observation(msg) -> None:
            observations.append(planner_observation_decoder.decode(msg.data))

        async def on_done(msg) -> None:
            r = prefill_reply_decoder.decode(msg.data)
            results[r.request_id] = r
            if all(j.request_id in results for j in jobs):
                all_done.set()

        await nc.subscribe(subjects.PLANNER_OBSERVATIONS, cb=on_observation)
        await nc.subscribe(subjects.prefill_done("*"), cb=on_done)
        try:
            for job in jobs:
                await js.publish(subjects.PREFILL_JOBS, encode(job), timeout=5)
            with anyio.fail_after(30):
                while not any(o.prefill_pending >= 5 and o.prefill_workers == 0 for o in observations):
                    await anyio.sleep(0.05)
            backlog = next(o for o in observations if o.prefill_pending >= 5)
            assert not results  # nobody consumed them while no prefill worker was alive
            pstack.add_prefill()  # a fresh worker drains the queue
            with anyio.fail_after(90):
                await all_done.wait()
            return backlog, results
        finally:
            await nc.close()

    backlog, results = anyio.run(main)
    assert backlog.decode_workers == 1
    assert backlog.prefill_pending == 5
    assert all(isinstance(results[j.request_id], PrefillDone) for j in jobs)


def test_messages_are_msgspec() -> None:
    # Every prefill message round-trips through msgpack as the tagged union receivers use.
    for m in (PrefillDone(request_id="a", prefill_worker_id="p"), PrefillFailed(request_id="a", prefill_worker_id="p", reason="r")):
        assert prefill_reply_decoder.decode(msgspec.msgpack.encode(m)) == m
