"""``baton up``: an embedded nats-server (or a loopback cluster of them) and the five services as
separate OS processes.

A small supervisor: it starts each service with ``python -m services.<name>``, restarts one that
dies (so a SIGKILLed router or frontend comes back), restarts a nats-server that dies on the same
port and JetStream store (the services reconnect by themselves), waits until ``/health`` is ready, and on
Ctrl-C or SIGTERM stops every child (SIGTERM, then SIGKILL after a grace period) and the NATS
server last. Children get PR_SET_PDEATHSIG, so even a SIGKILLed ``baton up`` leaves no orphans.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from baton.nats_server import (
    EmbeddedCluster,
    EmbeddedNats,
    NatsPortInUse,
    free_port,
    port_is_free,
)
from shared import nats_auth, preflight, redact
from shared.builtin_model import BUILTIN_MODELS, builtin_path
from shared.bus import DEFAULT_CONNECT_TIMEOUT
from shared.cli_options import engine_argv
from shared.engines import EngineConfig
from shared.engines.cpu_threads import shared_threads_env
from shared.supervisor import CrashWindow, spawn, stop_processes

log = logging.getLogger("baton.up")


@dataclass
class UpSettings:
    nats_url: str | None = None
    nats_port: int = 4222
    nats_cluster: int = 1  # embedded servers, clustered on loopback when > 1
    js_replicas: int | None = None  # None: 1, or min(3, nats_cluster) with an embedded cluster
    data_dir: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    model: str = "baton-tiny"
    # More models behind the same frontend (baton up --model A --model B): workers for each, the
    # first preloaded by the frontend, the others found by it through discovery.
    more_models: list[str] = field(default_factory=list)
    engine: str = "torch"
    decode_workers: int = 1
    prefill_workers: int = 1
    routers: int = 1
    router_mode: str = "round-robin"
    router: str = "service"  # "embedded": the frontend runs the router core; no router service
    mocker_speedup: float = 1.0
    num_blocks: int = 0
    discovery_ttl: float = 6.0
    log_level: str = "info"
    # Development only: the embedded NATS server accepts anyone, with every permission.
    insecure_no_auth: bool = False
    ready_timeout: float = 180.0
    stop_grace: float = 0.0  # SIGKILL a child this long after SIGTERM (0: drain_timeout + 5)
    log_dir: str | None = None  # per-service log files instead of this terminal
    log_format: str = "text"  # the services' log format (text or json); BATON_LOG_FORMAT in their env
    access_log: bool = False  # the frontend logs one line per HTTP request
    drain_timeout: float = 30.0  # each service's drain on SIGTERM (the planner adds its workers' stop time)
    nats_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # --nats-url: how long it may take to answer
    extra_env: dict[str, str] = field(default_factory=dict)
    # The planner. "local": it starts and stops the decode/prefill worker processes itself (within
    # min..max, default exactly --decode-workers/--prefill-workers); "none": this supervisor runs a
    # fixed fleet and the planner only observes.
    planner_connector: str = "local"
    planner_policy: str = "load"
    planner_interval: float = 2.0
    planner_dry_run: bool = False
    min_decode_workers: int | None = None
    max_decode_workers: int | None = None
    min_prefill_workers: int | None = None
    max_prefill_workers: int | None = None
    planner_args: list[str] = field(default_factory=list)  # passed through to `python -m services.planner`


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    restarts: int = 0
    crashes: CrashWindow = field(default_factory=CrashWindow)  # more than 5 exits in a minute: give up
    proc: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's environment
    last_line: str = ""  # without --log-dir: the last line it printed (relayed to this terminal)
    error_line: str = ""  # its own "<service>: error: ..." line, held back: baton up says it once

    @property
    def service(self) -> str:
        """The service's own name, as it prefixes its error line ("router" for "router-0")."""
        return self.name.rsplit("-", 1)[0] if self.name[-1].isdigit() else self.name


def models_of(s: UpSettings) -> list[str]:
    return list(dict.fromkeys([s.model, *s.more_models]))


