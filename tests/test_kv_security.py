"""Nobody without the one-time token writes into a KV pool, and garbage on a KV port costs nothing.

Two levels: the transport in-process (a posted reservation stays untouched whatever arrives, a
silent peer is cut off), and a real decode worker process (its RSS, its metrics, and that it keeps
serving the same greedy output) under a hypothesis-driven stream of hostile connections.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.kv_transport.base import AUTH_FRAME, MAX_TRANSFER_ID, TOKEN_BYTES
from shared.kv_transport.tcp import TcpTransport
from tests.conftest import e2e_engine
from tests.procs import Stack, running, wait_until

pytestmark = pytest.mark.timeout(180)

POSTED_ID = "req-under-attack"  # the attacker even knows the transfer id


def _frame(transfer_id: bytes, token: bytes, total: int) -> bytes:
    return AUTH_FRAME.pack(min(len(transfer_id), 255), transfer_id[:MAX_TRANSFER_ID], token, total)


hostile = st.one_of(
    # The attack of the security review: a length prefix naming gigabytes, then nothing.
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack("!I", n)),
    st.binary(min_size=1, max_size=2048),  # random bytes
    # Well-formed frames with a wrong token (for the posted id or another), any length, then bytes.
    st.tuples(st.sampled_from([POSTED_ID.encode(), b"other", b""]) | st.binary(max_size=300),
              st.binary(min_size=TOKEN_BYTES, max_size=TOKEN_BYTES), st.integers(0, 2**64 - 1),
              st.binary(max_size=4096)).map(lambda t: _frame(t[0], t[1], t[2]) + t[3]),
)


def _attack(port: int, payload: bytes) -> bytes:
    """Send ``payload`` to a KV port, half-close, and return whatever comes back before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the worker already refused and closed: fine
            return b""
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except OSError:
            pass
        return out


def test_reservation_untouched_by_hostile_peers() -> None:
    """In-process: whatever arrives without the token, the posted views keep every byte; a peer that
    connects and stays silent is cut off after the handshake timeout."""
    payloads: list[bytes] = []

    @given(hostile)
    @settings(max_examples=60, deadline=None)
    def collect(p: bytes) -> None:
        payloads.append(p)

    collect()

    async def main() -> None:
        rx = TcpTransport(handshake_timeout=0.5)
        await rx.start()
        pool = np.zeros(64 * 1024, dtype=np.uint8)
        exp = rx.expect(POSTED_ID, [memoryview(pool)])
        port = int(rx.endpoint.rsplit(":", 1)[1])
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(rx.run)
                for p in payloads:
                    reply = await anyio.to_thread.run_sync(_attack, port, p)
                    assert reply in (b"", b"\x00")  # never a go-ahead
                silent = await anyio.connect_tcp("127.0.0.1", port)
                t0 = time.monotonic()
                with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await silent.receive()  # closed by the listener, not by us
                assert time.monotonic() - t0 >= 0.4
                await silent.aclose()
                tg.cancel_scope.cancel()
        finally:
            await rx.close()
        assert not pool.any(), "hostile bytes reached the pool"
        assert not exp.claimed and not exp.done.is_set()  # the real sender can still deliver
        assert rx.refused >= len(payloads) + 1

    anyio.run(main)


# --- a real decode worker ---------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory):
    with running(Stack(tmp_path_factory.mktemp("kvsec"), e2e_engine(), metrics=True)) as s:
        assert s.decoders[0].alive()
        yield s


def _kv_port(s: Stack) -> int:
    found: list[int] = []

    def logged() -> bool:
        m = re.search(r"KV transport \w+ at tcp://[\d.]+:(\d+)", s.decoders[0].log())
        if m:
            found.append(int(m.group(1)))
        return bool(m)

    wait_until(logged, 30, what="the decode worker's KV endpoint in its log")
    return found[0]


def _greedy(s: Stack) -> str:
    r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": "The KV port is",
                                                    "max_tokens": 8, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _refused(s: Stack) -> float:
    text = httpx.get(f"http://127.0.0.1:{s.metrics_ports['decode-0']}/metrics", timeout=5).text
    m = re.search(r"^baton_kv_transfers_refused_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_worker_kv_port_survives_hostile_connections(worker_stack: Stack) -> None:
    s = worker_stack
    port = _kv_port(s)
    pid = s.decoders[0].pid
    before_text = _greedy(s)  # also warms the worker up, so RSS is steady
    for _ in range(3):
        _attack(port, struct.pack("!I", 2**32 - 1))
    rss0 = _rss_kib(pid)
    sent: list[bytes] = []

    @given(hostile)
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    def attack(payload: bytes) -> None:
        sent.append(payload)
        assert _attack(port, payload) in (b"", b"\x00")

    t0 = time.monotonic()
    attack()
    elapsed = time.monotonic() - t0
    wait_until(lambda: _refused(s) >= len(sent), 10, what="every hostile connection counted as refused")
    grown = _rss_kib(pid) - rss0
    assert grown < 1024, f"RSS grew by {grown} KiB under {len(sent)} hostile connections"
    assert s.decoders[0].alive()
    assert s.health().get("decode_workers") == 1
    assert _greedy(s) == before_text  # still serving, and the same greedy output
    print(f"{len(sent)} hostile connections in {elapsed:.2f}s; RSS grew {grown} KiB")
