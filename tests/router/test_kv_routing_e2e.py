"""End to end, real processes: a repeated long prefix lands on the worker that cached it, also
after the router is SIGKILLed and a new one replays the KV events stream.

Three mocker decode workers (the real scheduler and KV cache accounting, no model), the ``kv``
router, the frontend, nats-server. The evidence is the workers' own prefix-cache hits
(``usage.prompt_tokens_details.cached_tokens``): under round-robin or random two in three repeats
would land on a worker without the prefix.
"""

from __future__ import annotations

import httpx
import pytest

from tests.procs import Stack, running, wait_until

pytestmark = pytest.mark.timeout(240)

BLOCK = 16
PREFIX_BLOCKS = 40
PREFIXES = 4


@pytest.fixture(scope="module")
def kv_stack(tmp_path_factory: pytest.TempPathFactory):
    with running(Stack(tmp_path_factory.mktemp("kvroute"), "mocker", decode_workers=3, discovery_ttl=3.0,
                       env={"BATON_ROUTER_MODE": "kv"}, extra_decode_args=["--mocker-speedup", "20"],
                       metrics=True)) as s:
        yield s


def prefix(i: int) -> list[int]:
    return [10 + (i * 7919 + k * 131) % 2000 for k in range(PREFIX_BLOCKS * BLOCK)]


def complete(s: Stack, tokens: list[int]) -> int:
    """Send one completion; return the prompt tokens the worker served from its prefix cache."""
    r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": tokens, "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def router_pending(s: Stack, label: str) -> float:
    """A router's ``baton_router_pending_requests``: work it sent that no load report shows yet."""
    text = httpx.get(f"http://127.0.0.1:{s.metrics_ports[label]}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("baton_router_pending_requests "))


def test_repeated_prefix_follows_the_cache_across_a_router_restart(kv_stack: Stack) -> None:
    s = kv_stack
    tail = iter(range(100_000))

    def tokens(i: int) -> list[int]:
        n = next(tail)
        return prefix(i) + [5 + n % 1000, 7 + n // 1000, 11, 13] * 5

    first = [complete(s, tokens(i)) for i in range(PREFIXES)]
    assert first == [0] * PREFIXES
    # The router learns that a request is done from the worker's KV events and load reports, tens
    # of ms after its response; until then a worker that served two of the prefixes still counts
    # as busy with both (84 blocks, more than a 40-block prefix saves). Wait for that.
    wait_until(lambda: router_pending(s, "router-0") == 0, 10, 0.02, "the router to see round one done")
    cached = [complete(s, tokens(i)) for i in range(PREFIXES) for _ in range(2)]
    assert all(c >= PREFIX_BLOCKS * BLOCK for c in cached), cached

    # SIGKILL the router: no goodbye, no final snapshot. Its successor knows nothing but the stream.
    assert s.router is not None
    s.kill(s.router)
    s.router = s._proc("router", "router-restarted", s.common())

    def routes_again() -> bool:
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": "hello", "max_tokens": 1},
                       timeout=30)
        return r.status_code == 200

    wait_until(routes_again, 60, 0.2, "the restarted router to answer")
    cached = [complete(s, tokens(i)) for i in range(PREFIXES) for _ in range(2)]
    assert all(c >= PREFIX_BLOCKS * BLOCK for c in cached), (cached, s.router.log()[-3000:])
    assert "KV index caught up" in s.router.log()
