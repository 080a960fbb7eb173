"""The decode worker judges only what depends on it (model, vocabulary, context, duplicate id) and
answers with a GenerateError; the sampling fields are the frontend's to validate. Real nats-server,
real DecodeWorker with the mocker engine."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from nats.aio.msg import Msg

from services.decode.replies import RequestReplies
from services.decode.worker import REQUESTS, RUNNING, DecodeSettings, DecodeWorker
from shared.bus import Bus
from shared.discovery import WorkerView
from shared.engines import EngineConfig
from shared.messages import (
    Cancel,
    GenerateError,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
    encode,
    generate_reply_decoder,
    generate_request_decoder,
)
from tests.procs import with_bus

pytestmark = pytest.mark.timeout(60)


async def _ask(bus: Bus, worker: DecodeWorker, req: GenerateRequest) -> list:
    """``req``'s replies from ``worker``, up to its last chunk or an error."""
    inbox = bus.inbox.open(req.request_id)
    try:
        await bus.publish(worker.info().generate_subject, req, reply=inbox.subject)
        replies = []
        while True:
            got = await inbox.next(10)  # a batching worker's replies arrive decoded, one message's raw
            reply = generate_reply_decoder.decode(got.data) if isinstance(got, Msg) else got
            replies.append(reply)
            if isinstance(reply, GenerateError) or reply.finish_reason is not None:
                return replies
    finally:
        bus.inbox.close(req.request_id)


