"""Connectors carry a scaling decision out: local processes, Docker Compose, Kubernetes, or nothing.

Every connector scales down the same way underneath: the worker that goes gets SIGTERM and drains
(deregisters at once so routers stop sending it work, finishes what it holds, exits 0). Locally
the planner sends the signal to the worker it chose (the least loaded); Compose and Kubernetes
send it themselves within the service's/pod's grace period. For Kubernetes the planner marks the
pods it would rather lose with a lower ``controller.kubernetes.io/pod-deletion-cost``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
from prometheus_client import Counter, Gauge

from services.planner.signals import ROLES, Role
from shared import nats_auth
from shared.cli_options import engine_argv
from shared.engines import EngineConfig
from shared.messages import WorkerInfo
from shared.supervisor import CrashWindow, spawn, stop_processes

log = logging.getLogger("baton.planner")

PROCESSES = Gauge("baton_planner_worker_processes", "Worker processes the planner runs", ["role", "state"])
WORKER_SECONDS = Counter("baton_planner_worker_seconds_total", "Seconds of worker processes alive", ["role"])


class Connector(Protocol):
    name: str

    async def start(self, initial: Mapping[Role, int]) -> dict[Role, int | None]:
        """Bring up the initial fleet if this connector owns it; return the replicas it knows of (None: unknown)."""
        ...

    async def scale(self, role: Role, replicas: int, victims: Sequence[WorkerInfo]) -> None:
        """Make ``role`` have ``replicas`` workers; on the way down prefer to stop ``victims`` (in order)."""
        ...

    async def reconcile(self) -> None:
        """Per-interval upkeep (reap exited processes, replace crashed ones)."""
        ...

    async def close(self) -> None: ...


class NullConnector:
    """Decides nothing into being: ``--connector none`` (the deployment scales some other way)."""

    name = "none"

    async def start(self, initial: Mapping[Role, int]) -> dict[Role, int | None]:
        return {r: None for r in ROLES}

    async def scale(self, role: Role, replicas: int, victims: Sequence[WorkerInfo]) -> None:
        return None

    async def reconcile(self) -> None:
        return None

    async def close(self) -> None:
        return None


# --- local processes -------------------------------------------------------------------------


@dataclass
class LocalWorkerSettings:
    """How the planner starts a worker: the deployment's engine config (whole), model and NATS options."""

    nats_url: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    # The engine options the planner was given, passed on as flags; the others stay the worker's
    # own (its defaults and BATON_* variables).
    engine_fields: tuple[str, ...] = ("engine", "speedup", "num_blocks")
    discovery_ttl: float = 6.0
    log_level: str = "info"
    log_dir: str | None = None  # one log file per worker here; else the planner's own stdout/stderr
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # on top of the planner's own (e.g. each engine's CPU share)
    python: str = sys.executable
    stop_timeout: float = 60.0  # SIGKILL a draining worker after this long
    max_restarts_per_minute: int = 5


@dataclass
class ManagedWorker:
    worker_id: str
    role: Role
    proc: asyncio.subprocess.Process
    started: float
    stopping_since: float | None = None


