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
from pathlib import Path

import anyio
import httpx
import msgspec
import nats
import pytest

from bench.priority_bench import (
    ADMISSION,
    KEYS,
    MODEL,
    auth,
    completion,
    measure_tenants,
    measure_ttft,
)
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

# The mocker's simulated cost per engine step: 5 ms + 0.1 ms per running sequence, divided by this.
# The frontend (bench.priority_bench.ADMISSION): of 4 slots at the workers, 1 is kept for
# priorities below 0, so low-priority traffic fills 3.
MOCKER = ["--mocker-speedup", "5"]
SAMPLES = 25  # TTFT samples per round and side (idle, saturated)
ROUNDS = 4
WINDOW = 6.0  # seconds of tenant throughput measured


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    tmp: Path = tmp_path_factory.mktemp("priority")
    keys = tmp / "keys.txt"
    keys.write_text(KEYS)
    s = Stack(tmp, "mocker", extra_decode_args=MOCKER)
    s.frontend_extra = ["--api-keys-file", str(keys), *ADMISSION]
    with running(s):
        yield s


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


# --- saturation (the measurements: bench/priority_bench.py) ----------------------------------------


def test_high_priority_ttft_under_saturation_stays_within_2x_of_idle(fleet: Stack) -> None:
    figures = anyio.run(measure_ttft, fleet.url, ROUNDS, SAMPLES)
    print("priority TTFT:", json.dumps({k: round(v, 4) for k, v in figures.items()}))
    assert figures["low_errors"] == 0
    assert figures["queue_min"] >= 1, "the fleet was not saturated throughout the measurement"
    assert figures["low_done"] > 0
    assert figures["sat_p90"] <= 2 * figures["idle_p90"], figures
    # what the priority buys: at the flood's priority the same request waits far longer
    assert figures["same_priority_p50"] > figures["sat_p90"], figures


def test_equal_weights_get_equal_throughput_when_one_sends_10x(fleet: Stack) -> None:
    got = anyio.run(measure_tenants, fleet.url, ("sk-a", "sk-b"), 1.5, WINDOW)
    print(f"fairness: tenant a (40 outstanding) {got['heavy_rps']:.1f} req/s, tenant b (4 outstanding) "
          f"{got['light_rps']:.1f} req/s, ratio {got['ratio']:.3f}, errors {got['errors']}")
    assert got["errors"] == 0
    assert got["heavy_rps"] * WINDOW >= 20 and got["light_rps"] * WINDOW >= 20, got
    assert got["ratio"] >= 0.9, got


# --- session affinity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    # one sequence at a time per engine, so its waiting queue shows its order
    s = Stack(tmp_path_factory.mktemp("affinity"), "mocker", decode_workers=2, decode_ids=["wa", "wb"],
              extra_decode_args=[*MOCKER, "--max-num-seqs", "1"])
    with running(s):
        yield s


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory):
    # Room for more than one sequence: a worker with a request waiting reports itself full, and a
    # full worker's sessions move (SessionAffinity.full). With --max-num-seqs 1, a request that
    # arrives while the last one is still finishing waits a moment, and a load report taken then
    # would move a session that this test expects to stay.
    s = Stack(tmp_path_factory.mktemp("sessions"), "mocker", decode_workers=2, decode_ids=["wa", "wb"],
              extra_decode_args=MOCKER)
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


def test_session_stays_on_its_worker_and_moves_when_it_dies(sessions: Stack) -> None:
    pair = sessions
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

