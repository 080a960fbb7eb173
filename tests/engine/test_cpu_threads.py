"""Engines on one host share its CPUs: each launcher gives each torch engine process its share."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from baton.up import UpSettings, service_specs
from shared.cli_options import WorkerOptions, worker_command
from shared.engines.cpu_threads import THREADS_ENV, host_cpus, shared_threads_env, torch_threads


@pytest.mark.parametrize(("processes", "cpus", "threads"), [(2, 2, "1"), (2, 16, "8"), (3, 16, "5"), (4, 2, "1")])
def test_each_torch_engine_gets_an_equal_share_of_at_least_one(processes: int, cpus: int, threads: str) -> None:
    assert shared_threads_env(processes, "torch", {}, cpus) == {THREADS_ENV: threads}
    assert shared_threads_env(processes, "", {}, cpus) == {THREADS_ENV: threads}  # the workers' default: torch


def test_no_share_for_one_engine_other_engines_or_an_operators_setting() -> None:
    assert shared_threads_env(1, "torch", {}, 16) == {}
    assert shared_threads_env(4, "mocker", {}, 16) == {}
    assert shared_threads_env(4, "vllm", {}, 16) == {}
    assert shared_threads_env(4, "torch", {THREADS_ENV: "6"}, 16) == {}  # passed on as it is


def test_a_worker_runs_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    assert torch_threads() == 3
    monkeypatch.delenv(THREADS_ENV)
    assert torch_threads() == host_cpus()


def test_baton_up_gives_its_fixed_fleet_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    specs = service_specs(UpSettings(planner_connector="none", decode_workers=2, prefill_workers=1,
                                     more_models=["baton-tiny-b"]), "nats://127.0.0.1:4222")
    engines = [s for s in specs if s.service in ("decode", "prefill")]
    assert len(engines) == 6  # (2 decode + 1 prefill) for each of two models
    share = {THREADS_ENV: str(max(1, host_cpus() // 6))}
    assert all(s.env == share for s in engines)
    assert all(s.env == {} for s in specs if s not in engines)
    mocker = service_specs(UpSettings(planner_connector="none", engine="mocker"), "nats://127.0.0.1:4222")
    assert all(s.env == {} for s in mocker)


def test_a_workers_torch_threads_option_is_what_its_engine_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    seen: list[int] = []

    @worker_command
    def main(worker: WorkerOptions) -> None:
        seen.append(torch_threads())

    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, ["--torch-threads", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [3]
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert CliRunner().invoke(app, []).exit_code == 0
    assert seen == [3, host_cpus()]  # 0, the default: every CPU it may run on
