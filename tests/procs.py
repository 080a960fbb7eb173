"""Real processes for end-to-end tests: nats-server and Baton services on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

from baton.nats_server import EmbeddedNats, free_port
from shared import nats_auth
from shared.bus import Bus
from shared.engines.cpu_threads import shared_threads_env


def service_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class ServiceProcess:
    """One ``python -m services.<name>`` process with its log in a file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=service_env(self.env), start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, as a crash would."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail after ``timeout``. Polling a real condition, not sleeping blind."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class StackNats(EmbeddedNats):
    """The stack's nats-server with Baton's per-role identities (shared/nats_auth.py) on.

    ``url`` carries the ``admin`` identity, so a test may poke at anything (publish a prefill job,
    read a stream) as before; services get ``service_url`` and their own role's credentials file.
    """

    def __init__(self, workdir: Path, auth: bool = True) -> None:
        super().__init__(data_dir=workdir / "nats", log_file=workdir / "logs" / "nats.log")
        self.identities: nats_auth.Identities | None = None
        if auth:
            self.identities = nats_auth.generate(workdir / "nats-auth")
            self.extra_args = ["-c", str(self.identities.server_config)]

    @property
    def service_url(self) -> str:
        return super().url

    @property
    def url(self) -> str:
        if self.identities is None:
            return super().url
        admin = self.identities.credentials("admin")
        return f"{self.scheme}://{admin.user}:{admin.password}@{self.host}:{self.port}"

    def role_env(self, role: str) -> dict[str, str]:
        return {} if self.identities is None else nats_auth.service_env(self.identities, role)

    def connect_options(self, role: str) -> dict[str, str]:
        """``nats.connect`` keyword arguments for ``role``'s identity (use with ``service_url``)."""
        assert self.identities is not None
        return self.identities.credentials(role).connect_options()

    def violations(self) -> list[str]:
        """Permission violations the server logged: a role that needs a subject it may not use."""
        try:
            text = Path(self.log_file).read_text(errors="replace") if self.log_file else ""
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if "Violation" in line]


# Every Stack a test started, so a suite's conftest can check them all afterwards (tests/chaos).
STARTED_STACKS: list[Stack] = []