def js_replicas(s: UpSettings) -> int:
    if s.js_replicas is not None:
        return s.js_replicas
    return min(3, s.nats_cluster) if s.nats_url is None else 1


def service_specs(s: UpSettings, nats_url: str) -> list[ProcessSpec]:
    py = [sys.executable, "-m"]
    common = ["--nats-url", nats_url, "--log-level", s.log_level, "--discovery-ttl", str(s.discovery_ttl),
              "--js-replicas", str(js_replicas(s))]
    # The workers' engine config, whole, spelled as flags in one place (shared.cli_options); the
    # model is given per worker (baton up --model A --model B).
    engine_only = engine_argv(EngineConfig(engine=s.engine, model=s.model, speedup=s.mocker_speedup,
                                           num_blocks=s.num_blocks), ("engine", "speedup", "num_blocks"))
    specs = [ProcessSpec("frontend", [*py, "services.frontend", *common, "--model", s.model, "--host", s.host,
                                      "--port", str(s.port), "--router", s.router, "--router-mode", s.router_mode])]
    if s.router != "embedded":
        specs += [ProcessSpec(f"router-{i}", [*py, "services.router", *common, "--mode", s.router_mode])
                  for i in range(s.routers)]
    models = models_of(s)
    if s.planner_connector != "local":  # else the planner owns the workers (and the supervisor the planner)
        # --decode-workers / --prefill-workers of each model; numbered across models (decode-0, decode-1, ...).
        # Every engine on this host gets its share of the CPUs (shared/engines/cpu_threads.py).
        threads = shared_threads_env(len(models) * (s.decode_workers + s.prefill_workers), s.engine,
                                     {**os.environ, **s.extra_env})
        specs += [ProcessSpec(f"decode-{n}", [*py, "services.decode", *common, "--model", m, *engine_only],
                              env=threads)
                  for n, (m, _) in enumerate((m, i) for m in models for i in range(s.decode_workers))]
        specs += [ProcessSpec(f"prefill-{n}", [*py, "services.prefill", *common, "--model", m, *engine_only],
                              env=threads)
                  for n, (m, _) in enumerate((m, i) for m in models for i in range(s.prefill_workers))]
    planner_engine = [a for m in models for a in ("--model", m)] + engine_only  # one pool per model
    specs.append(ProcessSpec("planner", [*py, "services.planner", *common, *planner_args(s, planner_engine)]))
    return specs


def planner_args(s: UpSettings, engine: list[str]) -> list[str]:
    """The planner's options: fleet limits (default: exactly the fleet asked for) and, for the local
    connector, the worker options the supervisor would otherwise give the workers."""
    lo_d = s.decode_workers if s.min_decode_workers is None else s.min_decode_workers
    hi_d = max(lo_d, s.decode_workers if s.max_decode_workers is None else s.max_decode_workers)
    lo_p = s.prefill_workers if s.min_prefill_workers is None else s.min_prefill_workers
    hi_p = max(lo_p, s.prefill_workers if s.max_prefill_workers is None else s.max_prefill_workers)
    args = ["--connector", s.planner_connector, "--policy", s.planner_policy, "--interval", str(s.planner_interval),
            "--min-decode", str(lo_d), "--max-decode", str(hi_d), "--min-prefill", str(lo_p),
            "--max-prefill", str(hi_p)]
    if s.planner_connector == "local":
        args += ["--initial-decode", str(min(max(s.decode_workers, lo_d), hi_d)),
                 "--initial-prefill", str(min(max(s.prefill_workers, lo_p), hi_p)), *engine]
        if s.log_dir:
            args += ["--worker-log-dir", s.log_dir]
    if s.planner_dry_run:
        args.append("--dry-run")
    # The planner drains its workers when it stops: give them their drain time, then a little more.
    args += ["--worker-stop-timeout", str(s.drain_timeout + 5), "--drain-timeout", str(s.drain_timeout + 10)]
    return args + list(s.planner_args)


