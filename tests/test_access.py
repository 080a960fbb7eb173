"""API keys, rate limits and request limits on the frontend."""

from __future__ import annotations

import httpx
import pytest

from services.frontend.access import RateLimiter
from services.frontend.openai_api import ApiError
from tests.conftest import e2e_engine
from tests.procs import Stack

pytestmark = pytest.mark.timeout(120)

BODY = {"model": "baton-tiny", "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("access")
    keys = tmp / "keys.txt"
    keys.write_text("# team keys\nsk-alpha\nsk-beta  # the other team\nsk-limits\n")
    s = Stack(tmp, e2e_engine())
    s.frontend_extra = ["--api-keys-file", str(keys), "--rate-limit-rpm", "60", "--rate-limit-burst", "3",
                        "--max-prompt-tokens", "64", "--max-body-bytes", "100000"]
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
    with pytest.raises(ApiError) as e:
        rl.check("a", now=0.1)
    assert e.value.status == 429
    rl.check("a", now=1.2)  # one token a second
    small = RateLimiter(rpm=60, burst=1, max_callers=10)
    for i in range(100):
        small.check(f"caller-{i}", now=0.0)
    assert len(small._buckets) <= 10
