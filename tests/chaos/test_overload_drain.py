"""Overload is refused at once (503 + Retry-After), and a SIGTERMed worker drains: it stops taking
work, finishes what it holds, then exits cleanly."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import e2e_engine
from tests.procs import Stack, wait_until

pytestmark = pytest.mark.timeout(180)

LONG = {"model": "baton-tiny", "prompt": "drain me", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}


@pytest.fixture()
def two_workers(tmp_path):
    s = Stack(tmp_path, e2e_engine(), decode_workers=2, discovery_ttl=3.0, decode_ids=["decode-a", "decode-b"])
    s.frontend_extra = ["--max-inflight", "3"]
    try:
        yield s.start()
    finally:
        s.stop()


def test_admission_control_refuses_at_once(two_workers: Stack) -> None:
    s = two_workers
    results: list[tuple[int, float, str | None]] = []
    gate = threading.Barrier(8)

    def one() -> None:
        gate.wait()
        t0 = time.monotonic()
        r = httpx.post(f"{s.url}/v1/completions", json=LONG, timeout=120)
        results.append((r.status_code, time.monotonic() - t0, r.headers.get("retry-after")))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == 8
    assert 1 <= len(ok) <= 3 and len(refused) >= 5
    assert all(r[2] == "1" for r in refused)
    assert max(r[1] for r in refused) < min(r[1] for r in ok)  # refused at once, not after waiting


def test_sigterm_drains_a_worker(two_workers: Stack) -> None:
    s = two_workers
    reference = httpx.post(f"{s.url}/v1/completions", json=LONG, timeout=120).json()["choices"][0]["text"]
    procs = {"decode-a": s.decoders[0], "decode-b": s.decoders[1]}
    text, finish = [], None
    with httpx.stream("POST", f"{s.url}/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
        worker = r.headers["x-baton-worker"]
        victim = procs[worker]
        signalled = False
        for line in r.iter_lines():
            if not line or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
            if not signalled and len(text) >= 20:
                victim.proc.terminate()  # SIGTERM: drain
                signalled = True
                # Deregistered at once: the frontend sees one decode worker well before any TTL.
                wait_until(lambda: s.health().get("decode_workers") == 1, 2.5, 0.05, "deregistration")
    assert finish == "length"
    assert "".join(text) == reference  # finished where it was, not migrated mid-way
    s._expected_dead.append(victim)
    assert victim.proc.wait(30) == 0  # exited cleanly once its request was done
    for i in range(5):
        assert httpx.post(f"{s.url}/v1/completions", json={**LONG, "max_tokens": 2, "prompt": f"after {i}"},
                          timeout=30).status_code == 200
