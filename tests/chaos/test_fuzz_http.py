"""Fuzz the HTTP API with hypothesis: whatever arrives, the answer is never a 5xx and the
frontend keeps serving."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.procs import Stack

pytestmark = pytest.mark.timeout(300)

json_scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                 "content": st.text(max_size=40) | json_value})
fields = {
    "model": st.sampled_from(["baton-tiny", "other"]) | json_value,
    "messages": st.lists(message, max_size=3) | json_value,
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 5000), max_size=8) | json_value,
    "max_tokens": st.integers(-3, 12) | json_value,
    "temperature": st.floats(-1, 3, allow_nan=False) | json_value,
    "top_p": st.floats(-1, 2, allow_nan=False) | json_value,
    "top_k": st.integers(-3, 50) | json_value,
    "seed": st.integers(-(2**65), 2**65) | json_value,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6) | json_value,
    "stream": st.booleans() | json_value,
    "n": st.integers(-1, 3) | json_value,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_value,
    "min_tokens": st.integers(-2, 20) | json_value,
    "stop_token_ids": st.lists(st.integers(-2, 5000), max_size=3) | json_value,
    "logprobs": st.booleans() | st.integers(-1, 7) | json_value,
    "top_logprobs": st.integers(-1, 22) | json_value,
    "echo": st.booleans() | json_value,
    "best_of": st.integers(-1, 4) | json_value,
    "logit_bias": st.dictionaries(st.sampled_from(["5", "-1", "99999", "x", "1.5"]), st.floats(-150, 150), max_size=3)
    | json_value,
    "presence_penalty": st.floats(-3, 3, allow_nan=False) | json_value,
    "repetition_penalty": st.floats(-1, 3, allow_nan=False) | json_value,
    "min_p": st.floats(-1, 2, allow_nan=False) | json_value,
}
body = st.fixed_dictionaries({}, optional=fields) | json_value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), payload=body)
def test_fuzz_never_5xx(stack: Stack, path: str, payload: object) -> None:
    r = httpx.post(f"{stack.url}{path}", json=payload, timeout=60)
    assert r.status_code < 500, (payload, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bytes(stack: Stack, raw: bytes) -> None:
    r = httpx.post(f"{stack.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code < 500, (raw, r.text)


def test_still_alive_after_fuzz(stack: Stack) -> None:
    assert all(p.alive() for p in stack.procs)
    r = httpx.post(f"{stack.url}/v1/completions", json={"model": "baton-tiny", "prompt": "ok", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 200
