"""Chaos: a thousand idle connections and slowloris clients do not stop others from being served,
and the frontend closes connections that never finish their headers."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.conftest import e2e_engine
from tests.procs import Stack, wait_until

pytestmark = pytest.mark.timeout(180)

HEADER_TIMEOUT = 3.0


@pytest.fixture()
def guarded(tmp_path):
    s = Stack(tmp_path, e2e_engine(), discovery_ttl=3.0)
    s.frontend_extra = ["--header-timeout", str(HEADER_TIMEOUT)]
    try:
        yield s.start()
    finally:
        s.stop()


def closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_and_slowloris_do_not_starve_others(guarded: Stack) -> None:
    s = guarded
    t_open = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(1000)]
    slow = []
    for _ in range(20):
        c = socket.create_connection(("127.0.0.1", s.port))
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        slow.append(c)
    try:
        latencies = []
        with httpx.Client(timeout=30) as client:
            for i in range(20):
                for c in slow:  # trickle one header byte per slow client between real requests
                    try:
                        c.send(b"X")
                    except OSError:
                        pass
                t0 = time.monotonic()
                r = client.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": f"x{i}",
                                                                 "max_tokens": 2})
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200
        assert max(latencies) < 5.0, latencies
        # Past the header deadline the frontend closes both kinds of hoarders.
        open_socks = set(idle + slow)

        def all_closed() -> bool:
            open_socks.difference_update([c for c in list(open_socks) if closed_by_peer(c)])
            return not open_socks

        wait_until(all_closed, HEADER_TIMEOUT + 10, 0.1, "idle and slowloris connections closed by the server")
        assert time.monotonic() - t_open >= HEADER_TIMEOUT * 0.9  # not before the deadline
        assert s.frontend.alive()
    finally:
        for c in idle + slow:
            c.close()
