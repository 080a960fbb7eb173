"""The frontend's route hop: Bus.ask (the reply inbox's round trip) over a real nats-server answers,
times out, reports no responders and leaves nothing behind; route requests of one loop turn go
as one batch (shared/routing/client.py), and the router answers a batch in order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from nats.aio.msg import Msg

from baton.nats_server import EmbeddedNats
from services.router.service import BATCH_REQUESTS, Router, RouterSettings
from shared.bus import Bus, BusTimeout, NoResponders
from shared.messages import (
    RouteBatch,
    RouteBatchReply,
    RouteDecision,
    RouteError,
    RouteRequest,
    WorkerInfo,
    encode,
    route_batch_reply_decoder,
    route_message_decoder,
    route_reply_decoder,
    route_request_decoder,
)
from shared.routing.client import RouteClient
from shared.routing.core import RouterCore
from tests.router.test_model_views import FakeView

pytestmark = pytest.mark.timeout(60)


async def until_served(bus: Bus, subject: str) -> None:
    """Until a subscription made on another connection is seen by the server (a message sent at once
    can still meet no responders): probe until the answer is anything but that."""
    while True:
        try:
            await bus.ask(subject, RouteRequest(request_id="probe", model="m", token_ids=[]), 0.2)
        except NoResponders:
            continue
        except BusTimeout:
            pass
        return


def with_frontend_and_router(tmp_path: Path, body: Callable[[Bus, Bus], Awaitable[None]]) -> None:
    """Run ``body(frontend, router)``: two bus connections to a fresh nats-server, closed after."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()

    async def main() -> None:
        frontend = await Bus.connect(server.url, "frontend")
        router = await Bus.connect(server.url, "router")
        try:
            await body(frontend, router)
        finally:
            await frontend.close()
            await router.close()

    try:
        anyio.run(main, backend_options={"use_uvloop": True})
    finally:
        server.stop()


def test_ask_through_the_reply_inbox(tmp_path: Path) -> None:

    async def main(frontend: Bus, router: Bus) -> None:
        seen: list[Msg] = []

        async def answer(msg: Msg) -> None:
            seen.append(msg)
            req = route_request_decoder.decode(msg.data)
            await router.respond(msg, RouteDecision(worker_id=f"w-{req.request_id}", subject="s", cancel_subject="c"))

        with anyio.fail_after(10):
            # nobody listens yet: told at once, not after the timeout
            with pytest.raises(NoResponders):
                await frontend.ask("test.route", RouteRequest(request_id="r0", model="m", token_ids=[1]), 5.0)
            await router.subscribe("test.route", answer, queue="routers")
            await until_served(frontend, "test.route")
            seen.clear()
            # concurrent asks each get their own answer
            replies: dict[str, str] = {}

            async def one(i: int) -> None:
                msg = await frontend.ask("test.route", RouteRequest(request_id=f"r{i}", model="m", token_ids=[i]),
                                         5.0, headers={"traceparent": f"00-{i:032x}-{i:016x}-01"})
                reply = route_reply_decoder.decode(msg.data)
                assert isinstance(reply, RouteDecision)
                replies[f"r{i}"] = reply.worker_id

            async with anyio.create_task_group() as tg:
                for i in range(1, 21):
                    tg.start_soon(one, i)
            assert replies == {f"r{i}": f"w-r{i}" for i in range(1, 21)}
            assert seen[0].headers and seen[0].headers["traceparent"].startswith("00-")
            assert all(m.reply.startswith(frontend.inbox.batch_subject + ".ask-") for m in seen)
            # a subject that takes but never answers: a timeout
            async def ignore(msg: Msg) -> None:
                pass

            await router.subscribe("test.silent", ignore)
            await until_served(frontend, "test.silent")
            with pytest.raises(BusTimeout):
                await frontend.ask("test.silent", encode(RouteRequest(request_id="x", model="m", token_ids=[])),
                                   0.3)
            assert len(frontend.inbox) == 0  # every ask closed its slot

    with_frontend_and_router(tmp_path, main)


def test_route_requests_of_one_loop_turn_go_as_one_batch(tmp_path: Path) -> None:

    async def main(frontend: Bus, router: Bus) -> None:
        wire: list[RouteRequest | RouteBatch] = []
        knows_batches = True

        async def answer(msg: Msg) -> None:
            req = route_message_decoder.decode(msg.data)
            wire.append(req)
            if isinstance(req, RouteRequest):
                await router.respond(msg, decision_for(req))
            elif not knows_batches:  # an older router: a batch is undecodable to it
                await router.respond(msg, RouteError(code=400, message="undecodable route request"))
            else:
                await router.respond(msg, RouteBatchReply(replies=[decision_for(r) for r in req.requests]))

        await router.subscribe("test.route", answer)
        client = RouteClient(frontend, "test.route")

        async def ask(i: int, out: dict[str, str]) -> None:
            reply = await client.route(RouteRequest(request_id=f"r{i}", model="m", token_ids=[i]), 5.0)
            assert isinstance(reply, RouteDecision)
            out[f"r{i}"] = reply.worker_id

        with anyio.fail_after(20):
            await until_served(frontend, "test.route")
            wire.clear()
            # alone in its turn: a plain request, as before
            alone: dict[str, str] = {}
            await ask(0, alone)
            assert alone == {"r0": "w-r0"} and isinstance(wire[-1], RouteRequest)
            # 20 callers in one turn: one message each way, every caller its own answer
            wire.clear()
            got: dict[str, str] = {}
            async with anyio.create_task_group() as tg:
                for i in range(1, 21):
                    tg.start_soon(ask, i, got)
            assert got == {f"r{i}": f"w-r{i}" for i in range(1, 21)}
            assert len(wire) == 1 and isinstance(wire[0], RouteBatch) and len(wire[0].requests) == 20
            # the caller sending the batch leaves (its client hung up): the others still get answers
            got.clear()
            leader = anyio.CancelScope()

            async def lead() -> None:
                with leader:
                    await ask(100, {})

            wire.clear()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lead)  # starts first: it leads the batch
                for i in range(101, 105):
                    tg.start_soon(ask, i, got)
                await anyio.lowlevel.checkpoint()  # every one has joined; the leader waits out its turn
                leader.cancel()
            assert leader.cancelled_caught
            assert got == {f"r{i}": f"w-r{i}" for i in range(101, 105)}
            assert [len(m.requests) for m in wire if isinstance(m, RouteBatch)] == [4]  # asked anew, together
            # a router that knows no batches: asked one at a time, and batching stays off
            knows_batches = False
            wire.clear()
            got.clear()
            async with anyio.create_task_group() as tg:
                for i in range(200, 205):
                    tg.start_soon(ask, i, got)
            assert got == {f"r{i}": f"w-r{i}" for i in range(200, 205)}
            assert not client.batching and [type(m) for m in wire] == [RouteBatch] + [RouteRequest] * 5
            assert len(frontend.inbox) == 0

    with_frontend_and_router(tmp_path, main)


