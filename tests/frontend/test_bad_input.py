"""Bad input gets OpenAI's error object with the right 4xx, and harms nothing: the stack still serves."""

from __future__ import annotations

import httpx
import pytest

from tests.procs import Stack

pytestmark = pytest.mark.timeout(180)

CHAT = "/v1/chat/completions"
GOOD = {"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def still_serves(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}{CHAT}", json=GOOD, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"[1, 2, 3]", 400, None),
        (b'{"model": "baton-tiny"}', 400, None),  # missing messages
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, None),  # missing model
        (b'{"model": "baton-tiny", "messages": "hello"}', 400, "messages"),
        (b'{"model": "baton-tiny", "messages": []}', 400, "messages"),
        (b'{"model": "baton-tiny", "messages": [{"role": "wizard", "content": "x"}]}', 400, None),
        (b'{"model": 42, "messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', 400, "max_tokens"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400, "max_tokens"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}', 400, "max_tokens"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}', 400, "temperature"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": -0.1}', 400, "top_p"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "verbosity": "low"}', 400,
         "verbosity"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "functinos": []}', 400,
         "functinos"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "n": 17}', 400, "n"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}', 400, "top_logprobs"),
        (b'{"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}', 400, "stop"),
    ],
)
def test_chat_rejects(stack: Stack, body: bytes, status: int, param: str | None) -> None:
    r = httpx.post(f"{stack.url}{CHAT}", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, status, param)


def test_unknown_model_is_404(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}{CHAT}", json={**GOOD, "model": "gpt-17"}, timeout=30)
    err = assert_error(r, 404, "model")
    assert err["code"] == "model_not_found"


def test_completion_rejects(stack: Stack) -> None:
    url = f"{stack.url}/v1/completions"
    assert_error(httpx.post(url, json={"model": "baton-tiny"}, timeout=30), 400)
    assert_error(httpx.post(url, json={"model": "baton-tiny", "prompt": "x", "suffix": "y"}, timeout=30), 400, "suffix")
    assert_error(httpx.post(url, json={"model": "baton-tiny", "prompt": [1, "a"]}, timeout=30), 400, "prompt")
    assert_error(httpx.post(url, json={"model": "baton-tiny", "prompt": [10**9]}, timeout=30), 400, "prompt")
    assert_error(httpx.post(url, json={"model": "baton-tiny", "prompt": ["a", "b"]}, timeout=30), 400, "prompt")
    assert_error(httpx.post(url, json={"model": "baton-tiny", "prompt": "x", "logprobs": 6}, timeout=30), 400, "logprobs")


def test_huge_body_is_413(stack: Stack) -> None:
    big = b'{"model": "baton-tiny", "prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{stack.url}/v1/completions", content=big, headers={"content-type": "application/json"},
                   timeout=60)
    err = assert_error(r, 413)
    assert err["code"] == "request_too_large"


def test_wrong_method_and_route(stack: Stack) -> None:
    assert_error(httpx.get(f"{stack.url}{CHAT}", timeout=10), 405)
    assert_error(httpx.get(f"{stack.url}/v1/nothing", timeout=10), 404)


def test_still_serves_after_bad_input(stack: Stack) -> None:
    for body in (b"{", b"", b'{"model": 1}', b"\xff\xfe"):
        httpx.post(f"{stack.url}{CHAT}", content=body, timeout=30)
    still_serves(stack)
    assert all(p.alive() for p in stack.procs)
