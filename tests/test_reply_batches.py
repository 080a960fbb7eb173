"""The per-token path's batching: a worker's replies to one frontend in one message per loop turn
(shared.bus.ReplyBatcher -> ReplyInbox), and the frontend's pre-encoded SSE events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from baton.nats_server import EmbeddedNats
from services.frontend.choices import ChoiceShaper, sse_event
from services.frontend.request import ChoicePlan
from services.frontend.text_stream import Delta
from shared.bus import Bus, ReplyBatcher, decoded, merge_chunks
from shared.messages import GenerateError, ReplyBatch, TokenChunk, encode, generate_reply_decoder

pytestmark = pytest.mark.timeout(60)


async def _burst(stream: Any) -> list[Any]:
    """A reply stream's next message, and every one already behind it."""
    return [await stream.next(5), *stream.ready()]


def test_one_message_per_turn_per_frontend_each_request_in_order(tmp_path: Path) -> None:
    server = EmbeddedNats(data_dir=tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()

    async def main() -> None:
        frontend = await Bus.connect(server.url, "frontend")
        worker = await Bus.connect(server.url, "worker")
        wire: list[bytes] = []  # what the worker published to the frontend's batch subject
        publish_nowait = worker.publish_nowait

        def recording_publish(subject: str, msg) -> bool:  # the batcher's way out while connected
            if subject == frontend.inbox.batch_subject:
                wire.append(msg if isinstance(msg, bytes) else encode(msg))
            return publish_nowait(subject, msg)

        worker.publish_nowait = recording_publish  # type: ignore[method-assign]
        a, b = frontend.inbox.open("a"), frontend.inbox.open("b")
        batcher = ReplyBatcher(worker)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(batcher.run)
                # one "engine step": both requests' chunks, handed over in one loop turn
                batcher.send(frontend.inbox.batch_subject, TokenChunk(request_id="a", index=0, token_ids=[1]))
                batcher.send(frontend.inbox.batch_subject, TokenChunk(request_id="b", index=0, token_ids=[7]))
                batcher.send(frontend.inbox.batch_subject, TokenChunk(request_id="a", index=1, token_ids=[2]))
                batcher.send(frontend.inbox.batch_subject, TokenChunk(request_id="gone", index=0, token_ids=[9]))
                with anyio.fail_after(10):
                    got_a = [await a.next(5)]  # a's two chunks of the turn: merged into one
                    got_b = await b.next(5)
                # a later step with one reply goes as that reply alone; an error ends b
                batcher.send(frontend.inbox.batch_subject, GenerateError(request_id="b", code=500, message="boom"))
                with anyio.fail_after(10):
                    err = await b.next(5)
                # a stranger's bytes on the batch subject are dropped, not fatal
                await worker.publish(frontend.inbox.batch_subject, b"\xc1not msgpack")
                await worker.publish(frontend.inbox.batch_subject, TokenChunk(request_id="a", index=2, token_ids=[3]))
                with anyio.fail_after(10):
                    got_a.append(await a.next(5))
                tg.cancel_scope.cancel()
        finally:
            await worker.close()
            await frontend.close()
        assert [c.token_ids for c in decoded(got_a, generate_reply_decoder)] == [[1, 2], [3]]
        assert isinstance(got_b, TokenChunk) and got_b.token_ids == [7]
        assert isinstance(err, GenerateError) and err.message == "boom"
        batches = [generate_reply_decoder.decode(w) for w in wire[:2]]
        assert isinstance(batches[0], ReplyBatch) and len(batches[0].replies) == 3  # the first turn: one message
        assert isinstance(batches[1], GenerateError)  # one reply: sent as itself

    try:
        anyio.run(main)
    finally:
        server.stop()


def test_middle_tokens_wait_for_the_interval_first_and_last_go_at_once(tmp_path: Path) -> None:
    """With an interval, a request's middle tokens wait (and leave as one chunk), while a first
    token, a last one and an error go at once, each with what its own request had pending."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()

    async def main() -> None:
        frontend = await Bus.connect(server.url, "frontend")
        worker = await Bus.connect(server.url, "worker")
        wire: list[list[TokenChunk | GenerateError]] = []
        publish_nowait = worker.publish_nowait

        def recording_publish(subject: str, msg) -> bool:  # the batcher's way out while connected
            if subject == frontend.inbox.batch_subject:
                wire.append(list(msg.replies) if isinstance(msg, ReplyBatch) else [msg])
            return publish_nowait(subject, msg)

        worker.publish_nowait = recording_publish  # type: ignore[method-assign]
        to = frontend.inbox.batch_subject
        a, b, c = frontend.inbox.open("a"), frontend.inbox.open("b"), frontend.inbox.open("c")
        batcher = ReplyBatcher(worker, interval=60.0)  # never due within this test: only urgency flushes
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(batcher.run)
                batcher.send(to, TokenChunk(request_id="a", index=0, token_ids=[1]))
                with anyio.fail_after(10):
                    first_a = await a.next(5)  # a first token: at once
                batcher.send(to, TokenChunk(request_id="a", index=1, token_ids=[2]))
                batcher.send(to, TokenChunk(request_id="c", index=4, token_ids=[40]))  # c: a resumed request
                batcher.send(to, TokenChunk(request_id="a", index=2, token_ids=[3]))
                batcher.send(to, TokenChunk(request_id="b", index=0, token_ids=[7]))
                with anyio.fail_after(10):
                    first_b = await b.next(5)  # b's first token goes; a's and c's middle tokens wait
                assert not a.ready() and not c.ready()
                batcher.send(to, TokenChunk(request_id="a", index=3, token_ids=[4], finish_reason="length"))
                with anyio.fail_after(10):
                    rest_a = await _burst(a)  # a's last: with a's pending middle tokens, as one chunk
                assert not c.ready()
                batcher.send(to, GenerateError(request_id="c", code=500, message="boom"))
                with anyio.fail_after(10):
                    got_c = await _burst(c)
                tg.cancel_scope.cancel()
        finally:
            await worker.close()
            await frontend.close()
        assert decoded([first_a], generate_reply_decoder)[0].token_ids == [1]
        assert decoded([first_b], generate_reply_decoder)[0].token_ids == [7]
        assert wire[1] == [TokenChunk(request_id="b", index=0, token_ids=[7])]  # only b's
        (last,) = decoded(rest_a, generate_reply_decoder)
        assert (last.index, last.token_ids, last.finish_reason) == (1, [2, 3, 4], "length")
        got = decoded(got_c, generate_reply_decoder)
        assert [type(r).__name__ for r in got] == ["TokenChunk", "GenerateError"]  # c's middle token, then its error
        assert got[0].token_ids == [40]

    try:
        anyio.run(main)
    finally:
        server.stop()


def test_merging_keeps_each_request_in_order() -> None:
    tc = TokenChunk
    replies = [tc(request_id="a", index=0, token_ids=[1]), tc(request_id="b", index=5, token_ids=[9]),
               tc(request_id="a", index=1, token_ids=[2]), tc(request_id="a", index=0, token_ids=[5], choice=1),
               tc(request_id="a", index=2, token_ids=[3]), tc(request_id="b", index=7, token_ids=[8]),
               GenerateError(request_id="b", code=500, message="x"), tc(request_id="b", index=8, token_ids=[6])]
    out = merge_chunks(replies)
    a0 = [r for r in out if r.request_id == "a" and r.choice == 0]
    # a choice 0: [1, 2] then (after choice 1's chunk) [3]; b: index 7 does not follow 5 + 1 tokens
    assert [(r.index, r.token_ids) for r in a0] == [(0, [1, 2]), (2, [3])]
    assert [type(r).__name__ for r in out if r.request_id == "b"] == ["TokenChunk", "TokenChunk", "GenerateError",
                                                                       "TokenChunk"]
    tokens = sum(len(r.token_ids) for r in replies if isinstance(r, TokenChunk))
    assert sum(len(r.token_ids) for r in out if isinstance(r, TokenChunk)) == tokens  # none lost


def test_old_single_replies_still_decode() -> None:
    chunk = TokenChunk(request_id="r", index=0, token_ids=[1, 2])
    assert generate_reply_decoder.decode(encode(chunk)) == chunk
    batch = ReplyBatch(replies=[chunk, GenerateError(request_id="s", code=503, message="full")])
    assert generate_reply_decoder.decode(encode(batch)) == batch


@pytest.mark.parametrize("chat", [True, False])
def test_pre_encoded_sse_events_are_the_chunk_objects_byte_for_byte(chat: bool) -> None:
    def shaper() -> ChoiceShaper:
        return ChoiceShaper(None, ChoicePlan(), chat, "cmpl-x\"y", "m\u00e9", "", [])  # type: ignore[arg-type]

    fast, slow = shaper(), shaper()
    slow._sse_head = None  # the generic path: build the dicts, encode them
    assert fast._sse_head is not None
    assert fast.sse_start() == slow.sse_start() == b"".join(map(sse_event, slow.stream_start()))
    for d in (Delta("Hello", [1]), Delta("", [2]), Delta(' "quoted" \u2603\n', [3]), Delta("end", [4], "length"),
              Delta("", [5], "stop")):
        out = fast.sse_delta(d)
        assert out == slow.sse_delta(d)
        for event in out.split(b"\n\n")[:-1]:
            assert json.loads(event.removeprefix(b"data: "))["id"] == "cmpl-x\"y"
    assert msgspec.json.decode(fast.sse_delta(Delta("a", [1])).removeprefix(b"data: ").strip())["model"] == "m\u00e9"


@pytest.mark.parametrize("failing", [False, True])
def test_an_output_listener_takes_tokens_in_the_step_and_the_stream_the_rest(failing: bool) -> None:
    """Engine.listen: tokens reach the listener as the step delivers them; the last output (or,
    after the listener fails, everything from then on) comes through the stream, in order."""
    from shared.engines import make_engine
    from shared.engines.base import EngineConfig
    from shared.messages import SamplingParams

    async def main() -> tuple[list[int], list[int], list[str | None]]:
        engine = make_engine(EngineConfig(engine="mocker", speedup=1e9))
        engine.runner.multi_step_tokens = 0  # one output a step, one token each (not multi-step runs)
        heard: list[int] = []
        streamed: list[int] = []
        finishes: list[str | None] = []

        def on_output(out) -> bool:
            if out.finish_reason is not None:
                return False
            if failing and len(heard) == 3:
                raise RuntimeError("listener bug")
            heard.extend(out.token_ids)
            return True

        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.wait_ready()
            assert engine.listen("r", on_output)
            async for out in engine.generate("r", list(range(10, 30)), SamplingParams(max_tokens=8, ignore_eos=True)):
                streamed.extend(out.token_ids)
                finishes.append(out.finish_reason)
            tg.cancel_scope.cancel()
        return heard, streamed, finishes

    heard, streamed, finishes = anyio.run(main)
    assert len(heard) + len(streamed) == 8
    assert finishes[-1] == "length"
    if failing:
        assert len(heard) == 3 and len(finishes) == 5  # the rest, one output a token, through the stream
    else:
        assert len(heard) == 7 and finishes == ["length"]  # only the last output took the stream


def test_a_reply_stream_times_out_on_each_wait_with_one_timer() -> None:
    """One timer per stream, moved when it fires early: each wait still times out on time."""
    from shared.bus import BusTimeout, ReplyStream

    async def main() -> None:
        loop = asyncio.get_running_loop()
        s = ReplyStream("x", 16)
        loop.call_later(0.05, s._deliver, TokenChunk(request_id="r", index=0, token_ids=[1]))
        assert (await s.next(30.0)).token_ids == [1]  # a reply long before the deadline
        assert s._timer is not None  # left armed for 30 s: not made and cancelled per wait
        t0 = loop.time()
        with pytest.raises(BusTimeout):
            await s.next(0.2)  # a shorter wait re-arms for its own deadline
        assert 0.15 <= loop.time() - t0 < 5
        loop.call_later(0.05, s._deliver, TokenChunk(request_id="r", index=1, token_ids=[2]))
        assert (await s.next(0.2)).token_ids == [2]  # leaves the timer armed for ~0.2 s from here
        t0 = loop.time()
        with pytest.raises(BusTimeout):
            await s.next(0.5)  # that timer fires early, moves on to this wait's deadline
        assert 0.45 <= loop.time() - t0 < 5
        s.close()
        assert s._timer is None

    asyncio.run(main())


def test_urgent_replies_of_a_step_leave_with_the_engines_flush(tmp_path: Path) -> None:
    """With ``flushed_by_caller`` (the engine calls flush_urgent_now as each step's delivery
    ends), a step's first and last chunks leave at that call, middle tokens still wait for the
    interval, and a reply sent outside a step (an error from the request's task) still wakes run()."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()

    async def main() -> None:
        frontend = await Bus.connect(server.url, "frontend")
        worker = await Bus.connect(server.url, "worker")
        to = frontend.inbox.batch_subject
        a, b, z = frontend.inbox.open("a"), frontend.inbox.open("b"), frontend.inbox.open("z")
        batcher = ReplyBatcher(worker, interval=60.0)  # never due again within this test
        batcher.flushed_by_caller = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(batcher.run)
                # run()'s first flush (of anything) starts the interval
                batcher.send(to, TokenChunk(request_id="z", index=0, token_ids=[0]))
                with anyio.fail_after(10):
                    await z.next(5)
                batcher.send(to, TokenChunk(request_id="a", index=0, token_ids=[1]), in_step=True)
                batcher.send(to, TokenChunk(request_id="b", index=3, token_ids=[9]), in_step=True)  # middle
                assert batcher._urgent == {"a"}
                batcher.flush_urgent_now()
                assert not batcher._urgent and [r.request_id for r in batcher._pending[to]] == ["b"]
                with anyio.fail_after(10):
                    first_a = await a.next(5)
                batcher.send(to, TokenChunk(request_id="a", index=1, token_ids=[2], finish_reason="length"),
                             in_step=True)
                batcher.flush_urgent_now()
                with anyio.fail_after(10):
                    last_a = await a.next(5)
                assert not b.ready()
                batcher.send(to, GenerateError(request_id="b", code=500, message="boom"))  # not from a step
                with anyio.fail_after(10):
                    got_b = await _burst(b)
                tg.cancel_scope.cancel()
        finally:
            await worker.close()
            await frontend.close()
        assert decoded([first_a], generate_reply_decoder)[0].token_ids == [1]
        assert decoded([last_a], generate_reply_decoder)[0].finish_reason == "length"
        got = decoded(got_b, generate_reply_decoder)
        assert [type(r).__name__ for r in got] == ["TokenChunk", "GenerateError"] and got[0].token_ids == [9]

    try:
        anyio.run(main)
    finally:
        server.stop()
