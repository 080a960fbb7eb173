"""Units of the route/migrate loop in :class:`Generation`, with a fake bus.

The fake stands in for NATS only: routing answers come from a scripted router, jobs go to
scripted workers that put their chunks into the real :class:`ReplyStream` the frontend reads,
and liveness probes are answered while a worker is alive. Everything else (the loop, its
timeouts, the text stream) is the real code.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from services.frontend.generation import Generation, GenerationSettings
from services.frontend.openai_api import RequestError
from services.frontend.request import TextOptions, ValidatedRequest
from services.frontend.text_stream import Delta
from shared import subjects
from shared.bus import NO_RESPONDERS, BusTimeout, NoResponders, ReplyStream
from shared.messages import (
    Cancel,
    GenerateRequest,
    RouteDecision,
    RouteError,
    RouteRequest,
    SamplingParams,
    StatusReply,
    TokenChunk,
    Usage,
    encode,
    generate_request_decoder,
    route_request_decoder,
)

PROMPT = [1, 2, 3]


@dataclass
class Msg:
    data: bytes
    headers: dict[str, str] | None = None
    subject: str = ""


class FakeTokenizer:
    """Token id i is the character chr(ord('a') + i % 26)."""

    vocab_size = 256

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def detokenizer(self, skip_special_tokens: bool = True) -> Any:
        from shared.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)  # type: ignore[arg-type]


# A worker's script: called with the job and the stream to answer on; it may deliver chunks.
Script = Callable[[GenerateRequest, ReplyStream], None]


@dataclass
class Worker:
    worker_id: str
    script: Script
    alive: bool = True
    jobs: list[GenerateRequest] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)


class FakeInbox:
    batch_subject = ""  # the scripted workers answer one message per reply

    def __init__(self) -> None:
        self.streams: dict[str, ReplyStream] = {}

    def open(self, token: str) -> ReplyStream:
        self.streams[token] = ReplyStream(f"_INBOX.{token}", 4096)
        return self.streams[token]

    def close(self, token: str) -> None:
        self.streams.pop(token, None)


class FakeBus:
    """Routes to the first live worker not excluded (503 when none); delivers jobs to scripts."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = {w.worker_id: w for w in workers}
        self.inbox = FakeInbox()
        self.connected = True
        self.routes: list[RouteRequest] = []

    async def wait_connected(self, timeout: float = 1.5) -> bool:
        return self.connected

    async def request(self, subject: str, msg: Any, timeout: float, headers: dict[str, str] | None = None) -> Msg:
        if subject == subjects.ROUTE:
            req = route_request_decoder.decode(encode(msg))
            self.routes.append(req)
            for w in self.workers.values():
                if w.worker_id not in req.exclude:
                    return Msg(encode(RouteDecision(worker_id=w.worker_id, subject=f"gen.{w.worker_id}",
                                                    cancel_subject=f"cancel.{w.worker_id}")))
            return Msg(encode(RouteError(code=503, message="no worker for this model")))
        for w in self.workers.values():
            if subject == subjects.status(w.worker_id):
                if not w.alive:
                    raise NoResponders(subject)
                known = [rid for rid in msg.request_ids if w.jobs]
                return Msg(encode(StatusReply(worker_id=w.worker_id, known=known)))
        raise BusTimeout(subject)

    async def ask(self, subject: str, msg: Any, timeout: float, headers: dict[str, str] | None = None) -> Msg:
        return await self.request(subject, msg, timeout, headers)  # the route hop's cheaper round trip

    def publish_soon(self, subject: str, msg: Any, reply: str = "") -> bool:
        return False  # every job through publish(), which hands it to its worker's script

    async def publish(self, subject: str, msg: Any, reply: str = "", headers: dict[str, str] | None = None) -> None:
        for w in self.workers.values():
            if subject == f"gen.{w.worker_id}":
                job = generate_request_decoder.decode(encode(msg))
                w.jobs.append(job)
                w.script(job, self.inbox.streams[job.request_id])
            elif subject == f"cancel.{w.worker_id}":
                w.cancels.append(msg)


def chunk(job: GenerateRequest, tokens: list[int], finish: str | None = None, prompt_len: int = len(PROMPT),
          done_before: int = 0) -> Msg:
    usage = Usage(prompt_tokens=prompt_len, completion_tokens=done_before + len(tokens)) if finish else None
    return Msg(encode(TokenChunk(request_id=job.request_id, index=0, token_ids=tokens, finish_reason=finish,
                                 usage=usage)))


def request(max_tokens: int = 5, stops: list[str] | None = None, n: int = 1) -> ValidatedRequest:
    return ValidatedRequest(request_id="r1", token_ids=list(PROMPT), stream=True, text=TextOptions(stops or []),
                            sampling=SamplingParams(max_tokens=max_tokens, min_tokens=3, n=n))


def generation(bus: FakeBus) -> Generation:
    settings = GenerationSettings(probe_interval=0.02, probe_timeout=0.1, route_attempts=1)
    return Generation(bus, FakeTokenizer(), "m", settings)  # type: ignore[arg-type]


async def collect(gen: Generation, req: ValidatedRequest) -> list[Delta]:
    out: list[Delta] = []
    with anyio.fail_after(10):
        async with aclosing(gen.run(req)) as deltas:
            async for d in deltas:
                out.append(d)
    return out


