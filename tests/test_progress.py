"""Progress bars: drawn on stderr for a person at a terminal, absent from captured output and logs.

Real processes (`baton model build`, `baton profile`); a pseudo-terminal stands in for the
operator's terminal on stderr while stdout stays a pipe, so each test sees what goes where.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

import pytest

from tests.procs import service_env

pytestmark = pytest.mark.timeout(120)


def run_with_tty_stderr(argv: list[str], env: dict[str, str] | None = None,
                        timeout: float = 90) -> tuple[int, str, str]:
    """Run ``python -m <argv>`` with stderr on a pseudo-terminal; (exit code, stdout, terminal text)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=follower,
                            stdin=subprocess.DEVNULL, env=service_env({"COLUMNS": "120", "TERM": "xterm", **(env or {})}))
    os.close(follower)
    terminal = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal (it exited)
            break
        if not chunk:
            break
        terminal += chunk
    os.close(leader)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return code, out, terminal.decode(errors="replace")


def test_model_build_shows_a_bar_on_a_terminal(tmp_path) -> None:
    out_dir = tmp_path / "tiny"
    code, out, terminal = run_with_tty_stderr(["baton", "model", "build", "baton-tiny", "--out", str(out_dir)])
    assert code == 0, terminal
    assert out == f"{out_dir}\n"  # stdout: only the result, for scripts
    assert "building baton-tiny" in terminal and "writing model.safetensors" in terminal  # its last step
    assert (out_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("how", ["--quiet", "json-logs", "BATON_PROGRESS=0"])
def test_model_build_bar_can_be_switched_off(tmp_path, how: str) -> None:
    argv = ["baton", "model", "build", "baton-tiny", "--out", str(tmp_path / "tiny")]
    env = {}
    if how == "--quiet":
        argv.append("--quiet")
    elif how == "json-logs":
        env["BATON_LOG_FORMAT"] = "json"
    else:
        env["BATON_PROGRESS"] = "0"
    code, out, terminal = run_with_tty_stderr(argv, env)
    assert code == 0 and out == f"{tmp_path / 'tiny'}\n"
    assert terminal.strip() == ""


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "baton", "model", "build", "baton-tiny", "--out", str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=90, env=service_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 't'}\n"
    assert r.stderr == ""


def test_profile_shows_its_steps_on_a_terminal(tmp_path) -> None:
    out = tmp_path / "profile.json"
    code, stdout, terminal = run_with_tty_stderr(
        ["baton", "profile", "--engine", "mocker", "--mocker-speedup", "1000", "--isl", "64", "--concurrency", "1,2",
         "--osl", "4", "--out", str(out)])
    assert code == 0, terminal
    assert "profiling the mocker engine" in terminal and "decode, batch of 2" in terminal
    assert "decode, batch" not in stdout and stdout.rstrip().endswith(f"wrote {out}")
    assert out.is_file()
