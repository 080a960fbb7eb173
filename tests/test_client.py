"""The Python client and the official OpenAI SDK against ``baton up``."""

from __future__ import annotations

import os
import re
import signal

import anyio
import pytest

from baton.client import AsyncBatonClient, BatonClient, BatonError, NatsBatonClient
from tests.procs import wait_until
from tests.require import require_module
from tests.test_baton_up import children_of, start_up, wait_ready_line

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client-up")
    proc, http_port, nats_port = start_up(tmp, ["--prefill-workers", "0"])
    try:
        wait_ready_line(tmp, proc)
        yield proc, f"http://127.0.0.1:{http_port}", f"nats://127.0.0.1:{nats_port}", tmp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def test_openai_sdk_unchanged(up) -> None:
    openai = require_module("openai", "pip install 'baton[test]'")
    _, url, _, _ = up
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["baton-tiny"]
    chat = client.chat.completions.create(model="baton-tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.completion_tokens <= 5
    stream = client.chat.completions.create(model="baton-tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens
    comp = client.completions.create(model="baton-tiny", prompt="Once", max_tokens=4, temperature=0)
    assert comp.choices[0].text is not None and comp.usage.completion_tokens <= 4
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="baton-tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_client_sync_async_and_nats(up) -> None:
    _, url, nats_url, tmp = up
    with BatonClient(url) as c:
        full = c.complete("Hello", max_tokens=6, temperature=0, ignore_eos=True)
        assert full.usage.completion_tokens == 6 and full.finish_reason == "length"
        streamed = list(c.complete_stream("Hello", max_tokens=6, temperature=0, ignore_eos=True))
        assert "".join(s.text for s in streamed) == full.text
        assert streamed[-1].usage.completion_tokens == 6
        with pytest.raises(BatonError) as e:
            c.complete("Hello", max_tokens=-1)
        assert e.value.status == 400 and c.retries == 0  # never retried

    async def run_async() -> tuple[str, str]:
        async with AsyncBatonClient(url) as ac:
            a = await ac.complete("Hello", max_tokens=6, temperature=0, ignore_eos=True)
        # baton up runs its bus with authentication: the API client identity it generated, as a user would
        creds = re.search(r"API client credentials in (\S+)", (tmp / "up.log").read_text()).group(1)
        async with NatsBatonClient(nats_url, creds=creds) as nc:
            n = await nc.generate(prompt="Hello", max_tokens=6, temperature=0, ignore_eos=True)
        return a.text, n.text

    a_text, n_text = anyio.run(run_async)
    assert a_text == full.text == n_text


def test_client_retries_through_frontend_restart(up) -> None:
    proc, url, _, tmp = up
    frontend = next(k for k in children_of(proc.pid) if b"services.frontend" in open(f"/proc/{k}/cmdline", "rb").read())
    with BatonClient(url, max_retries=8, backoff=0.2, max_backoff=2.0) as c:
        texts = []
        for i in range(12):
            if i == 4:
                os.kill(frontend, signal.SIGKILL)  # baton up restarts it; the client must ride it out
                # A request sent into the dying process's socket is reset *after* sending: the
                # client must not retry that (it could run twice), so wait until the process is gone:
                # reaped by baton up, i.e. every thread exited and its listening socket closed (a
                # zombie thread-group leader alone does not mean that).
                wait_until(lambda: "frontend exited" in (tmp / "up.log").read_text(), 10, 0.01, "frontend reaped")
            texts.append(c.complete(f"req {i}", max_tokens=3).text)
        assert len(texts) == 12
        assert c.retries >= 1
