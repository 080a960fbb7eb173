"""What the routers tell the planner: the new requests they place, per model, with the time each
report covers (shared/routing/traffic.py); over a real stack, the planner's identity hears them."""

from __future__ import annotations

import anyio
import httpx
import nats
import pytest

from shared import subjects
from shared.messages import (
    RouteDecision,
    RouteError,
    RouteRequest,
    TrafficReport,
    WorkerInfo,
    traffic_report_decoder,
)
from shared.routing.core import RouterCore, RoutingSettings
from shared.routing.traffic import TrafficCounter
from tests.procs import Stack
from tests.router.test_model_views import FakeView


def worker(worker_id: str, model: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role="decode", model=model, block_size=16,
                      generate_subject=f"gen.{worker_id}", cancel_subject=f"cancel.{worker_id}")


def test_the_router_counts_new_requests_it_placed_not_reroutes_nor_failures() -> None:
    core = RouterCore(RoutingSettings(), None, FakeView([worker("a0", "m-a"), worker("b0", "m-b")]))  # type: ignore[arg-type]
    placed = [RouteRequest(request_id="r1", model="m-a", token_ids=[1, 2, 3], max_tokens=10),
              RouteRequest(request_id="r2", model="m-a", token_ids=[4, 5], max_tokens=7),
              RouteRequest(request_id="r3", model="m-b", token_ids=[6], max_tokens=1)]
    for req in placed:
        assert isinstance(core.decide(req)[0], RouteDecision)
    # a migrated request (it names the worker that failed) is routed again, not counted again
    assert isinstance(core.decide(RouteRequest(request_id="r1", model="m-a", token_ids=[1, 2, 3, 9],
                                               exclude=["a0"], max_tokens=9))[0], RouteDecision)
    # a request nobody can serve is not placed
    assert isinstance(core.decide(RouteRequest(request_id="r4", model="m-x", token_ids=[1]))[0], RouteError)
    report = core.traffic.take(now=core.traffic._since + 0.5)
    assert report is not None and report.interval == pytest.approx(0.5)
    counts = {t.model: (t.requests, t.prompt_tokens, t.output_tokens) for t in report.models}
    assert counts == {"m-a": (2, 5, 17), "m-b": (1, 1, 1)}


def test_reports_cover_their_time_and_go_quiet_after_the_idle_tail() -> None:
    counter = TrafficCounter("r", interval=0.5, idle_tail=1.0)
    t0 = counter._since
    assert counter.take(now=t0 + 0.5) is None  # never busy: nothing to say
    counter.count(RouteRequest(request_id="a", model="m", token_ids=[1, 2], max_tokens=3))
    busy = counter.take(now=t0 + 1.0)
    assert busy is not None and busy.interval == pytest.approx(0.5) and busy.models[0].requests == 1
    # idle: empty reports for the tail, so the planner sees the rate fall, then silence
    tail = [counter.take(now=t0 + 1.0 + 0.5 * i) for i in range(1, 5)]
    assert [r is not None and r.models == [] for r in tail] == [True, True, False, False]
    assert tail[0] is not None and tail[0].interval == pytest.approx(0.5)


@pytest.mark.timeout(120)
def test_the_planner_hears_what_the_router_placed(stack: Stack) -> None:
    reports: list[TrafficReport] = []
    all_placed = anyio.Event()

    def placed() -> tuple[int, int]:
        mine = [t for r in reports for t in r.models if t.model == stack.model]
        return sum(t.requests for t in mine), sum(t.output_tokens for t in mine)

    async def main() -> None:
        # The planner's own identity: it may subscribe to the routers' reports.
        nc = await nats.connect(stack.nats.service_url, **stack.nats.connect_options("planner"))
        try:
            async def on_report(msg) -> None:
                reports.append(traffic_report_decoder.decode(msg.data))
                if placed()[0] >= 3:
                    all_placed.set()

            await nc.subscribe(subjects.TRAFFIC, cb=on_report)
            await nc.flush()
            async with httpx.AsyncClient(timeout=60) as client:
                for max_tokens in (3, 4, 5):
                    r = await client.post(f"{stack.url}/v1/completions", json={
                        "model": stack.model, "prompt": "count me", "max_tokens": max_tokens})
                    assert r.status_code == 200, r.text
            with anyio.fail_after(10):  # a report goes out every 0.5 s while the router is busy
                await all_placed.wait()
            assert placed() == (3, 12)
            assert all(r.interval > 0 and r.source for r in reports)
        finally:
            await nc.close()

    anyio.run(main)
