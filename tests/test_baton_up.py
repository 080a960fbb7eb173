"""``baton up``: one command starts NATS and the five services; a signal stops them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from baton.nats_server import free_port
from shared.engines.cpu_threads import THREADS_ENV, shared_threads_env
from tests.conftest import e2e_engine
from tests.procs import service_env, wait_until

pytestmark = pytest.mark.timeout(240)


def children_of(pid: int) -> set[int]:
    """Every descendant pid, read from /proc (no psutil needed)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def engine_role(pid: int) -> str:
    """"decode" or "prefill" for an engine worker's process, else ""."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return ""
    return next((role for role in ("decode", "prefill") if f"services.{role}".encode() in argv), "")


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.decode().partition("=") for item in f.read().split(b"\0") if item]
    return {k: v for k, _, v in pairs}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_up(tmp_path, extra: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int, int]:
    http_port, nats_port = free_port(), free_port()
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "up", "--engine", e2e_engine(), "--port", str(http_port), "--host",
         "127.0.0.1", "--nats-port", str(nats_port), "--log-dir", str(tmp_path / "logs"), "--discovery-ttl", "3",
         *extra],
        stdout=log, stderr=subprocess.STDOUT, env=service_env(env), start_new_session=True,
    )
    return proc, http_port, nats_port


def wait_ready_line(tmp_path, proc) -> None:
    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        return "Baton is ready" in (tmp_path / "up.log").read_text()

    wait_until(ready, 120, 0.1, "baton up ready")


def test_up_serves_and_sigterm_stops_everything(tmp_path) -> None:
    proc, http_port, nats_port = start_up(tmp_path, [])
    try:
        wait_ready_line(tmp_path, proc)
        kids = children_of(proc.pid)
        assert len(kids) >= 6  # nats-server, frontend, router, decode, prefill, planner
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", json={
            "model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        def health() -> dict:
            return httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).json()

        # Ready means a decode worker is up; the prefill worker registers on its own schedule.
        wait_until(lambda: health().get("prefill_workers") == 1, 30, 0.1, "prefill worker registered")
        assert health()["decode_workers"] == 1
        # The planner's two engine processes share this host's CPUs (shared/engines/cpu_threads.py).
        engines = {k: environ_of(k) for k in children_of(proc.pid) if engine_role(k)}
        assert sorted(engine_role(k) for k in engines) == ["decode", "prefill"]
        share = shared_threads_env(2, e2e_engine()).get(THREADS_ENV, os.environ.get(THREADS_ENV))
        assert [env.get(THREADS_ENV) for env in engines.values()] == [share, share]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        wait_until(lambda: not any(alive(k) for k in kids), 10, 0.05, "children gone")
        assert port_free(http_port) and port_free(nats_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_up_serves_two_models_behind_one_frontend(tmp_path) -> None:
    """``baton up --model A --model B``: the planner starts a worker of each model; the frontend
    serves A (its --model) and finds B through discovery."""
    from shared.builtin_model import ensure_builtin

    ensure_builtin("baton-tiny-b")
    proc, http_port, _ = start_up(tmp_path, ["--model", "baton-tiny", "--model", "baton-tiny-b", "--prefill-workers", "0"])
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready_line(tmp_path, proc)

        def listed() -> set[str]:
            return {m["id"] for m in httpx.get(f"{base}/v1/models", timeout=5).json()["data"]}

        wait_until(lambda: listed() == {"baton-tiny", "baton-tiny-b"}, 60, 0.2, "both models listed")
        texts = {}
        for model in ("baton-tiny", "baton-tiny-b"):
            r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": [5, 17, 301, 44], "max_tokens": 6,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200 and r.json()["model"] == model, r.text
            texts[model] = r.json()["choices"][0]["text"]
        assert texts["baton-tiny"] != texts["baton-tiny-b"]
        assert httpx.get(f"{base}/health", timeout=5).json()["decode_workers"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_up_restarts_a_killed_router_and_sigkill_leaves_no_orphans(tmp_path) -> None:
    proc, http_port, _ = start_up(tmp_path, ["--prefill-workers", "0"])
    try:
        wait_ready_line(tmp_path, proc)
        kids = children_of(proc.pid)
        router = next(k for k in kids if b"services.router" in open(f"/proc/{k}/cmdline", "rb").read())
        os.kill(router, signal.SIGKILL)
        wait_until(lambda: "router-0 exited" in (tmp_path / "up.log").read_text(), 10, 0.05, "restart noticed")

        def served() -> bool:
            try:
                return httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json={
                    "model": "baton-tiny", "prompt": "again", "max_tokens": 2}, timeout=10).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(served, 30, 0.2, "served again after the router restart")
        kids = children_of(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: PR_SET_PDEATHSIG must do it
        proc.wait(10)
        wait_until(lambda: not any(alive(k) for k in kids), 30, 0.1, "orphans gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0)