def _with_worker(tmp_path: Path, speedup: float, worker_id: str,
                 body: Callable[[Bus, DecodeWorker], Awaitable[None]]) -> None:
    """Run ``body`` against a real DecodeWorker (mocker engine) on a real nats-server, once the
    worker is registered."""
    async def main(bus: Bus, url: str) -> None:
        worker = DecodeWorker(DecodeSettings(nats_url=url, engine=EngineConfig(engine="mocker", speedup=speedup),
                                             worker_id=worker_id, discovery_ttl=3))
        view = WorkerView(bus, 3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(view.run)
            tg.start_soon(worker.run)
            with anyio.fail_after(20):
                await view.wait_for("decode", 1)
            await body(bus, worker)
            tg.cancel_scope.cancel()

    with_bus(tmp_path, main)


def test_decode_worker_answers_its_own_checks_and_serves_the_rest(tmp_path: Path) -> None:
    async def body(bus: Bus, worker: DecodeWorker) -> None:
        ok = SamplingParams(max_tokens=4, ignore_eos=True)
        wrong_model = await _ask(bus, worker, GenerateRequest(request_id="a", token_ids=[5, 6], model="other",
                                                              sampling=ok))
        assert isinstance(wrong_model[0], GenerateError) and wrong_model[0].code == 400
        assert "serves" in wrong_model[0].message
        vocab = worker.engine.vocab_size
        out_of_vocab = await _ask(bus, worker, GenerateRequest(request_id="b", token_ids=[5, vocab], sampling=ok))
        assert isinstance(out_of_vocab[0], GenerateError) and out_of_vocab[0].code == 400
        assert f"[0, {vocab})" in out_of_vocab[0].message
        served = await _ask(bus, worker, GenerateRequest(request_id="c", token_ids=[5, 6, 7], sampling=ok))
        assert all(isinstance(r, TokenChunk) for r in served)
        assert sum(len(r.token_ids) for r in served) == 4 and served[-1].usage is not None

    _with_worker(tmp_path, 100.0, "decode-checks", body)


def test_not_streamed_holds_exactly_what_streamed_sends(tmp_path: Path) -> None:
    """The worker holds a non-streamed request's tokens and logprobs as the steps deliver them
    (no task wake-up per step): its one chunk must equal the streamed chunks joined, at a
    near-free mocker whose decode steps run back to back."""
    sp = SamplingParams(max_tokens=24, ignore_eos=True, seed=3, logprobs=2, prompt_logprobs=1)
    prompt = list(range(5, 45))
    got: dict[str, list] = {}

    async def body(bus: Bus, worker: DecodeWorker) -> None:
        got["streamed"] = await _ask(bus, worker, GenerateRequest(request_id="s", token_ids=prompt, sampling=sp))
        got["whole"] = await _ask(bus, worker, GenerateRequest(request_id="w", token_ids=prompt, sampling=sp,
                                                               stream=False))

    _with_worker(tmp_path, 1e9, "decode-held", body)
    streamed, whole = got["streamed"], got["whole"]
    assert all(isinstance(r, TokenChunk) for r in streamed + whole), streamed + whole
    assert len(whole) == 1 and len(streamed) > 1
    [one] = whole
    assert one.index == 0 and one.token_ids == [t for c in streamed for t in c.token_ids]
    assert len(one.token_ids) == 24 and one.finish_reason == streamed[-1].finish_reason == "length"
    assert one.logprobs == [lp for c in streamed for lp in c.logprobs] and len(one.logprobs) == 24
    assert one.prompt_logprobs == streamed[0].prompt_logprobs and len(one.prompt_logprobs) == len(prompt) - 1
    assert one.usage == streamed[-1].usage and one.usage is not None and one.usage.completion_tokens == 24


def test_batched_replies_carry_what_single_replies_carry(tmp_path: Path) -> None:
    """To a batching frontend (``batch_reply``), the worker's listener sends every chunk, the last
    one included (with the usage), from the engine's step: the same chunks, joined, as without
    batching, streamed and not."""
    sp = SamplingParams(max_tokens=24, ignore_eos=True, seed=3, logprobs=2, prompt_logprobs=1)
    prompt = list(range(5, 45))
    got: dict[str, list] = {}

    async def body(bus: Bus, worker: DecodeWorker) -> None:
        batch = bus.inbox.batch_subject
        got["single"] = await _ask(bus, worker, GenerateRequest(request_id="s", token_ids=prompt, sampling=sp))
        got["batched"] = await _ask(bus, worker, GenerateRequest(request_id="b", token_ids=prompt, sampling=sp,
                                                                 batch_reply=batch))
        got["whole"] = await _ask(bus, worker, GenerateRequest(request_id="w", token_ids=prompt, sampling=sp,
                                                               stream=False, batch_reply=batch))

    _with_worker(tmp_path, 1e9, "decode-batched", body)

    def joined(chunks: list) -> tuple:
        assert all(isinstance(c, TokenChunk) for c in chunks), chunks
        return ([t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs],
                chunks[0].prompt_logprobs, chunks[-1].usage, chunks[-1].finish_reason)

    single = joined(got["single"])
    assert len(single[0]) == 24 and single[3] is not None and single[3].completion_tokens == 24
    assert joined(got["batched"]) == single
    assert len(got["whole"]) == 1 and joined(got["whole"]) == single


def test_a_cancel_before_the_request_task_starts_still_cancels_it(tmp_path: Path) -> None:
    """A plain request goes to the engine from the NATS read loop, before its task exists; a
    Cancel read in the same turn must still end it, its blocks freed."""

    async def body(bus: Bus, worker: DecodeWorker) -> None:
        req = GenerateRequest(request_id="c", token_ids=list(range(5, 40)),
                              sampling=SamplingParams(max_tokens=1000, ignore_eos=True),
                              batch_reply=bus.inbox.batch_subject)
        job = Msg(_client=bus.nc, subject=worker.info().generate_subject, reply="_INBOX.nobody", data=encode(req))
        cancel = Msg(_client=bus.nc, subject="cancel", data=encode(Cancel(request_id="c", reason="test")))
        cancelled = REQUESTS.labels(worker.role, "cancelled")
        before = cancelled._value.get()
        worker._on_generate(job)  # both in one turn: the request's task has not run yet
        assert "c" in worker._early and worker.engine.stats().waiting + worker.engine.stats().running == 1
        assert worker.in_flight == 1  # a drain now waits for it, though its task has not started
        worker._on_cancel(cancel)
        # Uncancelled, its 1,000 tokens would take seconds at this mocker speed.
        with anyio.fail_after(2):
            while worker._early or worker._scopes or worker.engine.stats().running:
                await anyio.sleep(0.01)  # the task starts in a cancelled scope, ends, and frees the request
        assert cancelled._value.get() == before + 1 and worker.in_flight == 0
        assert worker.engine.stats().kv_blocks_used == 0 and worker.engine.stats().waiting == 0

    _with_worker(tmp_path, 1.0, "decode-cancel-early", body)


def test_a_plain_request_to_a_batching_frontend_runs_without_a_task(tmp_path: Path) -> None:
    """One choice to a batching frontend: the engine's listener sends every reply and ends the
    request, so no task is started for it; the same request without batching gets its task. Either
    way it leaves nothing in flight, and its outcome is counted once."""
    served: list[str] = []
    sp = SamplingParams(max_tokens=12, ignore_eos=True)

    async def body(bus: Bus, worker: DecodeWorker) -> None:
        serve = worker._serve

        async def spy(msg: Msg, early: object = None) -> None:
            served.append(generate_request_decoder.decode(msg.data).request_id)
            await serve(msg, early)  # type: ignore[arg-type]

        worker._serve = spy  # type: ignore[method-assign]
        length = REQUESTS.labels(worker.role, "length")
        before = length._value.get()
        for rid, batch in (("tl-s", True), ("tl-w", True), ("task", False)):
            req = GenerateRequest(request_id=rid, token_ids=list(range(5, 30)), sampling=sp, stream=rid != "tl-w",
                                  batch_reply=bus.inbox.batch_subject if batch else "")
            replies = await _ask(bus, worker, req)
            assert all(isinstance(r, TokenChunk) for r in replies), replies
            assert sum(len(r.token_ids) for r in replies) == 12 and replies[-1].usage is not None
            with anyio.fail_after(2):
                while worker.in_flight:  # the task (if any) ends its request just after the last reply
                    await anyio.sleep(0.01)
            assert not worker._early and not worker._scopes
        assert length._value.get() == before + 3
        assert RUNNING.labels(worker.role)._value.get() == 0
        assert worker.engine.stats().running == worker.engine.stats().waiting == 0

    _with_worker(tmp_path, 1e9, "decode-taskless", body)
    assert served == ["task"]


def test_a_taskless_request_ends_on_its_deadline_an_engine_error_or_its_listener_failing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a task nothing else would end it: a deadline aborts it (nothing sent, as for a
    cancel), an engine error goes back as a GenerateError, and a failing listener sends a 500 and
    aborts it. Each time nothing stays in flight or in the engine."""

    async def idle(worker: DecodeWorker) -> None:
        with anyio.fail_after(2):
            while worker.in_flight or worker.engine.stats().running or worker.engine.stats().waiting:
                await anyio.sleep(0.01)
        assert not worker._early and worker.engine.stats().kv_blocks_used == 0

    async def body(bus: Bus, worker: DecodeWorker) -> None:
        batch = bus.inbox.batch_subject
        long = SamplingParams(max_tokens=1000, ignore_eos=True)  # seconds at this mocker speed
        cancelled = REQUESTS.labels(worker.role, "cancelled")
        before = cancelled._value.get()
        inbox = bus.inbox.open("late")
        await bus.publish(worker.info().generate_subject,
                          GenerateRequest(request_id="late", token_ids=list(range(5, 30)), sampling=long,
                                          batch_reply=batch, deadline=time.time() + 0.3), reply=inbox.subject)
        with anyio.fail_after(5):
            while cancelled._value.get() == before:
                await anyio.sleep(0.01)
        bus.inbox.close("late")
        await idle(worker)

        unknown = await _ask(bus, worker, GenerateRequest(request_id="lora", token_ids=[5, 6, 7], lora="nope",
                                                          sampling=long, batch_reply=batch))
        assert len(unknown) == 1 and isinstance(unknown[0], GenerateError) and unknown[0].code == 404, unknown
        await idle(worker)

        def broken(self: RequestReplies, out: object, c: int) -> TokenChunk:
            raise RuntimeError("shaping failed")

        monkeypatch.setattr(RequestReplies, "middle_chunk", broken)
        failed = await _ask(bus, worker, GenerateRequest(request_id="broken", token_ids=list(range(5, 30)),
                                                         sampling=long, batch_reply=batch))
        assert isinstance(failed[-1], GenerateError) and failed[-1].code == 500, failed
        assert "shaping failed" in failed[-1].message
        await idle(worker)

    _with_worker(tmp_path, 1.0, "decode-taskless-ends", body)