class LocalProcessConnector:
    """Starts and stops ``python -m services.decode|prefill`` processes on this machine."""

    name = "local"

    def __init__(self, settings: LocalWorkerSettings) -> None:
        self.settings = settings
        self.workers: dict[str, ManagedWorker] = {}
        self.targets: dict[Role, int] = {r: 0 for r in ROLES}
        self._crashes = {r: CrashWindow(settings.max_restarts_per_minute) for r in ROLES}
        self._last_tick = time.monotonic()

    def argv(self, role: Role, worker_id: str) -> list[str]:
        s = self.settings
        return [s.python, "-m", f"services.{role}", "--nats-url", s.nats_url, "--worker-id", worker_id,
                *engine_argv(s.engine, s.engine_fields), "--discovery-ttl", str(s.discovery_ttl),
                "--log-level", s.log_level, *s.extra_args]

    def active(self, role: Role) -> list[ManagedWorker]:
        return [w for w in self.workers.values() if w.role == role and w.stopping_since is None]

    def stopping(self, role: Role) -> list[ManagedWorker]:
        return [w for w in self.workers.values() if w.role == role and w.stopping_since is not None]

    async def start(self, initial: Mapping[Role, int]) -> dict[Role, int | None]:
        for role in ROLES:
            await self.scale(role, initial.get(role, 0), [])
        return {r: self.targets[r] for r in ROLES}

    async def _spawn(self, role: Role) -> ManagedWorker:
        worker_id = f"{role}-{uuid.uuid4().hex[:8]}"
        log_path = Path(self.settings.log_dir) / f"{worker_id}.log" if self.settings.log_dir else None
        env = {**nats_auth.child_env(role, os.environ), **self.settings.env, "PYTHONUNBUFFERED": "1"}  # its own identity
        proc = await spawn(self.argv(role, worker_id), env, log_path=log_path)
        w = ManagedWorker(worker_id, role, proc, time.monotonic())
        self.workers[worker_id] = w
        log.info("started %s (pid %d)", worker_id, proc.pid)
        return w

    def _stop(self, w: ManagedWorker) -> None:
        w.stopping_since = time.monotonic()
        try:
            w.proc.send_signal(signal.SIGTERM)  # the worker drains: deregister, finish, exit
        except ProcessLookupError:
            pass
        log.info("draining %s (pid %d)", w.worker_id, w.proc.pid)

    async def scale(self, role: Role, replicas: int, victims: Sequence[WorkerInfo]) -> None:
        self.targets[role] = replicas
        active = self.active(role)
        for _ in range(replicas - len(active)):
            await self._spawn(role)
        extra = len(active) - replicas
        if extra <= 0:
            return
        rank = {v.worker_id: i for i, v in enumerate(victims)}
        # Workers not registered yet hold no work: stop those first (newest first), then the
        # registered ones in the planner's order (least loaded first).
        order = sorted(active, key=lambda w: (w.worker_id in rank, rank.get(w.worker_id, 0), -w.started))
        for w in order[:extra]:
            self._stop(w)

    async def reconcile(self) -> None:
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        for w in list(self.workers.values()):
            code = w.proc.returncode
            if code is None:
                if w.stopping_since is not None and now - w.stopping_since > self.settings.stop_timeout:
                    log.warning("%s still draining after %.0fs: killing it", w.worker_id, self.settings.stop_timeout)
                    w.proc.kill()
                continue
            del self.workers[w.worker_id]
            if w.stopping_since is not None:
                log.info("%s drained and exited (%d)", w.worker_id, code)
            else:
                log.warning("%s exited unexpectedly with %d", w.worker_id, code)
                self._crashes[w.role].record()
        for role in ROLES:
            missing = self.targets[role] - len(self.active(role))
            if missing > 0:
                if self._crashes[role].looping:
                    log.error("%s workers keep dying (%d in a minute); not replacing them", role,
                              self._crashes[role].count)
                    continue
                for _ in range(missing):
                    await self._spawn(role)
            live = [w for w in self.workers.values() if w.role == role]
            PROCESSES.labels(role, "running").set(len(self.active(role)))
            PROCESSES.labels(role, "draining").set(len(self.stopping(role)))
            WORKER_SECONDS.labels(role).inc(dt * len(live))

    async def close(self, timeout: float | None = None) -> None:
        """SIGTERM every worker (they drain), wait, then SIGKILL what is left."""
        timeout = self.settings.stop_timeout if timeout is None else timeout
        for w in self.workers.values():
            if w.proc.returncode is None and w.stopping_since is None:
                self._stop(w)
        await stop_processes([w.proc for w in self.workers.values()], timeout, terminate=False)
        self.workers.clear()


# --- Docker Compose --------------------------------------------------------------------------

Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


