"""Chaos for disaggregation, with a real nats-server and SIGKILLed workers.

- A prefill worker killed mid-job: its decode worker falls back to local prefill at the deadline;
  every request completes with the right tokens, no block leaks, and a new prefill worker is used.
- A decode worker killed mid-transfer (frozen first, so the transfer is provably stuck half-way):
  the prefill worker fails that job fast, gives its held blocks back and keeps serving; requests
  through the frontend complete on the survivor.

The mocker engine keeps these cheap; its KV pool is real memory, its transfers real bytes, and a
decode worker checks every received block's signature.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import anyio
import httpx
import nats
import pytest

from shared import subjects
from shared.engines import EngineConfig, make_engine
from shared.messages import SamplingParams
from tests.disagg.util import DisaggStack, Result, generate_direct, latest_loads, queued_jobs
from tests.procs import wait_until

pytestmark = pytest.mark.timeout(150)

DECISIONS = "baton_disagg_decisions_total"
SP = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompts(seed: int, n: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 2000) for _ in range(length)] for _ in range(n)]


def reference(ps: list[list[int]]) -> list[list[int]]:
    """What an undisturbed mocker produces for these prompts (its tokens depend on the prompt only)."""

    async def main() -> list[list[int]]:
        eng = make_engine(EngineConfig(engine="mocker", model="baton-tiny", speedup=1e9))
        out: list[list[int]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(eng.run)
            for i, p in enumerate(ps):
                toks: list[int] = []
                async for o in eng.generate(f"ref{i}", p, SP):
                    toks += o.token_ids
                out.append(toks)
            tg.cancel_scope.cancel()
        return out

    return anyio.run(main)


async def warm_remote(s: DisaggStack, nc: nats.NATS, label: str, worker_id: str) -> None:
    """Until the decode worker has seen the prefill worker, its prompts stay local."""
    with anyio.fail_after(60):
        n = 0
        while s.metric(label, DECISIONS, decision="remote") < 1:
            r = await generate_direct(nc, worker_id, f"warm-{worker_id}-{n}", prompts(900 + n, 1, 100)[0], SP)
            assert r.finish_reason == "length", r
            n += 1


async def ack_pending(nc: nats.NATS) -> int:
    info = await nc.jetstream().consumer_info(subjects.PREFILL_STREAM, subjects.PREFILL_CONSUMER)
    return info.num_ack_pending or 0


@pytest.fixture()
def stack_factory(tmp_path):
    made: list[DisaggStack] = []

    def make(**kw: object) -> DisaggStack:
        s = DisaggStack(tmp_path, "mocker", metrics=True, **kw)  # type: ignore[arg-type]
        made.append(s)
        s.start()
        wait_until(lambda: s.health().get("prefill_workers") == 1, 60, 0.1, "prefill worker registered")
        return s

    yield make
    for s in made:
        if any(not p.alive() and p not in s._expected_dead for p in s.procs):
            print(s.logs())
        s.stop()


def test_prefill_worker_killed_mid_job(stack_factory) -> None:
    # Slow prefill (about 0.75 s per 512-token step), so a job is surely under way when killed.
    s = stack_factory(decode_workers=1, prefill_workers=1, decode_ids=["decode-x"],
                      decode_args=[["--remote-prefill-min-tokens", "64", "--prefill-timeout", "4"]],
                      prefill_args=["--mocker-speedup", "0.02"])
    first, later = prompts(1, 4, 400), prompts(2, 2, 300)
    want_first, want_later = reference(first), reference(later)

    async def main() -> None:
        nc = await nats.connect(s.nats.url)
        try:
            await warm_remote(s, nc, "decode-0", "decode-x")
            results: dict[int, Result] = {}

            async def one(i: int, p: list[int], tag: str) -> None:
                results[i] = await generate_direct(nc, "decode-x", f"{tag}-{i}", p, SP, timeout=60)

            async with anyio.create_task_group() as tg:
                for i, p in enumerate(first):
                    tg.start_soon(one, i, p, "first")
                with anyio.fail_after(20):
                    while await ack_pending(nc) < 1:  # a prefill worker has taken a job
                        await anyio.sleep(0.02)
                t_kill = time.monotonic()
                s.kill(s.prefillers[0])
            # Every request completed (locally, once the remote deadline passed), with the right tokens.
            for i, want in enumerate(want_first):
                r = results[i]
                assert r.finish_reason == "length" and r.error is None, r
                assert r.tokens == want, i
            assert time.monotonic() - t_kill < 20
            assert s.metric("decode-0", DECISIONS, decision="fallback_local") >= 1
            await latest_loads(nc, ["decode-x"], lambda r: r.kv_blocks_used == 0 and r.running == 0, 15)

            # A fresh prefill worker takes over: prompts go remote again and still come out right.
            s.add_prefill()
            wait_until(lambda: s.health().get("prefill_workers") == 1 and s.prefillers[1].alive(), 60, 0.1,
                       "replacement prefill worker")
            remote_before = s.metric("decode-0", DECISIONS, decision="remote")
            with anyio.fail_after(60):
                n = 0
                while s.metric("decode-0", DECISIONS, decision="remote") == remote_before:
                    r = await generate_direct(nc, "decode-x", f"probe-{n}", prompts(500 + n, 1, 100)[0], SP)
                    assert r.finish_reason == "length"
                    n += 1
            before = s.metric("decode-0", DECISIONS, decision="remote")
            got = [await generate_direct(nc, "decode-x", f"later-{i}", p, SP) for i, p in enumerate(later)]
            assert [r.tokens for r in got] == want_later
            assert s.metric("decode-0", DECISIONS, decision="remote") - before == len(later)
            await latest_loads(nc, ["decode-x"], lambda r: r.kv_blocks_used == 0, 15)
            s.wait_metric("prefill-1", "baton_prefill_kv_blocks_used", lambda v: v == 0, 10)
        finally:
            await nc.close()

    anyio.run(main)


def test_decode_worker_killed_mid_transfer(stack_factory) -> None:
    # 128 KiB per block per layer and K/V: a 1024-token prompt is a 32 MiB transfer, far beyond
    # socket buffers, so a send to a frozen decode worker stalls half-way.
    s = stack_factory(
        decode_workers=2, prefill_workers=1, decode_ids=["decode-a", "decode-b"], discovery_ttl=6.0,
        env={"BATON_MOCKER_KV_BLOCK_BYTES": str(128 << 10)},
        decode_args=[["--remote-prefill-min-tokens", "64", "--prefill-timeout", "30", "--num-blocks", "160"]] * 2,
        prefill_args=["--mocker-speedup", "0.05", "--num-blocks", "160"],
    )
    victim_ps, survivor_ps = prompts(3, 2, 1024), prompts(4, 2, 1024)
    want_survivor = reference(survivor_ps)
    http_done: list[dict] = []

    def http_request(i: int) -> None:
        body = {"model": "baton-tiny", "prompt": f"story {i} " + "relay " * 600, "max_tokens": 12,
                "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=90)
        http_done.append({"status": r.status_code, **(r.json() if r.status_code == 200 else {"body": r.text})})

    async def main() -> None:
        nc = await nats.connect(s.nats.url)
        try:
            await warm_remote(s, nc, "decode-0", "decode-a")
            await warm_remote(s, nc, "decode-1", "decode-b")
            http = [threading.Thread(target=http_request, args=(i,)) for i in range(2)]
            results: dict[str, Result] = {}

            async def one(worker: str, i: int, p: list[int]) -> None:
                results[f"{worker}-{i}"] = await generate_direct(nc, worker, f"{worker}-{i}", p, SP, timeout=60)

            async with anyio.create_task_group() as tg:
                for i, p in enumerate(survivor_ps):
                    tg.start_soon(one, "decode-b", i, p)
                with anyio.CancelScope() as victims:
                    async with anyio.create_task_group() as vtg:
                        for i, p in enumerate(victim_ps):
                            vtg.start_soon(one, "decode-a", i, p)
                        for t in http:
                            t.start()
                        # The victim's jobs are queued (being prefilled): freeze it, so its
                        # transfers stall half-way, then kill it while one is stuck.
                        with anyio.fail_after(20):
                            while not any(j.decode_worker_id == "decode-a" for j in await queued_jobs(nc)):
                                await anyio.sleep(0.02)
                        os.kill(s.decoders[0].pid, signal.SIGSTOP)
                        with anyio.fail_after(20):
                            stuck_since = None
                            while True:
                                busy = s.metric("prefill-0", "baton_prefill_kv_sends_in_flight") >= 1
                                stuck_since = (stuck_since or time.monotonic()) if busy else None
                                if stuck_since and time.monotonic() - stuck_since > 1.0:
                                    break
                                await anyio.sleep(0.05)
                        s.kill(s.decoders[0])
                        victims.cancel()  # their client (this test) gives up; the frontend's would migrate
            # The prefill worker failed the stuck job fast and gave its held blocks back.
            s.wait_metric("prefill-0", "baton_prefill_jobs_total", lambda v: v >= 1, 15, outcome="failed")
            s.wait_metric("prefill-0", "baton_prefill_kv_sends_in_flight", lambda v: v == 0, 15)
            # The survivor's requests are unharmed (and its received blocks checked out).
            for i, want in enumerate(want_survivor):
                r = results[f"decode-b-{i}"]
                assert r.finish_reason == "length" and r.error is None, r
                assert r.tokens == want
            # Requests through the frontend finish, on the survivor if they were on the victim.
            for t in http:
                await anyio.to_thread.run_sync(t.join, 90)
            assert len(http_done) == 2
            for d in http_done:
                assert d["status"] == 200, d
                assert d["choices"][0]["finish_reason"] == "length"
                assert d["usage"]["completion_tokens"] == 12
            # The prefill worker still serves, and every surviving pool is whole.
            before = s.metric("decode-1", DECISIONS, decision="remote")
            r = await generate_direct(nc, "decode-b", "after", prompts(5, 1, 200)[0], SP)
            assert r.finish_reason == "length" and s.metric("decode-1", DECISIONS, decision="remote") == before + 1
            await latest_loads(nc, ["decode-b"], lambda r: r.kv_blocks_used == 0 and r.running == 0, 15)
            s.wait_metric("prefill-0", "baton_prefill_kv_blocks_used", lambda v: v == 0, 15)
            assert s.prefillers[0].alive()
        finally:
            await nc.close()

    anyio.run(main)