def test_worker_dying_mid_stream_resumes_elsewhere_with_the_tokens_so_far() -> None:
    def dies_after_two(job: GenerateRequest, stream: ReplyStream) -> None:
        stream._deliver(chunk(job, [10, 11]))
        w1.alive = False  # then silence, and no answer to the liveness probe

    def finishes(job: GenerateRequest, stream: ReplyStream) -> None:
        stream._deliver(chunk(job, [12, 13, 14], "length", prompt_len=len(job.token_ids), done_before=2))

    w1, w2 = Worker("w1", dies_after_two), Worker("w2", finishes)
    bus = FakeBus([w1, w2])
    deltas = anyio.run(collect, generation(bus), request())
    assert [t for d in deltas for t in d.token_ids] == [10, 11, 12, 13, 14]
    assert "".join(d.text for d in deltas) == "klmno"
    assert [d.worker_id for d in deltas] == ["w1", "w2"]
    final = deltas[-1]
    assert final.finish_reason == "length"
    assert final.usage == Usage(prompt_tokens=3, completion_tokens=5)  # the caller's prompt, all tokens
    # The resumed job: the prompt plus what was generated, the budgets shrunk by as much.
    (resumed,) = w2.jobs
    assert resumed.token_ids == [*PROMPT, 10, 11]
    assert resumed.sampling.max_tokens == 3 and resumed.sampling.min_tokens == 1
    assert bus.routes[1].exclude == ["w1"] and bus.routes[1].token_ids == [*PROMPT, 10, 11]
    assert [c.reason for c in w1.cancels] == ["migrated"]
    assert w2.cancels == []  # it finished the request itself


def test_no_responders_on_the_job_migrates_at_once() -> None:
    def gone(job: GenerateRequest, stream: ReplyStream) -> None:
        stream._deliver(Msg(b"", {"Status": NO_RESPONDERS}))

    def finishes(job: GenerateRequest, stream: ReplyStream) -> None:
        stream._deliver(chunk(job, [4], "stop"))

    w1, w2 = Worker("w1", gone), Worker("w2", finishes)
    deltas = anyio.run(collect, generation(FakeBus([w1, w2])), request())
    assert [d.token_ids for d in deltas] == [[4]] and deltas[-1].worker_id == "w2"
    assert w2.jobs[0].token_ids == PROMPT  # nothing generated yet: the job is the same


def test_no_worker_is_a_503() -> None:
    with pytest.raises(RequestError) as e:
        anyio.run(collect, generation(FakeBus([])), request())
    assert e.value.status == 503 and e.value.code == "no_worker"


def test_every_worker_failing_is_a_503_naming_the_reason() -> None:
    def dies(job: GenerateRequest, stream: ReplyStream) -> None:
        stream._deliver(chunk(job, [], "abort"))

    workers = [Worker(f"w{i}", dies) for i in range(6)]
    with pytest.raises(RequestError) as e:
        anyio.run(collect, generation(FakeBus(workers)), request())
    assert e.value.status == 503 and e.value.code == "no_worker" and "worker abort" in e.value.message
    assert sum(len(w.jobs) for w in workers) == GenerationSettings().max_migrations + 1


def test_n_above_one_is_not_resumed_after_tokens() -> None:
    def dies_after_one(job: GenerateRequest, stream: ReplyStream) -> None:
        stream._deliver(chunk(job, [7]))
        w1.alive = False

    w1, w2 = Worker("w1", dies_after_one), Worker("w2", slow_worker)
    with pytest.raises(RequestError) as e:
        anyio.run(collect, generation(FakeBus([w1, w2])), request(n=2))
    assert e.value.status == 503 and "n > 1" in e.value.message
    assert w2.jobs == []


def slow_worker(job: GenerateRequest, stream: ReplyStream) -> None:
    stream._deliver(chunk(job, [1]))  # then keeps the request (alive, answers probes) but is slow


def test_caller_leaving_cancels_the_request_on_the_worker() -> None:
    w1 = Worker("w1", slow_worker)

    async def main() -> None:
        async with aclosing(generation(FakeBus([w1])).run(request())) as deltas:
            async for _ in deltas:
                break  # the caller reads one delta and goes

    anyio.run(main)
    assert [c.reason for c in w1.cancels] == ["caller left"]


def test_cancelling_the_caller_task_cancels_the_request_on_the_worker() -> None:
    w1 = Worker("w1", slow_worker)
    got: list[Delta] = []

    async def main() -> None:
        with anyio.move_on_after(0.2):  # a caller cancelled while the worker is quiet
            async with aclosing(generation(FakeBus([w1])).run(request())) as deltas:
                async for d in deltas:
                    got.append(d)

    anyio.run(main)
    assert len(got) == 1
    assert [c.reason for c in w1.cancels] == ["caller left"]


def test_a_stop_string_stops_the_worker() -> None:
    def streams(job: GenerateRequest, stream: ReplyStream) -> None:
        for t in (0, 1, 2, 3):  # "abcd"
            stream._deliver(chunk(job, [t]))

    w1 = Worker("w1", streams)
    deltas = anyio.run(collect, generation(FakeBus([w1])), request(max_tokens=10, stops=["bc"]))
    assert "".join(d.text for d in deltas) == "a" and deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None
    assert [c.reason for c in w1.cancels] == ["stop string"]
