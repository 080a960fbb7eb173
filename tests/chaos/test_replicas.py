"""Chaos: SIGKILL a router replica and a frontend replica; the survivors keep serving at once."""

from __future__ import annotations

import json

import anyio
import httpx
import msgspec
import nats
import pytest

from shared.messages import ApiChunk, ApiError
from shared.subjects import API_GENERATE
from tests.conftest import e2e_engine
from tests.procs import Stack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture()
def replicated(tmp_path):
    s = Stack(tmp_path, e2e_engine(), decode_workers=2, routers=2, frontends=2, discovery_ttl=3.0)
    try:
        yield s.start()
    finally:
        s.stop()


def nats_api_ok(url: str, n: int) -> int:
    """Send ``n`` requests on the public NATS API (served by whichever frontends are alive)."""

    async def main() -> int:
        nc = await nats.connect(url)
        ok = 0
        try:
            for i in range(n):
                msg = await nc.request(API_GENERATE, json.dumps({"prompt": f"hi {i}", "max_tokens": 2,
                                                                 "stream": False}).encode(), timeout=30)
                ok += isinstance(msgspec.json.decode(msg.data, type=ApiChunk | ApiError), ApiChunk)
        finally:
            await nc.close()
        return ok

    return anyio.run(main)


def test_router_and_frontend_replicas_survive_sigkill(replicated: Stack) -> None:
    s = replicated
    s.kill(s.routers[0])
    # The dead router's queue-group subscription is gone with its connection: no request waits on it.
    codes = [httpx.post(f"http://127.0.0.1:{s.ports[0]}/v1/completions",
                        json={"model": "baton-tiny", "prompt": f"r{i}", "max_tokens": 2}, timeout=30).status_code
             for i in range(20)]
    assert codes == [200] * 20
    s.kill(s.frontends[0])
    codes = [httpx.post(f"http://127.0.0.1:{s.ports[1]}/v1/completions",
                        json={"model": "baton-tiny", "prompt": f"f{i}", "max_tokens": 2}, timeout=30).status_code
             for i in range(20)]
    assert codes == [200] * 20
    # The NATS API is a queue group over frontends: the surviving one answers everything.
    assert nats_api_ok(s.nats.url, 20) == 20
