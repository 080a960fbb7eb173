"""The embedded nats-server's ports and start-up errors (baton/nats_server.py)."""

from __future__ import annotations

import socket

import pytest

from baton.nats_server import EmbeddedNats, _ephemeral_range_start, free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    """Below the ephemeral range, no outgoing connection can take a chosen port as its source
    port before the server listens on it (a cluster's routes dial out while its peers start)."""
    ports = [free_port() for _ in range(64)]
    assert len(set(ports)) == len(ports)
    top = _ephemeral_range_start()
    assert all(port < top for port in ports), (top, sorted(ports)[-3:])
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_server_that_exits_at_start_says_why(tmp_path) -> None:
    """The error carries the server's own fatal line, not only the exit code."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        server = EmbeddedNats(data_dir=tmp_path / "store", log_file=tmp_path / "nats.log",
                              extra_args=["-m", str(taken)])
        with pytest.raises(RuntimeError) as raised:
            server.start(timeout=10)
    message = str(raised.value)
    assert "exited with code" in message
    assert "[FTL]" in message and f"127.0.0.1:{taken}" in message and "address already in use" in message
    assert server.proc is None  # stopped, nothing left running
