"""shared/worker_host.py with a real nats-server and a real (mocker) engine: a role that fills in
only ``serve`` gets registration, load reports, info fields and a drain that waits for its work."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest

from shared import subjects
from shared.bus import Bus
from shared.cli_options import ENGINE_OPTIONS, engine_argv
from shared.discovery import WorkerView
from shared.engines import EngineConfig
from shared.messages import load_report_decoder
from shared.worker_host import WorkerHost, WorkerSettings
from tests.procs import with_bus

pytestmark = pytest.mark.timeout(60)


class EchoWorker(WorkerHost):
    """The smallest role: one subject; each message is a piece of work held until ``release``."""

    role = "decode"

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings)
        self.release = anyio.Event()
        self.served = 0

    def info_fields(self) -> dict[str, str]:
        return {"generate_subject": subjects.generate(self.worker_id)}

    async def serve(self, tg: anyio.abc.TaskGroup) -> None:
        assert self.bus is not None

        async def on_work(msg) -> None:
            tg.start_soon(self._hold)

        await self.bus.subscribe(subjects.generate(self.worker_id), on_work)

    async def _hold(self) -> None:
        self.begin()
        try:
            await self.release.wait()
            self.served += 1
        finally:
            self.end()


def test_worker_host_registers_reports_load_and_drains_after_its_work(tmp_path: Path) -> None:
    async def main(bus: Bus, url: str) -> None:
        settings = WorkerSettings(nats_url=url, engine=EngineConfig(engine="mocker", speedup=100.0),
                                  worker_id="decode-host1", served_model_name="echo", discovery_ttl=3,
                                  load_interval=0.1)
        worker = EchoWorker(settings)
        view = WorkerView(bus, 3)
        loads: list = []

        async def on_load(msg) -> None:
            loads.append(load_report_decoder.decode(msg.data))

        async with anyio.create_task_group() as tg:
            tg.start_soon(view.run)
            await bus.subscribe(subjects.load(worker.worker_id), on_load)
            run_done = anyio.Event()

            async def run_worker() -> None:
                await worker.run()
                run_done.set()

            tg.start_soon(run_worker)
            with anyio.fail_after(20):
                await view.wait_for("decode", 1)
            info = view.get("decode-host1")
            assert info is not None and info.model == "echo" and info.engine == "mocker"
            assert info.generate_subject == subjects.generate("decode-host1")
            with anyio.fail_after(10):
                while not loads:
                    await anyio.sleep(0.05)
            assert loads[0].worker_id == "decode-host1" and loads[0].kv_blocks_total > 0

            await bus.nc.publish(subjects.generate(worker.worker_id), b"work")
            with anyio.fail_after(10):
                while worker.in_flight == 0:
                    await anyio.sleep(0.02)
            tg.start_soon(worker.drain)
            with anyio.fail_after(10):
                while view.get("decode-host1") is not None:  # withdrawn at once
                    await view.wait_changed()
            assert worker.in_flight == 1 and not run_done.is_set()  # withdrawn, still holding its work
            worker.release.set()
            with anyio.fail_after(10):
                await run_done.wait()
            assert worker.served == 1 and not worker.ready
            tg.cancel_scope.cancel()

    with_bus(tmp_path, main)


def test_engine_argv_names_each_engine_flag_once() -> None:
    cfg = EngineConfig(engine="mocker", model="m", speedup=2.0, num_blocks=7)
    assert engine_argv(cfg, ("engine", "speedup", "num_blocks")) == [
        "--engine", "mocker", "--num-blocks", "7", "--mocker-speedup", "2.0"]
    whole = engine_argv(cfg)
    assert whole[::2] == [flag for flag, _ in ENGINE_OPTIONS.values()]
    assert set(ENGINE_OPTIONS) <= set(EngineConfig.__struct_fields__)
