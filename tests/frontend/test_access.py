"""API keys, rate limits and request limits on the frontend: the same rules on HTTP and on the
NATS request API; slow clients cannot take every in-flight slot."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import anyio
import httpx
import msgspec
import nats
import pytest

from baton.client import BatonError, NatsBatonClient
from services.frontend.access import (
    AUTH_FAILURE_BURST,
    AccessControl,
    ConfigError,
    RateLimiter,
    load_api_keys,
)
from services.frontend.openai_api import RequestError
from shared.messages import ApiChunk, ApiError
from shared.subjects import API_GENERATE
from tests.conftest import e2e_engine
from tests.procs import Stack, service_env, wait_until

pytestmark = pytest.mark.timeout(120)

BODY = {"model": "baton-tiny", "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    keys = tmp / "keys.txt"
    keys.write_text("# team keys\nsk-alpha\nsk-beta  # the other team\nsk-limits\nsk-nats\nsk-fast\nsk-admin\n"
                    + "".join(f"sk-slow-{i}\n" for i in range(4)))
    s = Stack(tmp, e2e_engine())
    # 12 rpm: one token back every 5 s, so a loaded machine does not refill a bucket mid-test.
    s.frontend_extra = ["--api-keys-file", str(keys), "--rate-limit-rpm", "12", "--rate-limit-burst", "3",
                        "--max-prompt-tokens", "64", "--max-body-bytes", "100000", "--max-inflight", "2",
                        "--body-timeout", "2"]
    try:
        yield s.start()
    finally:
        s.stop()


def post(s: Stack, key: str | None, body: dict | None = None, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{s.url}/v1/completions", json=body or BODY, headers=headers, timeout=30, **kw)


def test_api_keys(guarded: Stack) -> None:
    missing = post(guarded, None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = post(guarded, "sk-gamma")
    assert wrong.status_code == 401 and "Incorrect API key" in wrong.json()["error"]["message"]
    assert post(guarded, "sk-beta").status_code == 200
    models = httpx.get(f"{guarded.url}/v1/models", timeout=10)
    assert models.status_code == 401
    assert httpx.get(f"{guarded.url}/health", timeout=10).status_code == 200  # probes need no key


def test_lora_admin_needs_a_key_and_a_root(guarded: Stack) -> None:
    body = {"lora_name": "x", "lora_path": "x"}
    # One failed check only: the address brake counts them (test_failed_keys_are_braked_before_the_key_check).
    missing = httpx.post(f"{guarded.url}/v1/load_lora_adapter", json=body, timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    # With a key, but no --lora-root: run-time loading is off.
    off = httpx.post(f"{guarded.url}/v1/load_lora_adapter", json=body, headers={"authorization": "Bearer sk-admin"},
                     timeout=10)
    assert off.status_code == 403 and off.json()["error"]["code"] == "lora_loading_disabled"


def test_rate_limit_per_key(guarded: Stack) -> None:
    codes = [post(guarded, "sk-alpha").status_code for _ in range(6)]
    assert codes[:3] == [200, 200, 200]  # the burst
    limited = post(guarded, "sk-alpha")
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1
    assert 429 in codes
    # Another key has its own bucket.
    assert post(guarded, "sk-beta").status_code == 200


def test_request_limits(guarded: Stack) -> None:
    too_long = post(guarded, "sk-limits", {**BODY, "prompt": "word " * 200})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "prompt_too_long"
    big = httpx.post(f"{guarded.url}/v1/completions", content=b"{" + b" " * 200_000 + b"}",
                     headers={"authorization": "Bearer sk-limits", "content-type": "application/json"}, timeout=30)
    assert big.status_code == 413


def test_rate_limiter_refills() -> None:
    rl = RateLimiter(rpm=60, burst=2)
    rl.check("a", now=0.0)
    rl.check("a", now=0.0)
    with pytest.raises(RequestError) as e:
        rl.check("a", now=0.1)
    assert e.value.status == 429
    rl.check("a", now=1.2)  # one token a second
    small = RateLimiter(rpm=60, burst=1, max_callers=10)
    for i in range(100):
        small.check(f"caller-{i}", now=0.0)
    assert len(small._buckets) <= 10


# --- the NATS request API: same keys, same limits ------------------------------------------------


async def nats_request(nc: nats.NATS, key: str | None, prompt: str = "hi") -> ApiChunk | ApiError:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else None
        body = json.dumps({"prompt": prompt, "max_tokens": 2, "stream": False}).encode()
        await nc.publish(API_GENERATE, body, reply=inbox, headers=headers)
        msg = await sub.next_msg(timeout=30)
        return msgspec.json.decode(msg.data, type=ApiChunk | ApiError)
    finally:
        await sub.unsubscribe()


def test_nats_api_needs_a_key(guarded: Stack) -> None:
    async def main() -> None:
        nc = await nats.connect(guarded.nats.url)
        try:
            missing = await nats_request(nc, None)
            assert isinstance(missing, ApiError) and missing.code == 401 and "API key" in missing.message
            wrong = await nats_request(nc, "sk-gamma")
            assert isinstance(wrong, ApiError) and wrong.code == 401 and "Incorrect API key" in wrong.message
            ok = await nats_request(nc, "sk-nats")
            assert isinstance(ok, ApiChunk) and ok.finish_reason is not None
        finally:
            await nc.close()
        async with NatsBatonClient(guarded.nats.url, api_key="sk-nats") as client:  # the Python client
            assert (await client.generate(prompt="hi", max_tokens=2)).finish_reason is not None
        async with NatsBatonClient(guarded.nats.url) as client:
            with pytest.raises(BatonError) as e:
                await client.generate(prompt="hi", max_tokens=2)
            assert e.value.status == 401

    anyio.run(main)


def test_nats_api_rate_limit(guarded: Stack) -> None:
    async def main() -> None:
        nc = await nats.connect(guarded.nats.url)
        try:
            replies = [await nats_request(nc, "sk-nats") for _ in range(5)]
            limited = [r for r in replies if isinstance(r, ApiError)]
            assert limited and all(r.code == 429 and "rate limit" in r.message for r in limited)
            # The bucket is the key's, whichever API spends it: HTTP is limited too now.
            assert post(guarded, "sk-nats").status_code == 429
        finally:
            await nc.close()

    anyio.run(main)


def test_failed_keys_are_braked_before_the_key_check(guarded: Stack) -> None:
    """Guessing is braked before the key is even looked at: after a burst of failures, a NATS
    caller is refused even with a right key; HTTP callers (another address) are not affected."""
    async def main() -> None:
        nc = await nats.connect(guarded.nats.url)
        try:
            codes = []
            for i in range(3 * AUTH_FAILURE_BURST):
                r = await nats_request(nc, f"sk-guess-{i}")
                assert isinstance(r, ApiError)
                codes.append(r.code)
                if r.code == 429:
                    break
            assert codes[-1] == 429 and codes.count(401) <= AUTH_FAILURE_BURST + 1, codes
            braked = await nats_request(nc, "sk-beta")
            assert isinstance(braked, ApiError) and braked.code == 429 and "failed API key" in braked.message
            assert post(guarded, "sk-beta").status_code == 200
        finally:
            await nc.close()

    anyio.run(main)


# --- slow bodies ------------------------------------------------------------------------------------


def test_slow_bodies_cannot_take_every_slot(guarded: Stack) -> None:
    """The frontend holds 2 requests in flight; 4 clients that send headers and then trickle
    their bodies hold no slot: others are served meanwhile, and the slow ones get 408."""
    slow: list[socket.socket] = []
    answers: list[bytes] = []
    try:
        for i in range(4):  # each its own key: rate limits are not what stops them
            c = socket.create_connection(("127.0.0.1", guarded.port), timeout=10)
            c.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-slow-%d\r\n" % i +
                      b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{")
            slow.append(c)
        for _ in range(2):
            r = post(guarded, "sk-fast")
            assert r.status_code == 200, r.text

        def read_all(c: socket.socket) -> None:
            out = b""
            while chunk := c.recv(4096):  # the 408 closes the connection
                out += chunk
            answers.append(out)

        threads = [threading.Thread(target=read_all, args=(c,)) for c in slow]
        for t in threads:
            t.start()
        wait_until(lambda: len(answers) == len(slow), 15, what="the slow clients' answers")
        for t in threads:
            t.join(5)
        for a in answers:
            assert a.startswith(b"HTTP/1.1 408"), a[:200]
            assert b'"request_timeout"' in a
    finally:
        for c in slow:
            c.close()


# --- configuration and units ------------------------------------------------------------------------


def test_empty_keys_file_is_an_error(tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# nobody yet\n\n   # still nobody\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_api_keys(str(keys))
    r = subprocess.run([sys.executable, "-m", "services.frontend", "--api-keys-file", str(keys),
                        "--nats-url", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                       env=service_env())
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "holds no key" in lines[0], r.stderr


def test_access_control_units() -> None:
    ac = AccessControl(frozenset({"sk-one", "sk-two"}), None, RateLimiter(rpm=60, burst=2))
    assert ac.admit("Bearer sk-two", "10.0.0.1") == "key:sk-two"
    with pytest.raises(RequestError) as e:
        ac.admit("Basic sk-two", "10.0.0.2")
    assert e.value.status == 401
    # The address limit applies before the key is checked: a third request from 10.0.0.1 is
    # refused even with a right key, while 10.0.0.3 is not affected.
    ac.admit("Bearer sk-one", "10.0.0.1")
    with pytest.raises(RequestError) as e:
        ac.admit("Bearer sk-one", "10.0.0.1")
    assert e.value.status == 429
    assert ac.admit("Bearer sk-one", "10.0.0.3") == "key:sk-one"