def decision_for(req: RouteRequest) -> RouteDecision:
    return RouteDecision(worker_id=f"w-{req.request_id}", subject="s", cancel_subject="c")


def test_the_router_answers_a_batch_in_order_each_decision_seeing_the_last() -> None:
    fleet = [WorkerInfo(worker_id=f"w{i}", role="decode", model="m", block_size=16, generate_subject=f"gen.w{i}",
                        cancel_subject=f"cancel.w{i}") for i in range(2)]
    router = Router(RouterSettings(mode="kv", seed=0))
    router.core = RouterCore(router.settings, None, FakeView(fleet), router.policy)  # type: ignore[arg-type]
    sent: list[bytes] = []

    class FakeBus:
        async def respond(self, msg: object, reply: object) -> None:
            sent.append(encode(reply))

    router.bus = FakeBus()  # type: ignore[assignment]
    prompt = list(range(64))
    batch = RouteBatch(requests=[RouteRequest(request_id=f"r{i}", model="m", token_ids=prompt) for i in range(4)]
                       + [RouteRequest(request_id="x", model="other", token_ids=prompt)])

    class FakeMsg:
        data = encode(batch)
        headers = None
        reply = "inbox"

    before = BATCH_REQUESTS._sum.get()
    anyio.run(router._on_route, FakeMsg())
    assert BATCH_REQUESTS._sum.get() == before + 5
    reply = route_batch_reply_decoder.decode(sent[0])
    assert isinstance(reply, RouteBatchReply) and len(reply.replies) == 5
    placed = [r.worker_id for r in reply.replies[:4] if isinstance(r, RouteDecision)]
    # Each decision saw the ones before it recorded: the first goes somewhere, the identical
    # prompts after it follow its predicted blocks or balance the predicted load; never all blind.
    assert len(placed) == 4 and set(placed) <= {"w0", "w1"}
    assert router.core.kv is not None and router.core.kv.predicted  # the batch's decisions were recorded
    assert isinstance(reply.replies[4], RouteError) and reply.replies[4].code == 503


def test_a_router_behind_the_frontends_view_is_asked_again(tmp_path: Path) -> None:
    """The router service says no worker serves the model while the frontend's own view has one
    (the router has just started, or the worker has just registered): the frontend asks again
    instead of failing the request. When its view has none either, the 503 stands at once."""
    from services.frontend.generation import Generation, GenerationSettings
    from services.frontend.openai_api import RequestError
    from shared.subjects import ROUTE

    async def main(frontend: Bus, router: Bus) -> None:
        asked: list[str] = []
        behind = 0  # answers left that say no worker serves the model

        async def answer(msg: Msg) -> None:
            nonlocal behind
            req = route_message_decoder.decode(msg.data)
            assert isinstance(req, RouteRequest)
            asked.append(req.request_id)
            if behind > 0:
                behind -= 1
                await router.respond(msg, RouteError(code=503, message=f"no decode worker serves {req.model!r}"))
            else:
                await router.respond(msg, decision_for(req))

        await router.subscribe(ROUTE, answer)
        with anyio.fail_after(20):
            await until_served(frontend, ROUTE)
            behind, asked[:] = 2, []  # the router's next two answers: no worker yet
            fleet: set[str] = {"m"}
            gen = Generation(frontend, None, "m", GenerationSettings(route_attempts=3),  # type: ignore[arg-type]
                             fleet_serves=fleet.__contains__)
            decision = await gen._route("r1", [1, 2, 3], [])
            assert decision.worker_id == "w-r1" and asked == ["r1"] * 3
            # the frontend sees no worker either: one ask, and the router's 503 is the answer
            fleet.clear()
            behind, asked[:] = 2, []
            with pytest.raises(RequestError) as raised:
                await gen._route("r2", [1, 2, 3], [])
            assert raised.value.status == 503 and asked == ["r2"]
            # behind for longer than the attempts: the last answer stands
            fleet.add("m")
            behind, asked[:] = 5, []
            with pytest.raises(RequestError):
                await gen._route("r3", [1, 2, 3], [])
            assert asked == ["r3"] * 3

    with_frontend_and_router(tmp_path, main)