async def run_command(argv: list[str], timeout: float = 300.0) -> tuple[int, str]:
    """Run a command, return (exit code, stdout+stderr)."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
    except OSError as e:  # no docker binary here: a failed decision, not a dead planner
        return -1, f"{argv[0]}: {e}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {timeout:.0f}s"
    return proc.returncode or 0, out.decode(errors="replace")


@dataclass
class ComposeSettings:
    file: str | None = None  # -f; default: docker compose's own lookup (compose.yaml here)
    project: str | None = None  # -p
    services: dict[str, str] = field(default_factory=lambda: {"decode": "decode", "prefill": "prefill"})
    docker: str = "docker"


class DockerComposeConnector:
    """``docker compose up -d --no-deps --no-recreate --scale decode=N decode``.

    Compose removes surplus containers with ``docker stop`` (SIGTERM, then SIGKILL after the
    service's stop_grace_period): the worker drains in between. It picks the containers itself.
    """

    name = "compose"

    def __init__(self, settings: ComposeSettings | None = None, runner: Runner | None = None) -> None:
        self.settings = settings or ComposeSettings()
        self.runner = runner or run_command

    def _base(self) -> list[str]:
        s = self.settings
        argv = [s.docker, "compose"]
        if s.file:
            argv += ["-f", s.file]
        if s.project:
            argv += ["-p", s.project]
        return argv

    def scale_command(self, role: Role, replicas: int) -> list[str]:
        svc = self.settings.services[role]
        # --no-deps: touch only this service; --no-recreate: running workers keep running.
        return [*self._base(), "up", "-d", "--no-deps", "--no-recreate", "--scale", f"{svc}={replicas}", svc]

    def ps_command(self, role: Role) -> list[str]:
        return [*self._base(), "ps", "--quiet", "--status", "running", self.settings.services[role]]

    async def start(self, initial: Mapping[Role, int]) -> dict[Role, int | None]:
        out: dict[Role, int | None] = {}
        for role in ROLES:
            code, text = await self.runner(self.ps_command(role))
            out[role] = len([ln for ln in text.splitlines() if ln.strip()]) if code == 0 else None
        return out

    async def scale(self, role: Role, replicas: int, victims: Sequence[WorkerInfo]) -> None:
        argv = self.scale_command(role, replicas)
        code, text = await self.runner(argv)
        if code != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({code}): {text.strip()[-500:]}")

    async def reconcile(self) -> None:
        return None

    async def close(self) -> None:
        return None


# --- Kubernetes ------------------------------------------------------------------------------

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclass
class KubernetesSettings:
    deployments: dict[str, str] = field(default_factory=lambda: {"decode": "baton-decode",
                                                                 "prefill": "baton-prefill"})
    namespace: str | None = None  # default: the service account's namespace
    api_server: str | None = None  # default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    token_path: str = str(SA_DIR / "token")
    ca_path: str = str(SA_DIR / "ca.crt")
    deletion_cost: bool = True  # mark the pods to remove first (needs patch on pods)
    timeout: float = 10.0


class KubernetesConnector:
    """Sets a Deployment's replicas through its ``scale`` subresource with the pod's service-account token.

    RBAC it needs: ``get, patch`` on ``deployments/scale`` and (for deletion cost) ``patch`` on ``pods``.
    Pods get SIGTERM and ``terminationGracePeriodSeconds`` to drain: set it above a request's length.
    """

    name = "kubernetes"

    def __init__(self, settings: KubernetesSettings | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings or KubernetesSettings()
        s = self.settings
        self.api = (s.api_server or self._in_cluster_api()).rstrip("/")
        self.namespace = s.namespace or self._in_cluster_namespace()
        verify: ssl.SSLContext | bool = True
        if transport is None and Path(s.ca_path).exists():
            verify = ssl.create_default_context(cafile=s.ca_path)
        self.client = httpx.AsyncClient(transport=transport, verify=verify, timeout=s.timeout)
        self.replicas: dict[Role, int | None] = {r: None for r in ROLES}

    @staticmethod
    def _in_cluster_api() -> str:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("not in a cluster (KUBERNETES_SERVICE_HOST unset): pass --k8s-api-server")
        return f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"

    def _in_cluster_namespace(self) -> str:
        try:
            return (SA_DIR / "namespace").read_text().strip()
        except OSError:
            return "default"

    def _token(self) -> str:
        # Re-read every time: projected service-account tokens are rotated under us.
        return Path(self.settings.token_path).read_text().strip()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        if content_type:
            h["Content-Type"] = content_type
        return h

    def scale_url(self, role: Role) -> str:
        name = self.settings.deployments[role]
        return f"{self.api}/apis/apps/v1/namespaces/{self.namespace}/deployments/{name}/scale"

    def scale_request(self, role: Role, replicas: int) -> httpx.Request:
        body = json.dumps({"spec": {"replicas": replicas}}).encode()
        return self.client.build_request("PATCH", self.scale_url(role), content=body,
                                         headers=self._headers("application/merge-patch+json"))

    def get_scale_request(self, role: Role) -> httpx.Request:
        return self.client.build_request("GET", self.scale_url(role), headers=self._headers())

    def deletion_cost_request(self, pod: str, cost: int) -> httpx.Request:
        body = json.dumps({"metadata": {"annotations": {DELETION_COST: str(cost)}}}).encode()
        url = f"{self.api}/api/v1/namespaces/{self.namespace}/pods/{pod}"
        return self.client.build_request("PATCH", url, content=body,
                                         headers=self._headers("application/merge-patch+json"))

    async def _send(self, req: httpx.Request) -> dict:
        resp = await self.client.send(req)
        if resp.status_code >= 300:
            raise RuntimeError(f"{req.method} {req.url} -> {resp.status_code}: {resp.text[:300]}")
        return resp.json() if resp.content else {}

    async def start(self, initial: Mapping[Role, int]) -> dict[Role, int | None]:
        for role in ROLES:
            if role not in self.settings.deployments:
                continue
            try:
                body = await self._send(self.get_scale_request(role))
                self.replicas[role] = int(body.get("spec", {}).get("replicas", 0))
            except Exception as e:  # the planner falls back to what discovery shows
                log.warning("cannot read %s scale: %s", role, e)
        return dict(self.replicas)

    async def scale(self, role: Role, replicas: int, victims: Sequence[WorkerInfo]) -> None:
        before = self.replicas.get(role)
        if self.settings.deletion_cost and before is not None and replicas < before:
            # Lower cost = removed first. A worker's host name is its pod's name.
            for i, w in enumerate(victims[: before - replicas]):
                if w.host:
                    try:
                        await self._send(self.deletion_cost_request(w.host, -1000 + i))
                    except Exception as e:  # only a preference: scale anyway
                        log.warning("cannot mark pod %s for removal: %s", w.host, e)
        await self._send(self.scale_request(role, replicas))
        self.replicas[role] = replicas

    async def reconcile(self) -> None:
        return None

    async def close(self) -> None:
        await self.client.aclose()
