"""The planner per model: limits per model, signals read per model, decisions carry their model,
and each model's connector is asked to scale only its own workers."""

from __future__ import annotations

import anyio
import pytest

from services.planner.policy import Damping, LoadPolicy, LoadThresholds, Stabilizer
from services.planner.service import ModelPool, Planner, PlannerSettings, parse_model_limits
from services.planner.signals import RoleSignals, Signals
from shared.messages import LoadReport, ModelTraffic, TrafficReport, WorkerInfo, encode
from tests.planner.test_planner_step import FakeConnector

pytestmark = pytest.mark.timeout(60)


class ModelView:
    """Discovery filtered by role and model, as WorkerView does."""

    def __init__(self, workers: list[WorkerInfo]) -> None:
        self._workers = workers

    def workers(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        return [w for w in self._workers if (role is None or w.role == role) and (not model or w.model == model)]


class FakeBus:
    class _Js:
        async def consumer_info(self, *_a, **_k):
            raise RuntimeError("no queue here")

    js = _Js()


def test_parse_model_limits() -> None:
    assert parse_model_limits(["a=1:4", " b = 0:2"]) == {"a": (1, 4), "b": (0, 2)}
    for bad in ("a", "a=1", "a=3:1", "=1:2", "a=x:2", "a=-1:2"):
        with pytest.raises(ValueError, match="name=min:max"):
            parse_model_limits([bad])


def planner_for_two_models() -> tuple[Planner, dict[str, FakeConnector]]:
    settings = PlannerSettings(limits={"decode": (1, 8), "prefill": (0, 0)}, model_limits={"big": (2, 3), "small": (1, 1)},
                               damping=Damping(up_intervals=1, down_intervals=1, up_cooldown=0, down_cooldown=0))
    conns = {m: FakeConnector() for m in ("big", "small")}
    pools = []
    for m in ("big", "small"):
        limits = settings.limits_for(m)
        pools.append(ModelPool(m, LoadPolicy(LoadThresholds(alpha=1.0)), conns[m],
                               Stabilizer(limits, settings.damping), limits))  # type: ignore[arg-type]
    p = Planner(settings, pools=pools)
    workers = [WorkerInfo(worker_id="big-0", role="decode", model="big"),
               WorkerInfo(worker_id="big-1", role="decode", model="big"),
               WorkerInfo(worker_id="small-0", role="decode", model="small")]
    p.view = ModelView(workers)  # type: ignore[assignment]
    p.bus = FakeBus()  # type: ignore[assignment]
    for pool in p.pools:
        pool.targets = p.initial(pool)
    return p, conns


def test_each_model_scales_within_its_own_limits() -> None:
    p, conns = planner_for_two_models()
    big, small = p.pools
    assert p.initial(big) == {"decode": 2, "prefill": 0} and p.initial(small) == {"decode": 1, "prefill": 0}
    # Both models are swamped: "big" may grow to its max of 3, "small" is pinned at 1.
    swamped = {m: Signals(timestamp=0, decode=RoleSignals(ready=n, waiting=40 * n), prefill=RoleSignals())
               for m, n in (("big", 2), ("small", 1))}
    made_big = anyio.run(p.step, swamped["big"], 0.0, big)
    made_small = anyio.run(p.step, swamped["small"], 0.0, small)
    assert [(d.model, d.role, d.before, d.after) for d in made_big] == [("big", "decode", 2, 3)]
    assert made_small == []
    assert conns["big"].calls == [("decode", 3, ["big-0", "big-1"])]  # only its own workers offered as victims
    assert conns["small"].calls == []
    assert big.targets == {"decode": 3, "prefill": 0} and small.targets == {"decode": 1, "prefill": 0}


def test_signals_are_read_per_model() -> None:
    p, _ = planner_for_two_models()
    big, small = p.pools
    p.loads["big-0"] = LoadReport(worker_id="big-0", role="decode", timestamp=0, running=3, waiting=7)
    p.loads["small-0"] = LoadReport(worker_id="small-0", role="decode", timestamp=0, running=1, waiting=0)

    class Msg:
        def __init__(self, data: bytes) -> None:
            self.data = data

    # One router's report: 2 requests of big, 1 of small, and one of a model no pool plans for.
    report = TrafficReport(source="router-1", interval=0.5, models=[
        ModelTraffic(model="big", requests=2, prompt_tokens=6, output_tokens=8),
        ModelTraffic(model="small", requests=1, prompt_tokens=3, output_tokens=4),
        ModelTraffic(model="other", requests=9, prompt_tokens=9, output_tokens=9)])
    anyio.run(p._on_traffic, Msg(encode(report)))
    anyio.run(p._on_traffic, Msg(b"\xc1 not a report"))  # ignored
    big.meter._last = small.meter._last = big.meter._last - 0.5  # the planner's interval: the report's
    obs_big, sig_big = anyio.run(p.observe, big)
    obs_small, sig_small = anyio.run(p.observe, small)
    assert (obs_big.model, obs_big.decode_workers, obs_big.decode_running, obs_big.decode_waiting) == ("big", 2, 3, 7)
    assert (obs_small.model, obs_small.decode_workers, obs_small.decode_running) == ("small", 1, 1)
    assert sig_big.traffic.requests == 2 and sig_small.traffic.requests == 1
    assert sig_big.traffic.prompt_tokens == 3 and sig_small.traffic.output_tokens == 4
