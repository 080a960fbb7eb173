"""Every service CLI: each option documented in --help and settable from a BATON_* variable."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import typer

SERVICES = ["frontend", "router", "decode", "prefill", "planner"]


@pytest.mark.parametrize("service", SERVICES)
def test_every_option_has_help_and_env(service: str) -> None:
    cmd = typer.main.get_command(importlib.import_module(f"services.{service}.cli").app)
    missing = [p.name for p in cmd.params if p.name != "help" and not (p.help and p.envvar)]
    assert not missing, f"{service}: options without help or BATON_* env: {missing}"
    assert all(str(p.envvar).startswith("BATON_") for p in cmd.params if p.envvar)


@pytest.mark.parametrize("service", SERVICES)
def test_module_and_umbrella_entry_points(service: str) -> None:
    for argv in ([sys.executable, "-m", f"services.{service}", "--help"], [sys.executable, "-m", "baton", service, "--help"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "--nats-url" in out.stdout


def test_env_sets_an_option(tmp_path) -> None:
    # BATON_ROUTER_MODE reaches the router: a bad value is rejected by its validation.
    out = subprocess.run([sys.executable, "-m", "services.router", "--nats-url", "nats://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60, env={"BATON_ROUTER_MODE": "psychic", "PATH": ""})
    assert out.returncode != 0 and "psychic" in (out.stderr + out.stdout)
