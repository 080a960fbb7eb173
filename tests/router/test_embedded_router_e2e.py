"""End to end, real processes: ``--router embedded`` routes inside the frontend, with no router service.

- ``baton frontend --router embedded --router-mode kv`` with two mocker decode workers and no router
  process: a repeated long prefix lands on the worker that cached it, which only holds if the
  frontend's in-process router follows the workers' KV events (or its own predictions) as the
  router service does. Under NATS authentication, so the frontend role may read what a router reads.
- ``baton up --router embedded`` starts no router service, and the stack serves.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.procs import Stack, running, wait_until
from tests.router.test_kv_routing_e2e import BLOCK, PREFIX_BLOCKS, complete, prefix
from tests.test_baton_up import alive, children_of, start_up, wait_ready_line

pytestmark = pytest.mark.timeout(240)

PREFIXES = 3


def router_pending(s: Stack) -> float:
    """The frontend's ``baton_router_pending_requests`` (its embedded router's unreported work)."""
    text = httpx.get(f"{s.url}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("baton_router_pending_requests "))


def test_embedded_kv_router_follows_the_cache_without_a_router_service(tmp_path) -> None:
    stack = Stack(tmp_path, "mocker", decode_workers=2, discovery_ttl=3.0, routers=0,
                  extra_decode_args=["--mocker-speedup", "20"])
    stack.frontend_extra = ["--router", "embedded", "--router-mode", "kv", "--router-snapshot-interval", "0"]
    with running(stack) as s:
        assert s.routers == [] and s.router is None
        tail = iter(range(100_000))

        def tokens(i: int) -> list[int]:
            n = next(tail)
            return prefix(i) + [5 + n % 1000, 7 + n // 1000, 11, 13] * 5

        first = [complete(s, tokens(i)) for i in range(PREFIXES)]
        assert first == [0] * PREFIXES
        # The router learns that a request is done from the worker's KV events and load reports,
        # tens of ms after its response; a repeat sent sooner meets a worker still counted busy
        # with the last prompt (83 blocks' cost, more than a 40-block prefix saves). Wait for that.
        wait_until(lambda: router_pending(s) == 0, 10, 0.02, "the embedded router to see round one done")
        cached = [complete(s, tokens(i)) for i in range(PREFIXES) for _ in range(3)]
        assert all(c >= PREFIX_BLOCKS * BLOCK for c in cached), (cached, s.logs()[-3000:])
        # The policy ran in the frontend process (no router process exists to have logged it).
        assert "routing up, policy kv" in s.frontend.log()


def test_up_with_embedded_router_starts_no_router_service(tmp_path) -> None:
    proc, http_port, _ = start_up(tmp_path, ["--prefill-workers", "0", "--router", "embedded",
                                             "--router-mode", "kv"])
    try:
        wait_ready_line(tmp_path, proc)
        kids = children_of(proc.pid)
        cmdlines = [open(f"/proc/{k}/cmdline", "rb").read() for k in kids if alive(k)]
        assert not any(b"services.router" in c for c in cmdlines), cmdlines
        frontend = next(c for c in cmdlines if b"services.frontend" in c)
        assert b"embedded" in frontend.split(b"\0")
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json={
            "model": "baton-tiny", "prompt": "routed in the frontend", "max_tokens": 3, "stream": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.text.rstrip().endswith("data: [DONE]")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        wait_until(lambda: not any(alive(k) for k in kids), 10, 0.05, "children gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
