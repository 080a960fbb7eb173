"""``baton up``: an embedded nats-server and the five services as separate OS processes.

A small supervisor: it starts each service with ``python -m services.<name>``, restarts one that
dies (so a SIGKILLed router or frontend comes back), waits until ``/health`` is ready, and on
Ctrl-C or SIGTERM stops every child (SIGTERM, then SIGKILL after a grace period) and the NATS
server last. Children get PR_SET_PDEATHSIG, so even a SIGKILLed ``baton up`` leaves no orphans.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from baton.nats_server import EmbeddedNats, die_with_parent
from shared import nats_auth, redact

log = logging.getLogger("baton.up")


@dataclass
class UpSettings:
    nats_url: str | None = None
    nats_port: int = 4222
    data_dir: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    model: str = "baton-tiny"
    engine: str = "torch"
    decode_workers: int = 1
    prefill_workers: int = 1
    routers: int = 1
    router_mode: str = "round-robin"
    mocker_speedup: float = 1.0
    num_blocks: int = 0
    discovery_ttl: float = 6.0
    log_level: str = "info"
    # Development only: the embedded NATS server accepts anyone, with every permission.
    insecure_no_auth: bool = False
    ready_timeout: float = 180.0
    stop_grace: float = 15.0
    log_dir: str | None = None  # per-service log files instead of this terminal
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
    proc: asyncio.subprocess.Process | None = None


def service_specs(s: UpSettings, nats_url: str) -> list[ProcessSpec]:
    py = [sys.executable, "-m"]
    common = ["--nats-url", nats_url, "--log-level", s.log_level, "--discovery-ttl", str(s.discovery_ttl)]
    engine = ["--model", s.model, "--engine", s.engine, "--mocker-speedup", str(s.mocker_speedup),
              "--num-blocks", str(s.num_blocks)]
    specs = [ProcessSpec("frontend", [*py, "services.frontend", *common, "--model", s.model, "--host", s.host,
                                      "--port", str(s.port)])]
    specs += [ProcessSpec(f"router-{i}", [*py, "services.router", *common, "--mode", s.router_mode])
              for i in range(s.routers)]
    if s.planner_connector != "local":  # else the planner owns the workers (and the supervisor the planner)
        specs += [ProcessSpec(f"decode-{i}", [*py, "services.decode", *common, *engine])
                  for i in range(s.decode_workers)]
        specs += [ProcessSpec(f"prefill-{i}", [*py, "services.prefill", *common, *engine])
                  for i in range(s.prefill_workers)]
    specs.append(ProcessSpec("planner", [*py, "services.planner", *common, *planner_args(s, engine)]))
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


class Stack:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        if settings.log_dir:
            Path(settings.log_dir).mkdir(parents=True, exist_ok=True)
        self.nats: EmbeddedNats | None = None
        self.specs: list[ProcessSpec] = []
        self.identities: nats_auth.Identities | None = None
        self._stopping = False

    async def run(self) -> None:
        s = self.settings
        nats_url = s.nats_url
        if nats_url is None:
            log_file = Path(s.log_dir) / "nats.log" if s.log_dir else None
            self.nats = EmbeddedNats(port=s.nats_port, data_dir=s.data_dir, log_file=log_file)
            self._secure_embedded_nats()
            # Started from this (the main) thread: PR_SET_PDEATHSIG follows the thread that forked.
            self.nats.start()
            nats_url = self.nats.url
            print(f"embedded nats-server with JetStream at {nats_url} (store: {self.nats.data_dir})", flush=True)
        self.specs = service_specs(s, nats_url)
        try:
            async with anyio.create_task_group() as tg:
                for spec in self.specs:
                    tg.start_soon(self._supervise, spec)
                tg.start_soon(self._announce_ready)
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        print(f"\n{signal.Signals(signum).name}: stopping Baton", flush=True)
                        break
                await self._stop_all()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop_all()
                if self.nats is not None:
                    await anyio.to_thread.run_sync(self.nats.cleanup)

    def _secure_embedded_nats(self) -> None:
        """One NATS identity per role (shared/nats_auth.py) in the store's ``auth/``, or loudly none."""
        assert self.nats is not None
        if self.settings.insecure_no_auth:
            log.warning("--insecure-no-auth: NATS accepts ANY client with EVERY permission (prompts, KV, workers). "
                        "Development only.")
            return
        self.identities = nats_auth.generate(self.nats.data_dir / "auth")
        self.nats.extra_args = [*self.nats.extra_args, "-c", str(self.identities.server_config)]
        print(f"NATS authentication on: one identity per role; API client credentials in "
              f"{self.identities.creds['client']} (operator: {self.identities.creds['admin']})", flush=True)

    async def _spawn(self, spec: ProcessSpec) -> asyncio.subprocess.Process:
        env = {**os.environ, **self.settings.extra_env, "PYTHONUNBUFFERED": "1"}
        if self.identities is not None:
            env |= nats_auth.service_env(self.identities, nats_auth.role_of(spec.name))
        out: int | None = None
        if self.settings.log_dir:
            out = os.open(Path(self.settings.log_dir) / f"{spec.name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            return await asyncio.create_subprocess_exec(
                *spec.argv, env=env, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
            )
        finally:
            if out is not None:
                os.close(out)

    async def _supervise(self, spec: ProcessSpec) -> None:
        recent: list[float] = []
        while not self._stopping:
            spec.proc = await self._spawn(spec)
            code = await spec.proc.wait()
            if self._stopping:
                return
            now = time.monotonic()
            recent = [t for t in recent if now - t < 60] + [now]
            spec.restarts += 1
            if len(recent) > 5:
                print(f"{spec.name} exited with {code} {len(recent)} times in a minute; not restarting", flush=True)
                return
            print(f"{spec.name} exited with {code}; restarting", flush=True)
            await anyio.sleep(min(0.5 * len(recent), 5))

    async def _announce_ready(self) -> None:
        s = self.settings
        probe_host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        deadline = time.monotonic() + s.ready_timeout
        while time.monotonic() < deadline:
            if await http_status(probe_host, s.port, "/health") == 200:
                print(f"Baton is ready: http://{probe_host}:{s.port}/v1 (model {s.model}, engine {s.engine})",
                      flush=True)
                return
            await anyio.sleep(0.2)
        print(f"Baton did not become ready within {s.ready_timeout:.0f}s; see the service logs", flush=True)

    async def _stop_all(self) -> None:
        self._stopping = True
        live = [sp.proc for sp in self.specs if sp.proc is not None and sp.proc.returncode is None]
        for p in live:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        with anyio.move_on_after(self.settings.stop_grace):
            for p in live:
                await p.wait()
        for p in live:
            if p.returncode is None:
                p.kill()
                await p.wait()


def run_up(settings: UpSettings) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s baton-up %(levelname)s: %(message)s")
    redact.install()
    anyio.run(Stack(settings).run, backend_options={"use_uvloop": True})
