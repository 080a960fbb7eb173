"""Day-one mistakes fail fast: one line saying what is wrong and what to do, exit code 2, seconds.

Real processes (``baton up`` and the services as an operator starts them); each test asserts the
exit code, the single line printed, and the time it took.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from baton.nats_server import EmbeddedNats, free_port
from tests.procs import service_env

pytestmark = pytest.mark.timeout(60)

FAST = 10.0  # seconds: every failure below except an unreachable NATS


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, list[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout,
                       env=service_env(env), stdin=subprocess.DEVNULL)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return r.returncode, lines, time.monotonic() - t0


def one_line(lines: list[str]) -> str:
    assert len(lines) == 1, "expected one line, got:\n" + "\n".join(lines)
    assert "Traceback" not in lines[0]
    return lines[0]


def up(*extra: str) -> list[str]:
    return ["baton", "up", "--host", "127.0.0.1", "--port", str(free_port()), "--nats-port", str(free_port()),
            "--engine", "mocker", *extra]


def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """An interpreter on which `import torch` fails, as after `pip install baton` without [torch]."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # A meta-path finder (sitecustomize) that hides torch from this interpreter and its children.
    (shadow / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\")\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
    )
    return {"PYTHONPATH": f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', os.getcwd())}"}


def broken_torch_env(tmp_path: Path) -> dict[str, str]:
    """An interpreter on which torch is found but its import fails, as with a wheel whose shared
    library is missing (a CUDA build on a CPU box, a half-finished upgrade)."""
    shadow = tmp_path / "broken"
    (shadow / "torch").mkdir(parents=True)
    (shadow / "torch" / "__init__.py").write_text(
        "raise OSError('libtorch_cpu.so: cannot open shared object file: No such file or directory')\n")
    return {"PYTHONPATH": f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', os.getcwd())}"}


BROKEN = ("the torch engine's 'torch' package is installed but does not import (OSError: libtorch_cpu.so: cannot "
          "open shared object file: No such file or directory); reinstall it: pip install --force-reinstall "
          "'baton[torch]'")


# ---- baton up ---------------------------------------------------------------------------------

def test_up_without_the_engine_extra(tmp_path) -> None:
    code, lines, took = run([*up(), "--engine", "torch"], env=no_torch_env(tmp_path))
    line = one_line(lines)
    assert code == 2 and took < FAST
    assert line.startswith("baton up: error: the torch engine needs the 'torch' package")
    assert "pip install 'baton[torch]'" in line


def test_up_with_a_broken_engine_install(tmp_path) -> None:
    code, lines, took = run([*up(), "--engine", "torch"], env=broken_torch_env(tmp_path))
    assert code == 2 and took < FAST
    assert one_line(lines) == f"baton up: error: {BROKEN}"


def test_up_with_a_model_that_does_not_exist() -> None:
    code, lines, took = run([*up(), "--model", "/nonexistent"])
    line = one_line(lines)
    assert code == 2 and took < FAST
    assert line.startswith("baton up: error: model '/nonexistent' is neither a built-in") and "--model" in line


def test_up_with_a_model_whose_tokenizer_is_broken(tmp_path) -> None:
    from shared.builtin_model import ensure_builtin

    d = tmp_path / "model"
    shutil.copytree(ensure_builtin("baton-tiny"), d)
    (d / "tokenizer.json").write_text("{not json")
    code, lines, took = run([*up(), "--model", str(d)])
    line = one_line(lines)
    assert code == 2 and took < FAST
    assert "tokenizer or chat template" in line and str(d) in line


def test_up_with_the_http_port_taken() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = up()
        argv[argv.index("--port") + 1] = str(port)
        code, lines, took = run(argv)
    line = one_line(lines)
    assert code == 2 and took < FAST
    assert line == (f"baton up: error: HTTP port {port} on 127.0.0.1 is already in use (another Baton?); "
                    "stop that process or pass --port with a free port")


def test_up_with_nats_unreachable_within_its_connect_timeout() -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    code, lines, took = run([*up(), "--nats-url", dead, "--nats-connect-timeout", "2"])
    line = one_line(lines)
    assert code == 2 and took < 2 + 5  # the documented timeout plus interpreter start
    assert line == (f"baton up: error: NATS at {dead} does not answer (Connection refused) after 2s; start "
                    "nats-server there or fix --nats-url / BATON_NATS_URL")


def test_up_second_stack_gets_its_own_nats(tmp_path) -> None:
    """The NATS port taken (by another Baton's NATS): this stack starts its own server on a free
    port and says so, never joining the other bus."""
    with EmbeddedNats(data_dir=tmp_path / "other") as other:
        argv = up("--log-dir", str(tmp_path / "logs"))
        argv[argv.index("--nats-port") + 1] = str(other.port)
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=service_env(), start_new_session=True)
        # Stop it once it has said which NATS it runs (or after 30 s, whatever it printed).
        watchdog = threading.Timer(30, lambda: os.killpg(proc.pid, 15))
        watchdog.start()
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "NATS: embedded nats-server" in line:
                    break
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
            more, _ = proc.communicate(timeout=60)
        out = "".join(lines) + more
    assert f"NATS: port {other.port} is in use (another Baton or NATS?); using port" in out
    assert f"nats://127.0.0.1:{other.port}" not in out.split("in use")[1]


@pytest.mark.parametrize("log_dir", [False, True], ids=["terminal", "log-dir"])
def test_up_stops_when_a_core_service_cannot_start(tmp_path, log_dir: bool) -> None:
    """The frontend cannot start (its port is taken between baton up's check and its own):
    baton up stops the stack at once and exits 2 with the reason, instead of restarting forever.
    The operator reads one error line, baton up's, carrying the frontend's reason, whether the
    children's output goes to this terminal (relayed, the frontend's own line held back) or to files."""
    port = free_port()
    argv = up(*(["--log-dir", str(tmp_path / "logs")] if log_dir else []))
    argv[argv.index("--port") + 1] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=service_env(), start_new_session=True)
    t0 = time.monotonic()
    busy = None
    try:
        # Take the port as soon as baton up has checked it (its preflight line is printed).
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "preflight ok" in line:
                busy = socket.socket()
                busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                busy.bind(("127.0.0.1", port))
                busy.listen()
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        if busy is not None:
            busy.close()
    took = time.monotonic() - t0
    assert code == 2 and took < 15, "\n".join(lines)
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1, "\n".join(lines)
    assert errors[0] == (f"baton up: error: frontend cannot start: HTTP port {port} on 127.0.0.1 is already in use "
                         "(another Baton?); stop that process or pass --port with a free port; stopped the stack")
    if log_dir:  # the frontend's own line is in its file, where the operator will look next
        assert "frontend: error: HTTP port" in (tmp_path / "logs" / "frontend.log").read_text()


