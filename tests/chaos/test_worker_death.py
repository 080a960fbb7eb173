"""Chaos: a decode worker SIGKILLed mid-stream. The request migrates to the survivor and the
client's stream completes with exactly the greedy text of an undisturbed run."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import e2e_engine
from tests.procs import Stack

pytestmark = pytest.mark.timeout(240)

REQ = {"model": "baton-tiny", "prompt": "A long story about relay races:", "max_tokens": 3000, "temperature": 0,
       "ignore_eos": True}


@pytest.fixture()
def two_named_workers(tmp_path):
    if e2e_engine() != "torch":
        pytest.skip("greedy equality across workers needs the torch engine")
    s = Stack(tmp_path, "torch", decode_workers=2, discovery_ttl=3.0, decode_ids=["decode-a", "decode-b"])
    try:
        yield s.start()
    finally:
        s.stop()


def test_sigkill_mid_stream_migrates_without_loss(two_named_workers: Stack) -> None:
    s = two_named_workers
    reference = httpx.post(f"{s.url}/v1/completions", json=REQ, timeout=120).json()["choices"][0]["text"]
    victims = {"decode-a": s.decoders[0], "decode-b": s.decoders[1]}
    text, finish, killed = [], None, None
    with httpx.stream("POST", f"{s.url}/v1/completions", json={**REQ, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=120) as r:
        assert r.status_code == 200
        worker = r.headers["x-baton-worker"]
        usage = None
        for line in r.iter_lines():
            if not line or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                usage = event["usage"]
                continue
            choice = event["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
            if killed is None and len(text) >= 50:
                killed = worker
                s.kill(victims[worker])  # mid-stream, no goodbye
    assert killed is not None
    assert not victims[killed].alive()
    assert finish == "length"
    assert usage["completion_tokens"] == REQ["max_tokens"]
    assert "".join(text) == reference
    metrics = httpx.get(f"{s.url}/metrics", timeout=5).text
    assert 'baton_frontend_migrations_total{reason="worker gone"}' in metrics or \
        'baton_frontend_migrations_total{reason="worker not answering"}' in metrics
