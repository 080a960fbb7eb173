"""Session affinity units: a session stays on its worker while that worker is live and has room,
moves when it is gone, excluded or full, and the table forgets idle sessions."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from shared.messages import LoadReport, RouteDecision, RouteRequest, WorkerInfo
from shared.routing.affinity import SessionAffinity
from shared.routing.core import RouterCore, RoutingSettings
from shared.subjects import LOAD_ALL


def worker(i: int) -> WorkerInfo:
    return WorkerInfo(worker_id=f"w{i}", role="decode", model="m", generate_subject=f"gen.w{i}",
                      cancel_subject=f"cancel.w{i}")


W = [worker(i) for i in range(3)]


def test_kept_while_live_and_not_full_then_moved() -> None:
    aff = SessionAffinity(ttl=60)
    assert aff.pinned("s", W, now=0) is None  # new
    aff.remember("s", "w1", now=0)
    assert aff.pinned("s", W, now=1) is W[1]
    assert aff.pinned("s", [W[0], W[2]], now=1) is None  # w1 gone (or excluded)
    aff.on_load(LoadReport(worker_id="w1", role="decode", timestamp=0, waiting=2), now=2)
    assert aff.pinned("s", W, now=3) is None  # full: requests wait in its engine
    assert aff.pinned("s", W, now=8) is W[1]  # that report is stale now
    aff.on_load(LoadReport(worker_id="w1", role="decode", timestamp=0, waiting=0), now=9)
    assert aff.pinned("s", W, now=9) is W[1]


def test_sessions_expire_and_the_table_is_bounded() -> None:
    aff = SessionAffinity(ttl=10, max_sessions=3)
    aff.remember("a", "w0", now=0)
    assert aff.pinned("a", W, now=9.9) is W[0]
    assert aff.pinned("a", W, now=10.1) is None
    for i, s in enumerate("bcde"):
        aff.remember(s, "w0", now=20 + i)
    assert len(aff) == 3 and aff.pinned("b", W, now=24) is None  # the least recently used went


class _View:
    def __init__(self, workers: list[WorkerInfo]) -> None:
        self.live = workers

    def workers(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        return list(self.live)


def test_router_core_keeps_a_conversation_and_moves_it_when_its_worker_dies() -> None:
    view = _View(list(W))
    core = RouterCore(RoutingSettings(mode="round-robin", session_ttl=60), bus=None, view=view)  # type: ignore[arg-type]

    def route(session: str) -> str:
        reply, _ = core.decide(RouteRequest(request_id="r", model="m", token_ids=[1, 2], session_id=session))
        assert isinstance(reply, RouteDecision)
        return reply.worker_id

    first = route("conv")
    assert [route("conv") for _ in range(5)] == [first] * 5
    others = {route("") for _ in range(3)}  # without a session round-robin goes on as before
    assert len(others) == 3
    view.live = [w for w in W if w.worker_id != first]
    moved = route("conv")
    assert moved != first
    assert [route("conv") for _ in range(3)] == [moved] * 3




def test_a_round_robin_router_follows_load_reports_only_once_sessions_appear() -> None:
    """Load reports (up to 20 a second per busy worker) matter to a round-robin router only for
    session affinity: it subscribes to them at the first request with a session id."""
    subscribed: list[str] = []

    class _Sub:
        async def unsubscribe(self) -> None:
            pass

    class _Bus:
        async def subscribe(self, subject: str, cb: object, queue: str = "") -> _Sub:
            subscribed.append(subject)
            return _Sub()

        async def publish(self, subject: str, msg: object) -> None:
            pass

    core = RouterCore(RoutingSettings(mode="round-robin", session_ttl=60), bus=_Bus(), view=_View(list(W)))  # type: ignore[arg-type]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(core.run)
            await core.started.wait()
            core.decide(RouteRequest(request_id="a", model="m", token_ids=[1]))
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            assert subscribed == []  # no session yet: no load reports
            core.decide(RouteRequest(request_id="b", model="m", token_ids=[1], session_id="conv"))
            with anyio.fail_after(5):
                while subscribed != [LOAD_ALL]:
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()

    anyio.run(main)
