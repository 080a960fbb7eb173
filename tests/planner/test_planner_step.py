"""The planner's decision round without NATS: dry-run reports, acting calls the connector with the
least loaded workers first, a failing connector is survived; and ``baton profile`` end to end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from services.planner.policy import Damping, LoadPolicy, LoadThresholds
from services.planner.profile import WorkerProfile
from services.planner.service import Planner, PlannerSettings
from services.planner.signals import Role, RoleSignals, Signals
from shared.messages import LoadReport, WorkerInfo

pytestmark = pytest.mark.timeout(60)


class FakeConnector:
    name = "fake"

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, int, list[str]]] = []
        self.fail = fail

    async def start(self, initial: Mapping[Role, int]) -> dict[Role, int | None]:
        return dict(initial)

    async def scale(self, role: Role, replicas: int, victims: Sequence[WorkerInfo]) -> None:
        self.calls.append((role, replicas, [v.worker_id for v in victims]))
        if self.fail:
            raise RuntimeError("cluster says no")

    async def reconcile(self) -> None:
        return None

    async def close(self) -> None:
        return None


class FakeView:
    def __init__(self, workers: list[WorkerInfo]) -> None:
        self._workers = workers

    def workers(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        return [w for w in self._workers if role is None or w.role == role]


def planner(dry_run: bool = False, connector: FakeConnector | None = None) -> Planner:
    settings = PlannerSettings(limits={"decode": (1, 4), "prefill": (0, 2)}, initial={"decode": 3, "prefill": 0},
                               damping=Damping(up_intervals=1, down_intervals=1, up_cooldown=0, down_cooldown=0),
                               dry_run=dry_run)
    p = Planner(settings, LoadPolicy(LoadThresholds(alpha=1.0)), connector or FakeConnector())
    p.targets = p.initial()
    workers = [WorkerInfo(worker_id=f"decode-{i}", role="decode", model="m", started_at=i) for i in range(3)]
    p.view = FakeView(workers)  # type: ignore[assignment]
    # decode-1 is idle, decode-0 holds 2 requests, decode-2 holds 5.
    for wid, running in (("decode-0", 2), ("decode-1", 0), ("decode-2", 5)):
        p.loads[wid] = LoadReport(worker_id=wid, role="decode", timestamp=0, running=running)
    return p


def idle(ready: int = 3) -> Signals:
    return Signals(timestamp=0, decode=RoleSignals(ready=ready), prefill=RoleSignals())


def test_acting_scale_down_stops_the_least_loaded_first() -> None:
    conn = FakeConnector()
    p = planner(connector=conn)
    made = anyio.run(p.step, idle(), 0.0)
    assert [(d.role, d.before, d.after, d.dry_run) for d in made] == [("decode", 3, 2, False)]
    assert "waiting/worker" in made[0].reason
    assert conn.calls == [("decode", 2, ["decode-1", "decode-0", "decode-2"])]
    assert p.targets == {"decode": 2, "prefill": 0}


def test_dry_run_reports_without_acting() -> None:
    conn = FakeConnector()
    p = planner(dry_run=True, connector=conn)
    made = anyio.run(p.step, idle(), 0.0)
    assert made and all(d.dry_run for d in made)
    assert conn.calls == []
    # Nothing changed, so the next round judges the real fleet (3) again, not the wished-for 2.
    made = anyio.run(p.step, idle(), 1.0)
    assert made and made[0].before == 3


def test_connector_failure_keeps_the_old_target() -> None:
    p = planner(connector=FakeConnector(fail=True))
    made = anyio.run(p.step, idle(), 0.0)
    assert made and p.targets["decode"] == 3


def test_baton_profile_writes_a_profile_the_sla_policy_reads(tmp_path: Path) -> None:
    from baton.cli import app

    out = tmp_path / "p.json"
    # 32 output tokens (the default): the mocker pays simulated time back in sleeps of at least
    # 0.5 ms, so a decode run must span several of them (8 tokens at c = 1 spanned ~0.7 ms, and a
    # run that ended before its first sleep read as 5x faster than simulated).
    r = CliRunner().invoke(app, ["profile", "--engine", "mocker", "--mocker-speedup", "50", "--isl", "32,128",
                                 "--concurrency", "1,4", "--osl", "32", "--decode-isl", "32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    prof = WorkerProfile.load(out)
    assert [p.isl for p in prof.prefill] == [32, 128] and [d.concurrency for d in prof.decode] == [1, 4]
    assert all(p.tokens_per_s > 0 and p.ttft_s > 0 for p in prof.prefill)
    assert all(d.itl_s > 0 and d.tokens_per_s > 0 for d in prof.decode)
    assert prof.decode[1].tokens_per_s > prof.decode[0].tokens_per_s  # batching pays
    assert prof.engine == "mocker" and prof.kv_blocks_total > 0 and prof.config["speedup"] == 50
    cap = prof.decode_capacity(100, 8, itl_target=1.0, ttft_target=1.0)
    assert cap.requests_per_s > 0
