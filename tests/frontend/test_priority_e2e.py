"""Priorities and fairness end to end: nats-server, router, mocker workers (a simulated cost per
engine step, so saturation is cheap) and a frontend, all real processes.

- a priority outside the allowed range is a 400 naming ``priority`` (body, header, NATS);
- a key over its tokens a minute gets OpenAI's 429 naming the limit;
- under saturation, a high-priority stream's TTFT p90 stays within 2x of the idle system's while
  low-priority traffic fills the rest of the fleet;
- two tenants with equal weights get throughput within 10% of each other while one keeps 10x as
  many requests outstanding;
- ``x-session-id`` keeps a conversation on one worker, and moves it when that worker dies.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import msgspec
import nats
import pytest

from shared import subjects
from shared.messages import (
    ApiChunk,
    ApiError,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
    encode,
    generate_reply_decoder,
)
from shared.subjects import API_GENERATE
from tests.procs import Stack, running

pytestmark = pytest.mark.timeout(240)

MODEL = "baton-tiny"
# Of 4 slots at the workers, 1 is kept for priorities below 0: low-priority traffic fills 3.
ADMISSION = ["--admission-max-running", "4", "--admission-reserved", "1", "--admission-queue-timeout", "60",
             "--priority-min", "-10", "--priority-max", "10"]
# The mocker's simulated cost per engine step: 5 ms + 0.1 ms per running sequence, divided by this.
MOCKER = ["--mocker-speedup", "5"]
KEYS = "sk-a\nsk-b\nsk-tpm tpm=300 name=metered\nsk-hi\nsk-lo\n"


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    tmp: Path = tmp_path_factory.mktemp("priority")
    keys = tmp / "keys.txt"
    keys.write_text(KEYS)
    s = Stack(tmp, "mocker", extra_decode_args=MOCKER)
    s.frontend_extra = ["--api-keys-file", str(keys), *ADMISSION]
    with running(s):
        yield s


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **headers}


def completion(priority: int | None = None, max_tokens: int = 4, stream: bool = False) -> dict:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens, "stream": stream}
    if priority is not None:
        body["priority"] = priority
    return body


# --- bad input -------------------------------------------------------------------------------------


def test_priority_out_of_range_is_a_400_naming_priority(fleet: Stack) -> None:
    url = f"{fleet.url}/v1/completions"
    cases = [
        (completion(priority=11), auth("sk-a")),
        (completion(), auth("sk-a", **{"x-baton-priority": "-11"})),
        (completion(), auth("sk-a", **{"x-baton-priority": "urgent"})),
    ]
    for body, headers in cases:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "priority" and err["type"] == "invalid_request_error", err
    # in range: body and header both accepted; the body wins over the header
    ok = httpx.post(url, json=completion(priority=-10), headers=auth("sk-a", **{"x-baton-priority": "99"}), timeout=30)
    assert ok.status_code == 200, ok.text
    chat = httpx.post(f"{fleet.url}/v1/chat/completions", headers=auth("sk-a"), timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                            "priority": 10})
    assert chat.status_code == 200, chat.text
    bad_type = httpx.post(url, json={**completion(), "priority": 1.5}, headers=auth("sk-a"), timeout=30)
    assert bad_type.status_code == 400 and "priority" in bad_type.text

    async def over_nats() -> tuple[ApiError | object, ApiError | object]:
        nc = await nats.connect(fleet.nats.url)
        try:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": False}
            out = []
            for payload, headers in ((dict(body, priority=50), None), (body, {"x-baton-priority": "-50"})):
                msg = await nc.request(API_GENERATE, json.dumps(payload).encode(), timeout=30,
                                       headers={"Authorization": "Bearer sk-a", **(headers or {})})
                out.append(msgspec.json.decode(msg.data, type=ApiChunk | ApiError))
            return out[0], out[1]
        finally:
            await nc.close()

    for reply in anyio.run(over_nats):
        assert isinstance(reply, ApiError) and reply.code == 400 and "priority" in reply.message, reply


def test_tokens_per_minute_limit_is_a_429_naming_it(fleet: Stack) -> None:
    url = f"{fleet.url}/v1/completions"
    # 300 tokens a minute: two answers of 200 tokens run the budget dry (the second into debt)
    for _ in range(2):
        r = httpx.post(url, json=completion(max_tokens=200), headers=auth("sk-tpm"), timeout=60)
        assert r.status_code == 200, r.text
    refused = httpx.post(url, json=completion(max_tokens=2), headers=auth("sk-tpm"), timeout=30)
    assert refused.status_code == 429, refused.text
    err = refused.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "tokens per min (TPM)" in err["message"]
    assert "Limit 300" in err["message"]
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-limit-tokens"] == "300"
    # another key is not charged for it
    assert httpx.post(url, json=completion(), headers=auth("sk-a"), timeout=30).status_code == 200


# --- saturation --------------------------------------------------------------------------------------


@dataclass
class Load:
    """Closed-loop clients: each sends its next request as soon as the last one ends."""

    done: list[tuple[str, float]] = field(default_factory=list)  # (tenant key, finished at)
    errors: list[str] = field(default_factory=list)


async def closed_loop(client: httpx.AsyncClient, url: str, key: str, body: dict, load: Load) -> None:
    while True:
        r = await client.post(url, json=body, headers=auth(key))
        if r.status_code == 200:
            load.done.append((key, time.monotonic()))
        else:
            load.errors.append(f"{r.status_code} {r.text[:200]}")
            await anyio.sleep(0.05)


async def ttft(client: httpx.AsyncClient, url: str, key: str, priority: int) -> float:
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=completion(priority=priority, max_tokens=4, stream=True),
                             headers=auth(key)) as r:
        assert r.status_code == 200, await r.aread()
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
        assert first is not None
        return first


async def gauge(client: httpx.AsyncClient, base: str, name: str = "baton_frontend_admission_queued") -> float:
    text = (await client.get(f"{base}/metrics")).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


HIGH, LOW = -5, 5
SAMPLES = 25  # per round and side
ROUNDS = 4


def test_high_priority_ttft_under_saturation_stays_within_2x_of_idle(fleet: Stack) -> None:
    url = f"{fleet.url}/v1/completions"
    figures: dict[str, float] = {}

    async def main() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        idle: list[float] = []
        saturated: list[float] = []
        depth: list[float] = []
        same: list[float] = []
        load = Load()
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            for _ in range(3):  # warm the path (tokenizer, connections)
                await ttft(client, url, "sk-hi", HIGH)
            # Idle and saturated in alternating rounds, so the machine's own drifting load weighs on both.
            for _ in range(ROUNDS):
                idle += [await ttft(client, url, "sk-hi", HIGH) for _ in range(SAMPLES)]
                async with anyio.create_task_group() as tg:
                    # 12 low-priority clients, answers not streamed: 3 run, 9 wait in the admission queue
                    for _ in range(12):
                        tg.start_soon(closed_loop, client, url, "sk-lo", completion(priority=LOW, max_tokens=256),
                                      load)
                    with anyio.fail_after(30):
                        while await gauge(client, fleet.url) < 6:
                            await anyio.sleep(0.05)
                    for _ in range(SAMPLES):
                        saturated.append(await ttft(client, url, "sk-hi", HIGH))
                        depth.append(await gauge(client, fleet.url))
                    # the flood's tenant at the flood's priority waits its turn in the queue
                    same.append(await ttft(client, url, "sk-lo", LOW))
                    tg.cancel_scope.cancel()
                with anyio.fail_after(30):  # idle again: the flood's requests cancelled
                    while await gauge(client, fleet.url, "baton_frontend_admission_running") > 0:
                        await anyio.sleep(0.05)
        figures.update(idle_p50=statistics.median(idle), idle_p90=quantile(idle, 0.9),
                       sat_p50=statistics.median(saturated), sat_p90=quantile(saturated, 0.9),
                       same_priority_p50=statistics.median(same), queue_min=min(depth),
                       low_done=len(load.done), low_errors=len(load.errors))

    anyio.run(main)
    print("priority TTFT:", json.dumps({k: round(v, 4) for k, v in figures.items()}))
    assert figures["low_errors"] == 0
    assert figures["queue_min"] >= 1, "the fleet was not saturated throughout the measurement"
    assert figures["low_done"] > 0
    assert figures["sat_p90"] <= 2 * figures["idle_p90"], figures
    # what the priority buys: at the flood's priority the same request waits far longer
    assert figures["same_priority_p50"] > figures["sat_p90"], figures


def test_equal_weights_get_equal_throughput_when_one_sends_10x(fleet: Stack) -> None:
    url = f"{fleet.url}/v1/completions"
    # long enough (~0.1 s at the workers) that the clients' own turnaround is small beside it
    body = completion(max_tokens=96)
    warmup, window = 1.5, 6.0

    async def main() -> Load:
        load = Load()
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(closed_loop, client, url, "sk-a", body, load)
                for _ in range(4):
                    tg.start_soon(closed_loop, client, url, "sk-b", body, load)
                await anyio.sleep(warmup + window)  # the measurement window: load runs for its length
                tg.cancel_scope.cancel()
        return load

    t0 = time.monotonic()
    load = anyio.run(main)
    lo, hi = t0 + warmup, t0 + warmup + window
    a = sum(1 for k, t in load.done if k == "sk-a" and lo <= t < hi)
    b = sum(1 for k, t in load.done if k == "sk-b" and lo <= t < hi)
    print(f"fairness: tenant a (40 outstanding) {a / window:.1f} req/s, tenant b (4 outstanding) {b / window:.1f} "
          f"req/s, ratio {min(a, b) / max(a, b):.3f}, errors {len(load.errors)}")
    assert load.errors == []
    assert a >= 20 and b >= 20, (a, b)
    assert min(a, b) / max(a, b) >= 0.9, (a, b)


# --- session affinity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    # one sequence at a time per engine, so its waiting queue shows its order
    s = Stack(tmp_path_factory.mktemp("affinity"), "mocker", decode_workers=2, decode_ids=["wa", "wb"],
              extra_decode_args=[*MOCKER, "--max-num-seqs", "1"])
    with running(s):
        yield s


def served_by(s: Stack, session: str | None) -> str:
    headers = {"x-session-id": session} if session else {}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=completion(max_tokens=2, stream=True),
                      headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        r.read()
        return r.headers["x-baton-worker"]


def test_engine_serves_its_waiting_queue_by_priority(pair: Stack) -> None:
    """Straight to a worker (its NATS contract): while one request runs, a low- and then a
    high-priority one wait in the engine; the high one starts first."""

    async def main() -> list[str]:
        nc = await nats.connect(pair.nats.url)
        started: list[str] = []  # first chunks, in the order the worker sent them (one connection)
        done = anyio.Event()
        try:
            for rid, priority, max_tokens in (("busy", 0, 300), ("low", 9, 2), ("high", -9, 2)):

                async def on_reply(msg, rid: str = rid) -> None:
                    reply = generate_reply_decoder.decode(msg.data)
                    assert isinstance(reply, TokenChunk), reply
                    if rid not in started:
                        started.append(rid)
                    if len(started) == 3:
                        done.set()

                inbox = nc.new_inbox()
                await nc.subscribe(inbox, cb=on_reply)
                job = GenerateRequest(request_id=rid, token_ids=[5, 6, 7], model=MODEL,
                                      sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, priority=priority))
                await nc.publish(subjects.generate("wa"), encode(job), reply=inbox)
                if rid == "busy":  # running before the others arrive
                    with anyio.fail_after(30):
                        while not started:
                            await anyio.sleep(0.001)
            with anyio.fail_after(60):
                await done.wait()
        finally:
            await nc.close()
        return started[1:]

    assert anyio.run(main) == ["high", "low"]


def test_session_stays_on_its_worker_and_moves_when_it_dies(pair: Stack) -> None:
    # without a session the router (round-robin) spreads requests over both workers
    assert {served_by(pair, None) for _ in range(4)} == {"wa", "wb"}
    home = served_by(pair, "conv-1")
    assert [served_by(pair, "conv-1") for _ in range(6)] == [home] * 6
    other = served_by(pair, "conv-2")
    assert [served_by(pair, "conv-2") for _ in range(3)] == [other] * 3
    assert httpx.post(f"{pair.url}/v1/completions", json=completion(), timeout=30,
                      headers={"x-session-id": "s" * 300}).status_code == 400
    pair.kill(pair.decoders[["wa", "wb"].index(home)])
    survivor = "wb" if home == "wa" else "wa"
    assert served_by(pair, "conv-1") == survivor  # migrated (or routed) away from the dead worker
    assert [served_by(pair, "conv-1") for _ in range(4)] == [survivor] * 4

