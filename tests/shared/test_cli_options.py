"""shared/cli_options.py: the engine workers' one set of options builds one EngineConfig."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from shared.cli_options import WorkerOptions, worker_command


def _app(seen: dict) -> typer.Typer:
    @worker_command
    def main(worker: WorkerOptions, own: int = 3) -> None:
        seen["worker"], seen["own"] = worker, own

    app = typer.Typer(add_completion=False)
    app.command()(main)
    return app


def test_worker_command_builds_the_engine_config_from_flags_and_variables() -> None:
    seen: dict = {}
    result = CliRunner().invoke(_app(seen), [
        "--engine", "mocker", "--mocker-speedup", "4", "--num-blocks", "99", "--kv-host", "decode",
        "--worker-id", "decode-x", "--own", "5"], env={"BATON_BLOCK_SIZE": "32", "BATON_DTYPE": "bfloat16"})
    assert result.exit_code == 0, result.output
    w: WorkerOptions = seen["worker"]
    assert (w.engine.engine, w.engine.speedup, w.engine.num_blocks) == ("mocker", 4.0, 99)
    assert (w.engine.block_size, w.engine.dtype) == (32, "bfloat16")  # BATON_* variables
    assert w.settings()["kv_host"] == "decode" and w.settings()["worker_id"] == "decode-x"
    assert w.settings()["engine"] is w.engine  # whole, not re-spelled
    assert seen["own"] == 5


def test_worker_command_rejects_a_bad_value_with_a_clear_error() -> None:
    result = CliRunner().invoke(_app({}), ["--num-blocks", "many"])
    assert result.exit_code == 2
    assert "--num-blocks" in result.output
