"""The public NATS request API: any NATS client, JSON or msgpack, streamed replies."""

from __future__ import annotations

import json

import anyio
import msgspec
import nats
import pytest

from shared.messages import ApiChunk, ApiError, ApiGenerateRequest, ChatMessage, api_reply_msgpack_decoder
from shared.subjects import API_GENERATE
from tests.procs import Stack

pytestmark = pytest.mark.timeout(120)


async def collect(nc: nats.NATS, payload: bytes, decode) -> list:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(API_GENERATE, payload, reply=inbox)
    out = []
    with anyio.fail_after(60):
        while True:
            msg = await sub.next_msg(timeout=60)
            reply = decode(msg.data)
            out.append(reply)
            if isinstance(reply, ApiError) or reply.finish_reason is not None:
                break
    await sub.unsubscribe()
    return out


def test_nats_api_json_streaming(stack: Stack) -> None:
    async def main() -> None:
        nc = await nats.connect(stack.nats.url)
        try:
            req = {"prompt": "Hello over NATS", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            chunks = await collect(nc, json.dumps(req).encode(), lambda b: msgspec.json.decode(b, type=ApiChunk | ApiError))
            assert all(isinstance(c, ApiChunk) for c in chunks)
            assert chunks[-1].finish_reason == "length"
            assert chunks[-1].usage.completion_tokens == 6
            assert sum(len(c.token_ids) for c in chunks) == 6
            # The same request, not streamed, gives the same text in one message.
            single = await collect(nc, json.dumps({**req, "stream": False}).encode(),
                                   lambda b: msgspec.json.decode(b, type=ApiChunk | ApiError))
            assert len(single) == 1
            assert single[0].text == "".join(c.text for c in chunks)
        finally:
            await nc.close()

    anyio.run(main)


def test_nats_api_msgpack_chat(stack: Stack) -> None:
    async def main() -> None:
        nc = await nats.connect(stack.nats.url)
        try:
            req = ApiGenerateRequest(messages=[ChatMessage(role="user", content="hi")], max_tokens=4, stream=False)
            out = await collect(nc, msgspec.msgpack.encode(req), api_reply_msgpack_decoder.decode)
            assert len(out) == 1 and isinstance(out[0], ApiChunk)
            assert out[0].usage.completion_tokens <= 4
        finally:
            await nc.close()

    anyio.run(main)


@pytest.mark.parametrize(
    "payload",
    [b'{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}', b'{"max_tokens": 3}',
     b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": "x", "model": "nope"}', b"{broken", b"\x93\x01\x02"],
)
def test_nats_api_errors(stack: Stack, payload: bytes) -> None:
    async def main() -> None:
        nc = await nats.connect(stack.nats.url)
        try:
            as_json = payload[:1] == b"{"
            decode = (lambda b: msgspec.json.decode(b, type=ApiChunk | ApiError)) if as_json else api_reply_msgpack_decoder.decode
            out = await collect(nc, payload, decode)
            assert len(out) == 1 and isinstance(out[0], ApiError)
            assert 400 <= out[0].code < 500 and out[0].message
        finally:
            await nc.close()

    anyio.run(main)


def test_nats_api_refuses_what_it_does_not_honour_by_name(stack: Stack) -> None:
    async def main() -> None:
        nc = await nats.connect(stack.nats.url)
        try:
            out = await collect(nc, b'{"prompt": "x", "n": 2}', lambda b: msgspec.json.decode(b, type=ApiChunk | ApiError))
            assert len(out) == 1 and isinstance(out[0], ApiError)
            assert out[0].code == 400 and "`n`" in out[0].message
        finally:
            await nc.close()

    anyio.run(main)
