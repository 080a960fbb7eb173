"""Chaos: ``baton up`` supervises its embedded nats-server. SIGKILLed under load, it is restarted on
the same port and JetStream store; the services reconnect by themselves, serving resumes within 2 s,
and every prefill job JetStream had acknowledged is still in the queue."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from baton.nats_server import free_port
from shared import nats_auth
from tests.chaos.buslib import JobPublisher, Load
from tests.procs import service_env, wait_until

pytestmark = pytest.mark.timeout(180)


def nats_pid(up_pid: int) -> int | None:
    pids = nats_pids(up_pid)
    return pids[0] if pids else None


def test_embedded_nats_sigkilled_under_load_is_restarted(tmp_path) -> None:
    http_port, nats_port = free_port(), free_port()
    store = tmp_path / "store"
    log = open(tmp_path / "up.log", "wb")
    # The mocker engine: the bus is under test here, and the load must not starve a 2-core box.
    up = subprocess.Popen(
        [sys.executable, "-m", "baton", "up", "--engine", "mocker", "--mocker-speedup", "20", "--port",
         str(http_port), "--host", "127.0.0.1", "--nats-port", str(nats_port), "--data-dir", str(store),
         "--log-dir", str(tmp_path / "logs"), "--discovery-ttl", "3", "--prefill-workers", "0",
         "--decode-workers", "2", "--drain-timeout", "2"],
        # --route-timeout 1 s (default 2): a route request the restart swallowed is asked again sooner
        # (docs/operations.md, "What a client sees during a failover").
        stdout=log, stderr=subprocess.STDOUT, env=service_env({"BATON_ROUTE_TIMEOUT": "1"}), start_new_session=True,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: "Baton is ready" in (tmp_path / "up.log").read_text() or up.poll() is not None,
                   120, 0.1, "baton up ready")
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        admin = nats_auth.read_credentials(store / "auth" / "admin.creds")
        nats_url = f"nats://{admin.user}:{admin.password}@127.0.0.1:{nats_port}"
        recoveries: list[float] = []
        stalls: list[float] = []  # longest time without any request completing (a lost message costs a probe)
        with Load(url, clients=4) as load, JobPublisher([nats_url]) as jobs:
            wait_until(lambda: load.served_since(0) >= 20 and len(jobs.acked) >= 20, 30, 0.05, "load running")
            for round_ in range(3):
                pid = nats_pid(up.pid)
                assert pid is not None
                t_kill = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda p=pid: nats_pid(up.pid) not in (None, p), 10, 0.02, "nats-server restarted")
                wait_until(lambda t=t_kill: load.served_since(t + load.recovery_after(t)) >= 8 and
                           time.monotonic() - t > 1.0, 20, 0.05, f"serving again after kill {round_ + 1}")
                n_jobs = len(jobs.acked)
                wait_until(lambda n=n_jobs: len(jobs.acked) >= n + 5, 20, 0.05, "jobs acknowledged again")
                recoveries.append(load.resumed_after(t_kill))
                stalls.append(load.longest_gap_after(t_kill))
        print(f"recovery after SIGKILL of the embedded nats-server: {[round(r, 2) for r in recoveries]} s, "
              f"median {statistics.median(recoveries):.2f} s; {len(load.outcomes)} requests (longest stalls {[round(g, 2) for g in stalls]} s), "
              f"{len(load.failed())} refused (503), {len(jobs.acked)} jobs acknowledged; refusals {load.refusals()}")
        assert load.unclean() == [], load.unclean()[:5]
        assert max(recoveries) < 2.0, recoveries
        assert max(stalls) < 5.0, stalls
        assert jobs.missing() == []
        assert up.poll() is None
        assert "restarting it on the same port and store" in (tmp_path / "up.log").read_text()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait(10)


def nats_pids(up_pid: int) -> list[int]:
    """Every nats-server ``baton up`` started (children whose command is nats-server)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == up_pid and cmd.split(b"\0")[0].endswith(b"nats-server"):
                pids.append(int(d))
    return sorted(pids)


def test_up_with_an_embedded_cluster_of_three_survives_a_server_killed(tmp_path) -> None:
    """`baton up --nats-cluster 3`: three clustered servers, every service given all three URLs and
    JetStream replicas 3; one server SIGKILLed under load is restarted and no request fails."""
    http_port = free_port()
    store = tmp_path / "store"
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "baton", "up", "--engine", "mocker", "--mocker-speedup", "20", "--port",
         str(http_port), "--host", "127.0.0.1", "--nats-port", str(free_port()), "--nats-cluster", "3",
         "--data-dir", str(store), "--log-dir", str(tmp_path / "logs"), "--discovery-ttl", "3",
         "--prefill-workers", "0", "--decode-workers", "1", "--drain-timeout", "2"],
        stdout=log, stderr=subprocess.STDOUT, env=service_env({"BATON_ROUTE_TIMEOUT": "1"}), start_new_session=True,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(lambda: "Baton is ready" in (tmp_path / "up.log").read_text() or up.poll() is not None,
                   120, 0.1, "baton up ready")
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        text = (tmp_path / "up.log").read_text()
        assert "3 embedded nats-servers clustered on loopback" in text and "JetStream replicas 3" in text, text
        before = nats_pids(up.pid)
        assert len(before) == 3, before
        with Load(url, clients=2) as load:
            wait_until(lambda: load.served_since(0) >= 10, 30, 0.05, "load running")
            t_kill = time.monotonic()
            os.kill(before[0], signal.SIGKILL)
            wait_until(lambda: len(nats_pids(up.pid)) == 3 and before[0] not in nats_pids(up.pid), 20, 0.02,
                       "the killed server restarted")
            wait_until(lambda: load.served_since(t_kill + 1.0) >= 10 and time.monotonic() - t_kill > 1.5, 30, 0.05,
                       "serving after the kill")
        assert load.unclean() == [], load.unclean()[:5]
        assert up.poll() is None
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait(10)
