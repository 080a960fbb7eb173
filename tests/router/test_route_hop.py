"""The frontend's route hop over a real nats-server: Bus.ask (the reply inbox's round trip)
answers, times out, reports no responders, and leaves nothing behind in the inbox."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from nats.aio.msg import Msg

from baton.nats_server import EmbeddedNats
from shared.bus import Bus, BusTimeout, NoResponders
from shared.messages import RouteDecision, RouteRequest, encode, route_reply_decoder, route_request_decoder

pytestmark = pytest.mark.timeout(60)


def test_ask_through_the_reply_inbox(tmp_path: Path) -> None:
    server = EmbeddedNats(data_dir=tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()

    async def main() -> None:
        frontend = await Bus.connect(server.url, "frontend")
        router = await Bus.connect(server.url, "router")
        seen: list[Msg] = []

        async def answer(msg: Msg) -> None:
            seen.append(msg)
            req = route_request_decoder.decode(msg.data)
            await router.respond(msg, RouteDecision(worker_id=f"w-{req.request_id}", subject="s", cancel_subject="c"))

        try:
            with anyio.fail_after(10):
                # nobody listens yet: told at once, not after the timeout
                with pytest.raises(NoResponders):
                    await frontend.ask("test.route", RouteRequest(request_id="r0", model="m", token_ids=[1]), 5.0)
                await router.subscribe("test.route", answer, queue="routers")
                await router.nc.flush()
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
                await router.nc.flush()
                with pytest.raises(BusTimeout):
                    await frontend.ask("test.silent", encode(RouteRequest(request_id="x", model="m", token_ids=[])),
                                       0.3)
                assert len(frontend.inbox) == 0  # every ask closed its slot
        finally:
            await frontend.close()
            await router.close()

    try:
        anyio.run(main, backend_options={"use_uvloop": True})
    finally:
        server.stop()