class Stack:
    """nats-server + router + decode workers (+ prefill, planner) + frontend, all real processes.

    NATS authentication is on (``auth=False`` to run without), so every service runs with only its
    role's permissions, as under ``baton up``.
    """

    def __init__(self, workdir: Path, engine: str, decode_workers: int = 1, prefill_workers: int = 0,
                 planner: bool = False, discovery_ttl: float = 3.0, model: str = "baton-tiny",
                 extra_decode_args: list[str] | None = None, env: dict[str, str] | None = None,
                 decode_ids: list[str] | None = None, routers: int = 1, frontends: int = 1,
                 metrics: bool = False, auth: bool = True, decode_replicas: int = 1,
                 decode_models: list[str] | None = None, frontend_model: str | None = "") -> None:
        self.workdir = workdir
        self.engine = engine
        self.model = model
        self.decode_models = decode_models or []  # the i-th decode worker's --model (default: model)
        # The frontend's --model ("": the stack's model; None: none, it serves what the fleet registers).
        self.frontend_model = model if frontend_model == "" else frontend_model
        self.ttl = discovery_ttl
        self.env = env or {}
        self.nats = StackNats(workdir, auth)
        self.ports = [free_port() for _ in range(frontends)]
        self.port = self.ports[0]
        self.routers: list[ServiceProcess] = []
        self.frontends: list[ServiceProcess] = []
        self._n_routers = routers
        self.procs: list[ServiceProcess] = []
        self.decoders: list[ServiceProcess] = []
        self.prefillers: list[ServiceProcess] = []
        self.frontend: ServiceProcess | None = None
        self.router: ServiceProcess | None = None
        self._n_decode = decode_workers
        self._n_prefill = prefill_workers
        self._planner = planner
        # Simulated workers per decode process (services/decode/fleet.py; the mocker only).
        self._replicas = decode_replicas
        self._extra_decode = [*(["--replicas", str(decode_replicas)] if decode_replicas > 1 else []),
                              *(extra_decode_args or [])]
        self._decode_ids = decode_ids or []
        self.frontend_extra: list[str] = []
        self.metrics = metrics  # give every non-frontend service a --metrics-port
        self.metrics_ports: dict[str, int] = {}
        self._expected_dead: list[ServiceProcess] = []  # killed on purpose by a test

    def kill(self, p: ServiceProcess) -> None:
        self._expected_dead.append(p)
        p.kill()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def common(self) -> list[str]:
        return ["--nats-url", self.nats.service_url, "--discovery-ttl", str(self.ttl)]

    def _proc(self, name: str, label: str, args: list[str]) -> ServiceProcess:
        if self.metrics and name != "frontend":
            self.metrics_ports[label] = free_port()
            args = [*args, "--metrics-port", str(self.metrics_ports[label])]
        env = {**self.nats.role_env(name), **self.env}
        if name in ("decode", "prefill"):  # the engines share this host's CPUs, as under baton up
            env |= shared_threads_env(self._n_decode + self._n_prefill, self.engine, {**os.environ, **self.env})
        p = ServiceProcess(name, args, self.workdir / "logs" / f"{label}.log", env=env).start()
        self.procs.append(p)
        return p

    def add_decode(self, extra: list[str] | None = None) -> ServiceProcess:
        i = len(self.decoders)
        model = self.decode_models[i] if i < len(self.decode_models) else self.model
        p = self._proc("decode", f"decode-{i}", [*self.common(), "--engine", self.engine, "--model", model,
                                                 *self._extra_decode, *(extra or [])])
        self.decoders.append(p)
        return p

    def add_prefill(self) -> ServiceProcess:
        i = len(self.prefillers)
        p = self._proc("prefill", f"prefill-{i}", [*self.common(), "--engine", self.engine, "--model", self.model])
        self.prefillers.append(p)
        return p

    def start(self, ready_timeout: float = 90.0) -> Stack:
        STARTED_STACKS.append(self)
        self.nats.start()
        self.routers = [self._proc("router", f"router-{i}", self.common()) for i in range(self._n_routers)]
        self.router = self.routers[0] if self.routers else None  # none: the frontend embeds it
        for i in range(self._n_decode):
            self.add_decode(["--worker-id", self._decode_ids[i]] if i < len(self._decode_ids) else None)
        for _ in range(self._n_prefill):
            self.add_prefill()
        if self._planner:
            self._proc("planner", "planner", [*self.common(), "--interval", "0.5"])
        self.frontends = [
            self._proc("frontend", f"frontend-{i}", [*self.common(), *(["--model", self.frontend_model]
                                                                       if self.frontend_model else []),
                                                      "--host", "127.0.0.1", "--port", str(port), *self.frontend_extra])
            for i, port in enumerate(self.ports)
        ]
        self.frontend = self.frontends[0]
        self.wait_ready(self._n_decode * self._replicas, ready_timeout)
        return self

    def health(self, port: int | None = None) -> dict:
        try:
            r = httpx.get(f"http://127.0.0.1:{port or self.port}/health", timeout=2)
            return r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_ready(self, decode_workers: int, timeout: float = 90.0) -> None:
        def ok() -> bool:
            for p in self.procs:
                if not p.alive() and p not in self._expected_dead:
                    raise RuntimeError(f"{p.log_path.name} exited early:\n{p.log()[-3000:]}")
            return all(self.health(port).get("decode_workers") == decode_workers for port in self.ports)

        wait_until(ok, timeout, 0.1, f"{decode_workers} decode workers ready")

    def logs(self) -> str:
        return "\n".join(f"===== {p.log_path.name}\n{p.log()[-4000:]}" for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.nats.cleanup()


@contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    """Start ``stack`` for a fixture, stop it afterwards; its logs are printed if anything failed."""
    try:
        stack.start()
        yield stack
    except Exception:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def with_bus(tmp_path: Path, body: Callable[[Bus, str], Awaitable[None]]) -> None:
    """Run ``body(bus, url)`` on one connection to a fresh nats-server at ``url`` (store and log
    under ``tmp_path``); the connection is closed and the server stopped after, whatever happens."""
    server = EmbeddedNats(data_dir=tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()

    async def main() -> None:
        bus = await Bus.connect(server.url, "test")
        try:
            await body(bus, server.url)
        finally:
            await bus.close()

    try:
        anyio.run(main)
    finally:
        server.stop()