async def http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int:
    """Status code of a GET, or 0 if nothing answered: enough for a readiness probe."""
    try:
        with anyio.fail_after(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
        return int(line.split()[1])
    except (OSError, TimeoutError, IndexError, ValueError):
        return 0


class StackFailed(Exception):
    """The stack cannot run; the message is the one line to print."""


def _model_size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.iterdir()
                if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    return f"{total / 1e9:.2f} GB" if total >= 1e9 else f"{total / 1e6:.1f} MB"


def _last_line(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


class Stack:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        if settings.log_dir:
            Path(settings.log_dir).mkdir(parents=True, exist_ok=True)
        self.nats: EmbeddedNats | None = None  # the embedded server (the first one of a cluster)
        self.cluster: EmbeddedCluster | None = None
        self.nats_servers: list[EmbeddedNats] = []  # every embedded server, each supervised
        self.specs: list[ProcessSpec] = []
        self.identities: nats_auth.Identities | None = None
        self._stopping = False
        self.failure: str | None = None  # why the stack stopped on its own (then exit non-zero)
        self._t0 = time.monotonic()
        self._failed = anyio.Event()
        self.model_path: Path | None = None

    def step(self, text: str) -> None:
        """One progress line, as it happens, with the seconds since ``baton up`` started."""
        print(f"[{time.monotonic() - self._t0:6.1f}s] {text}", flush=True)

    def preflight(self) -> None:
        """Everything that can be known wrong before a process starts (raises StackFailed)."""
        s = self.settings
        try:
            preflight.check_engine(s.engine, in_subprocess=True)
            probe_host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
            preflight.check_port(s.host if s.host != "::" else probe_host, s.port, "HTTP", "--port")
            if s.nats_url is not None:
                preflight.check_nats(s.nats_url, s.nats_connect_timeout)
            for m in reversed(models_of(s)):  # the first model's path last: the one announced
                if m in BUILTIN_MODELS and not (builtin_path(m) / "baton_builtin.json").exists():
                    self.step(f"building the built-in model {m} (first run only)")
                self.model_path = preflight.check_model(m)
        except preflight.PreflightError as e:
            raise StackFailed(str(e)) from None
        self.step(f"preflight ok: engine {s.engine}, model {', '.join(models_of(s))} at {self.model_path} "
                  f"({_model_size(self.model_path)} of weights), port {s.port} free")

    def start_nats(self) -> str:
        s = self.settings
        if s.nats_url is not None:
            self.step(f"NATS: using {redact.redact(s.nats_url)}")
            return s.nats_url
        log_file = Path(s.log_dir) / "nats.log" if s.log_dir else None
        port = s.nats_port
        if not port_is_free("127.0.0.1", port):
            # A second `baton up` on this machine: its own server on a free port, never the other's bus.
            port = free_port()
            self.step(f"NATS: port {s.nats_port} is in use (another Baton or NATS?); using port {port} instead")
        if s.nats_cluster > 1:
            self.cluster = EmbeddedCluster(s.nats_cluster, data_dir=s.data_dir, ports=[port], log_dir=s.log_dir)
            self.nats_servers = list(self.cluster.servers)
        else:
            self.nats_servers = [EmbeddedNats(port=port, data_dir=s.data_dir, log_file=log_file)]
        self.nats = self.nats_servers[0]
        self._secure_embedded_nats()
        try:
            # Started from this (the main) thread: PR_SET_PDEATHSIG follows the thread that forked.
            if self.cluster is not None:
                self.cluster.start()
            else:
                self.nats.start()
        except (NatsPortInUse, RuntimeError, TimeoutError, FileNotFoundError) as e:
            self.nats = self.cluster = None
            self.nats_servers = []
            raise StackFailed(f"the embedded nats-server did not start ({e}); pass --nats-port with a free "
                              "port or --nats-url to use a running server") from None
        if self.cluster is not None:
            self.step(f"NATS: {len(self.nats_servers)} embedded nats-servers clustered on loopback at "
                      f"{self.cluster.url} (stores under {self.cluster.data_dir}), JetStream replicas "
                      f"{js_replicas(s)}")
            return self.cluster.url
        self.step(f"NATS: embedded nats-server with JetStream at {self.nats.url} (store: {self.nats.data_dir})")
        return self.nats.url

    async def _supervise_nats(self, server: EmbeddedNats) -> None:
        """Restart an embedded nats-server that died, on the same port and store: streams, buckets and
        acknowledged messages survive, and the services' clients reconnect by themselves."""
        recent: list[float] = []
        while not self._stopping:
            await _exited(server.proc)
            if self._stopping or server.alive():
                continue
            code = server.proc.returncode if server.proc is not None else None
            now = time.monotonic()
            recent = [t for t in recent if now - t < 60] + [now]
            if len(recent) > 5:
                self._fail(f"nats-server {server.server_name} exited {len(recent)} times in a minute; gave up"
                           + (f" (see {server.log_file})" if server.log_file else ""))
                return
            self.step(f"NATS: nats-server on port {server.port} exited with code {code}; restarting it on the "
                      f"same port and store")
            try:
                server.spawn()  # from the event loop's (main) thread, for PR_SET_PDEATHSIG
                server.restarts += 1
                with anyio.fail_after(10):
                    while not server.listening():  # noqa: ASYNC110 (a socket to poll, no event)
                        await anyio.sleep(0.02)
            except (NatsPortInUse, RuntimeError, TimeoutError, OSError) as e:
                self.step(f"NATS: restart of the nats-server on port {server.port} failed ({e}); retrying")
                server.stop()
                await anyio.sleep(0.5)
                continue
            self.step(f"NATS: nats-server on port {server.port} back after {time.monotonic() - now:.2f}s")

    async def run(self) -> None:
        s = self.settings
        self.preflight()
        nats_url = self.start_nats()
        self.specs = service_specs(s, nats_url)
        if s.access_log:
            next(sp for sp in self.specs if sp.name == "frontend").argv.append("--access-log")
        try:
            async with anyio.create_task_group() as tg:
                workers = [sp for sp in self.specs if sp.name.startswith(("decode", "prefill"))]
                for spec in self.specs:
                    if spec.name != "planner" and spec not in workers:
                        tg.start_soon(self._supervise, spec)
                if s.engine == "torch":
                    await self._compile_kernels()  # once here, not raced by every worker
                for spec in (*workers, *(sp for sp in self.specs if sp.name == "planner")):
                    tg.start_soon(self._supervise, spec)
                for server in self.nats_servers:
                    tg.start_soon(self._supervise_nats, server)
                tg.start_soon(self._watch_workers, nats_url)
                tg.start_soon(self._announce_ready)

                async def on_failure() -> None:
                    await self._failed.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_failure)
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        print(f"\n{signal.Signals(signum).name}: stopping Baton", flush=True)
                        break
                await self._stop_all()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_all()
                self._stopping = True
                if self.cluster is not None:
                    await anyio.to_thread.run_sync(self.cluster.cleanup)
                elif self.nats is not None:
                    await anyio.to_thread.run_sync(self.nats.cleanup)

    async def _compile_kernels(self) -> None:
        if os.environ.get("BATON_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
            return
        self.step("torch engine: loading torch and the fused CPU kernels (compiled on first run)")
        t = time.monotonic()

        def load() -> str:
            from shared.engines.cpu_kernels import load_cpu_kernels

            k = load_cpu_kernels()
            return f"fused CPU kernels ready ({k.path.name})" if k is not None else "no fused CPU kernels (plain torch)"

        try:
            text = await anyio.to_thread.run_sync(load)
        except Exception as e:  # the workers fall back to plain torch the same way
            text = f"fused CPU kernels unavailable ({e})"
        self.step(f"torch engine: {text} in {time.monotonic() - t:.1f}s")

    async def _watch_workers(self, nats_url: str) -> None:
        """Print each worker as it registers or leaves (the bus's discovery bucket)."""
        from shared.bus import Bus, BusError, NatsSecurity
        from shared.discovery import WorkerView

        # baton up watches with the operator identity of its own embedded server.
        security = NatsSecurity(creds_file=str(self.identities.creds["admin"])) if self.identities else None
        try:
            bus = await Bus.connect(nats_url, "baton-up", security=security, js_replicas=js_replicas(self.settings))
        except BusError as e:
            self.step(f"cannot watch worker registration ({e})")
            return
        try:
            view = WorkerView(bus, self.settings.discovery_ttl)
            known: dict[str, str] = {}
            async with anyio.create_task_group() as tg:
                tg.start_soon(view.run)
                while True:
                    now = {w.worker_id: f"{w.role} worker {w.worker_id} (engine {w.engine}, pid {w.pid})"
                           for w in view.workers()}
                    for wid, text in now.items():
                        if wid not in known:
                            self.step(f"registered: {text}")
                    for wid, text in known.items():
                        if wid not in now:
                            self.step(f"gone: {text}")
                    known = now
                    await view.wait_changed()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await bus.close()

    def _secure_embedded_nats(self) -> None:
        """One NATS identity per role (shared/nats_auth.py) in the store's ``auth/``, or loudly none."""
        assert self.nats is not None
        store = self.cluster.data_dir if self.cluster is not None else self.nats.data_dir
        if self.settings.insecure_no_auth:
            log.warning("--insecure-no-auth: NATS accepts ANY client with EVERY permission (prompts, KV, workers). "
                        "Development only.")
            return
        self.identities = nats_auth.generate(store / "auth")
        for server in self.nats_servers:
            server.extra_args = [*server.extra_args, "-c", str(self.identities.server_config)]
        self.step(f"NATS: authentication on, one identity per role; API client credentials in "
                  f"{self.identities.creds['client']} (operator: {self.identities.creds['admin']})")

    async def _spawn(self, spec: ProcessSpec) -> asyncio.subprocess.Process:
        env = {**os.environ, **self.settings.extra_env, **spec.env, "PYTHONUNBUFFERED": "1",
               "BATON_LOG_FORMAT": self.settings.log_format, "BATON_DRAIN_TIMEOUT": str(self.settings.drain_timeout)}
        if self.identities is not None:
            env |= nats_auth.service_env(self.identities, nats_auth.role_of(spec.name))
        # Without --log-dir the children's output comes through a pipe and is relayed to this
        # terminal (see _relay), so a child's own error line can be held back and said once.
        spec.log_path = Path(self.settings.log_dir) / f"{spec.name}.log" if self.settings.log_dir else None
        spec.last_line = spec.error_line = ""
        return await spawn(spec.argv, env, log_path=spec.log_path, pipe=spec.log_path is None)

    async def _relay(self, spec: ProcessSpec, proc: asyncio.subprocess.Process, done: anyio.Event) -> None:
        """Copy a child's output to our stderr line by line, except its own one-line error
        ("<service>: error: ..."), which becomes baton up's reason when the child gives up."""
        assert proc.stdout is not None
        prefix = f"{spec.service}: error: "
        pending = b""

        def emit(raw: bytes) -> None:
            line = raw.decode(errors="replace").rstrip("\r")
            if line.startswith(prefix):
                spec.error_line = line
                return
            if line.strip():
                spec.last_line = line.strip()
            print(line, file=sys.stderr, flush=True)

        try:
            while chunk := await proc.stdout.read(65536):  # not readline: a long line has no limit here
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    emit(raw)
            if pending:
                emit(pending)
        finally:
            done.set()

    async def _supervise(self, spec: ProcessSpec) -> None:
        while not self._stopping:
            spec.proc = proc = await self._spawn(spec)
            self.step(f"started {spec.name} (pid {proc.pid})")
            async with anyio.create_task_group() as tg:
                relayed = anyio.Event()
                if proc.stdout is not None:
                    tg.start_soon(self._relay, spec, proc, relayed)
                else:
                    relayed.set()
                code = await proc.wait()
                with anyio.move_on_after(2):  # its last lines; a grandchild may hold the pipe open
                    await relayed.wait()
                tg.cancel_scope.cancel()
            if self._stopping:
                if spec.error_line:  # held back for a reason that will not be given: say it now
                    print(spec.error_line, file=sys.stderr, flush=True)
                return
            exits = spec.crashes.record()
            spec.restarts += 1
            why = spec.error_line or spec.last_line if spec.log_path is None else _last_line(spec.log_path)
            why = why.removeprefix(f"{spec.service}: error: ")
            if code == preflight.EXIT_PREFLIGHT:
                # A failed check (bad option, port taken, bus unreachable): restarting cannot help.
                self._fail(f"{spec.name} cannot start: {why or f'exit code {code}, see its output above'}")
                return
            if spec.error_line:  # not its one-line exit after all (another code): show it as it came
                print(spec.error_line, file=sys.stderr, flush=True)
            if spec.crashes.looping:
                self._fail(f"{spec.name} exited with code {code} {exits} times in a minute; gave up"
                           + (f" (last line: {why})" if why else ""))
                return
            print(f"{spec.name} exited with {code}; restarting", flush=True)
            await anyio.sleep(spec.crashes.backoff())

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self._failed.set()

    async def _announce_ready(self) -> None:
        s = self.settings
        probe_host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        deadline = time.monotonic() + s.ready_timeout
        while time.monotonic() < deadline:
            if await http_status(probe_host, s.port, "/health") == 200:
                logs = s.log_dir or "this terminal"
                models = ", ".join(models_of(s))
                print(f"Baton is ready: http://{probe_host}:{s.port}/v1 (model {models}, engine {s.engine})",
                      flush=True)
                more = f" (+ {', '.join(s.more_models)}, once their workers register)" if s.more_models else ""
                print(f"  API      http://{probe_host}:{s.port}/v1   (health /health, metrics /metrics)\n"
                      f"  model    {s.model} ({self.model_path}){more}\n"
                      f"  workers  {s.decode_workers} decode, {s.prefill_workers} prefill; "
                      + (f"router embedded in the frontend ({s.router_mode})\n" if s.router == "embedded"
                         else f"{s.routers} router ({s.router_mode})\n") +
                      f"  NATS     {redact.redact(self.cluster.url if self.cluster else self.nats.url if self.nats else s.nats_url or '')}\n"
                      f"  logs     {logs}\n"
                      f"  stop     Ctrl-C (each service drains up to {s.drain_timeout:g}s)", flush=True)
                return
            await anyio.sleep(0.2)
        print(f"Baton did not become ready within {s.ready_timeout:.0f}s; see the service logs", flush=True)

    async def _stop_all(self) -> None:
        self._stopping = True
        grace = self.settings.stop_grace or self.settings.drain_timeout + 15  # the planner's workers: +10
        await stop_processes([sp.proc for sp in self.specs if sp.proc is not None], grace)


async def _exited(proc: subprocess.Popen[bytes] | None) -> None:
    """Return once ``proc`` has exited (at once if it has, or if there is none). On Linux a pidfd
    turns readable when the process exits, so the supervisor sleeps until then instead of waking
    20 times a second to poll; elsewhere it polls."""
    if proc is None or proc.poll() is not None:
        return
    try:
        wait_readable = anyio.wait_readable  # anyio >= 4.7
        fd = os.pidfd_open(proc.pid)  # a zombie (exited, not yet reaped: only we reap) still has one
    except (AttributeError, OSError):  # not Linux >= 5.3
        while proc.poll() is None:  # noqa: ASYNC110 (a process handle to poll, no event)
            await anyio.sleep(0.05)
        return
    try:
        await wait_readable(fd)
    finally:
        os.close(fd)


def run_up(settings: UpSettings) -> None:
    """Run the stack until a signal; exit 2 with one line if it cannot start or a core service gives up."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s baton-up %(levelname)s: %(message)s")
    redact.install()
    # Our own bus client only watches registrations: its connection news is not the operator's.
    for name in ("nats", "baton.bus", "baton.discovery"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    stack = Stack(settings)
    try:
        anyio.run(stack.run, backend_options={"use_uvloop": True})
    except StackFailed as e:
        preflight.fail("baton up", str(e))
    if stack.failure is not None:
        preflight.fail("baton up", f"{stack.failure}; stopped the stack")