# ---- the services on their own -----------------------------------------------------------------

def test_worker_with_a_wrong_model_path() -> None:
    code, lines, took = run(["services.decode", "--engine", "mocker", "--model", "/nonexistent"])
    assert code == 2 and took < FAST
    assert one_line(lines).startswith("decode: error: model '/nonexistent' is neither a built-in")


def test_worker_without_the_engine_extra(tmp_path) -> None:
    code, lines, took = run(["services.prefill", "--engine", "torch"], env=no_torch_env(tmp_path))
    assert code == 2 and took < FAST
    assert one_line(lines).startswith("prefill: error: the torch engine needs the 'torch' package")


def test_worker_with_a_broken_engine_install(tmp_path) -> None:
    code, lines, took = run(["services.decode", "--engine", "torch"], env=broken_torch_env(tmp_path))
    assert code == 2 and took < FAST
    assert one_line(lines) == f"decode: error: {BROKEN}"


def test_frontend_with_its_port_taken() -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines, took = run(["services.frontend", "--port", str(port)])
    assert code == 2 and took < FAST
    assert one_line(lines) == (f"frontend: error: HTTP port {port} on 0.0.0.0 is already in use (another Baton?); "
                               "stop that process or pass --port with a free port")


def test_router_metrics_port_taken() -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines, took = run(["services.router", "--metrics-port", str(port)])
    assert code == 2 and took < FAST
    assert "metrics port" in one_line(lines) and "--metrics-port" in lines[0]


def test_service_with_nats_unreachable_keeps_the_reason() -> None:
    """The retry loop spends its budget across attempts and reports the last reason."""
    dead = f"nats://127.0.0.1:{free_port()}"
    code, lines, took = run(["services.router", "--nats-url", dead], env={"BATON_NATS_CONNECT_TIMEOUT": "3"})
    assert code == 2 and 3 <= took < 3 + 5
    assert one_line(lines) == (
        f"router: error: cannot connect to NATS at {dead} within 3s (Connection refused); start nats-server "
        "there or fix --nats-url / BATON_NATS_URL (BATON_NATS_CONNECT_TIMEOUT sets the wait)")


def test_bad_log_format_is_one_line() -> None:
    code, lines, took = run(["services.router", "--log-format", "xml"])
    assert code == 2 and took < FAST
    assert one_line(lines).startswith("router: error: unknown log format 'xml'")
