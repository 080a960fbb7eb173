"""Route leases (shared/routing/lease.py): the router service grants round-robin and random decisions
ahead, and a frontend uses them without a route hop per request.

- The router's side (RouterCore.lease): a slice of its own rotation, each worker named once; a
  KV-aware policy, a router with leases off, and a model without workers refuse.
- The frontend's side over a real nats-server: nothing held at first (the caller asks per request),
  then the granted decisions in the router's order; a failed worker is forgotten; an expired lease
  is not used; a router that refuses leases is asked per request; the placed requests are counted.
- End to end, real processes: sequential requests through the router service mostly skip the route
  hop, and round-robin still alternates the two workers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
from nats.aio.msg import Msg

from shared.bus import Bus
from shared.messages import RouteError, RouteLease, RouteLeaseRequest, WorkerInfo, route_message_decoder
from shared.routing.core import RouterCore, RoutingSettings
from shared.routing.lease import RouteLeases
from tests.procs import Stack, running
from tests.router.test_model_views import FakeView
from tests.router.test_route_hop import with_frontend_and_router

pytestmark = pytest.mark.timeout(120)


def fleet(n: int, model: str = "m") -> list[WorkerInfo]:
    return [WorkerInfo(worker_id=f"w{i}", role="decode", model=model, block_size=16, generate_subject=f"gen.w{i}",
                       cancel_subject=f"cancel.w{i}") for i in range(n)]


def core(mode: str = "round-robin", workers: list[WorkerInfo] | None = None, **settings: float) -> RouterCore:
    return RouterCore(RoutingSettings(mode=mode, seed=0, **settings), None,  # type: ignore[arg-type]
                      FakeView(fleet(3) if workers is None else workers))


def test_a_lease_is_a_slice_of_the_routers_rotation() -> None:
    c = core()
    lease = c.lease(RouteLeaseRequest(model="m", count=7))
    assert isinstance(lease, RouteLease) and lease.ttl == 1.0
    assert [w.worker_id for w in lease.workers] == ["w0", "w1", "w2"]  # each named once
    assert [lease.workers[i].worker_id for i in lease.order] == ["w0", "w1", "w2", "w0", "w1", "w2", "w0"]
    assert lease.workers[1].subject == "gen.w1" and lease.workers[1].cancel_subject == "cancel.w1"
    # the rotation goes on from where the lease left it, for leases and single decisions alike
    nxt = c.lease(RouteLeaseRequest(model="m", count=2))
    assert isinstance(nxt, RouteLease) and [nxt.workers[i].worker_id for i in nxt.order] == ["w1", "w2"]
    # random: any of the model's workers, never another model's
    mixed = core("random", [*fleet(2), WorkerInfo(worker_id="x0", role="decode", model="other", block_size=16,
                                                  generate_subject="gen.x0", cancel_subject="cancel.x0")])
    lease = mixed.lease(RouteLeaseRequest(model="m", count=50))
    assert isinstance(lease, RouteLease) and len(lease.order) == 50
    assert {w.worker_id for w in lease.workers} == {"w0", "w1"}


def test_who_refuses_a_lease() -> None:
    for refused, code in [
        (core("kv").lease(RouteLeaseRequest(model="m", count=4)), 409),  # reads the prompt
        (core(lease_ttl=0).lease(RouteLeaseRequest(model="m", count=4)), 409),  # leases off
        (core(workers=[]).lease(RouteLeaseRequest(model="m", count=4)), 503),  # nobody serves it
        (core().lease(RouteLeaseRequest(model="m", count=0)), 400),
    ]:
        assert isinstance(refused, RouteError) and refused.code == code, refused
    huge = core().lease(RouteLeaseRequest(model="m", count=10**6))
    assert isinstance(huge, RouteLease) and len(huge.order) == 1024  # capped


def test_the_frontend_uses_a_lease_in_order_and_forgets_failed_workers(tmp_path: Path) -> None:
    router_core = core(lease_ttl=0.5)
    asked: list[RouteLeaseRequest] = []
    state = {"answer": "lease"}

    async def main(frontend: Bus, router: Bus) -> None:
        async def answer(msg: Msg) -> None:
            req = route_message_decoder.decode(msg.data)
            assert isinstance(req, RouteLeaseRequest)
            asked.append(req)
            reply = {"lease": lambda: router_core.lease(req),
                     "no worker": lambda: RouteError(code=503, message="no decode worker"),
                     "per request": lambda: RouteError(code=409, message="decides per request")}[state["answer"]]()
            await router.respond(msg, reply)

        await router.subscribe("test.route", answer)
        await router.nc.flush()
        leases = RouteLeases(frontend, "test.route", timeout=5.0)

        async def until(condition: Callable[[], bool]) -> None:
            while not condition():
                await anyio.sleep(0.005)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(leases.run)
                # nothing held yet: ask per request; and three requests are too few to lease for
                assert [leases.take("m", 10, 5) for _ in range(3)] == [None] * 3
                assert not leases._wanted
                # eight in a moment (16 a second): worth a lease of half a second's worth
                assert [leases.take("m", 10, 5) for _ in range(5)] == [None] * 5
                await until(lambda: leases.leases == 1)
                assert asked == [RouteLeaseRequest(model="m", count=8)]
                got = [leases.take("m", 10, 5) for _ in range(4)]
                assert [d.worker_id for d in got if d is not None] == ["w0", "w1", "w2", "w0"]
                # half used: the next lease is asked for in the background and queued behind
                await until(lambda: leases.leases == 2)
                leases.forget("m", "w2")  # a request just failed there
                more = [leases.take("m", 10, 5) for _ in range(6)]
                assert [d.worker_id for d in more if d is not None] == ["w1", "w0", "w1", "w0", "w1", "w0"]
                assert 4 <= asked[1].count <= 16  # at most twice the last lease, whatever the burst
                report = leases.traffic.take()  # each request placed from a lease, counted once
                assert report is not None and [(t.requests, t.prompt_tokens, t.output_tokens)
                                               for t in report.models] == [(10, 100, 50)]
                # an expired lease is not used
                state["answer"] = "no worker"
                await anyio.sleep(0.6)
                asks = len(asked)
                assert leases.take("m", 1, 1) is None
                await until(lambda: len(asked) > asks and not leases._wanted)  # "no worker": retry later
                # a router that decides per request: asked per request from then on, and not pestered
                state["answer"] = "per request"
                await anyio.sleep(0.6)  # past the retry delay of the "no worker" answers
                asks = len(asked)
                assert [leases.take("m", 1, 1) for _ in range(10)] == [None] * 10
                await until(lambda: len(asked) > asks and not leases._wanted)
                asks = len(asked)
                assert all(leases.take("m", 1, 1) is None for _ in range(20))
                await anyio.sleep(0.05)
                assert len(asked) == asks
                tg.cancel_scope.cancel()

    with_frontend_and_router(tmp_path, main)


def router_metric(s: Stack, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{s.metrics_ports['router-0']}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_requests_skip_the_route_hop_and_still_alternate_workers(tmp_path: Path) -> None:
    stack = Stack(tmp_path, "mocker", decode_workers=2, metrics=True,
                  extra_decode_args=["--mocker-speedup", "1000"])
    with running(stack) as s, httpx.Client(timeout=30) as client:
        served: list[str] = []
        for i in range(40):
            with client.stream("POST", f"{s.url}/v1/completions", json={
                    "model": s.model, "prompt": f"lease {i}", "max_tokens": 2, "stream": True}) as r:
                assert r.status_code == 200, r.read()
                assert r.read().rstrip().endswith(b"data: [DONE]")
                served.append(r.headers["x-baton-worker"])
        counts = sorted(served.count(w) for w in set(served))
        assert len(counts) == 2 and counts[1] - counts[0] <= 4, served
        asked = router_metric(s, "baton_router_route_batch_requests_count")
        leased = router_metric(s, "baton_router_leased_decisions_total")
        assert asked < 10 and leased >= 30, (asked, leased)


def test_a_worker_killed_under_leased_load_costs_no_request(tmp_path: Path) -> None:
    """Eight clients keep a steady stream of requests going (so the frontend holds leases naming both
    workers); one worker is SIGKILLed: every request still completes, on the survivor from then on."""
    stack = Stack(tmp_path, "mocker", decode_workers=2, metrics=True, discovery_ttl=3.0,
                  decode_ids=["decode-a", "decode-b"], extra_decode_args=["--mocker-speedup", "50"])
    with running(stack) as s:
        done: list[tuple[int, str, bool]] = []  # (status, worker, whole stream)
        stop = anyio.Event()

        async def client(c: httpx.AsyncClient, i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                async with c.stream("POST", f"{s.url}/v1/completions", json={
                        "model": s.model, "prompt": f"client {i} request {n}", "max_tokens": 8,
                        "stream": True}) as r:
                    body = await r.aread()
                    done.append((r.status_code, r.headers.get("x-baton-worker", ""),
                                 body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in body))

        async def until(count: int) -> None:
            while len(done) < count:
                await anyio.sleep(0.01)

        async def main() -> None:
            async with httpx.AsyncClient(timeout=60) as c, anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(client, c, i)
                with anyio.fail_after(60):
                    await until(60)
                    assert router_metric(s, "baton_router_leased_decisions_total") > 0
                    s.kill(s.decoders[0])
                    killed_at = len(done)
                    await until(killed_at + 150)
                stop.set()

        anyio.run(main)
        assert all(status == 200 and whole for status, _, whole in done), [d for d in done if not d[2]][:5]
        assert {w for _, w, _ in done[:60]} == {"decode-a", "decode-b"}
        assert {w for _, w, _ in done[-40:]} == {"decode-b"}
