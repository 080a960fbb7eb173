"""The KV address a worker advertises vs the one it binds (shared/kv_address.py)."""

from __future__ import annotations

import socket

import anyio

from shared.kv_address import advertised_host, bind_host_for
from shared.kv_transport import make_transport


def test_bind_follows_the_advertisement_unless_given() -> None:
    assert bind_host_for("127.0.0.1") == "127.0.0.1"  # single machine: loopback only
    assert bind_host_for("decode") == "0.0.0.0"  # a service name: every interface
    assert bind_host_for("decode", "10.0.0.5") == "10.0.0.5"


def test_a_name_with_one_address_is_advertised_as_is() -> None:
    assert advertised_host("localhost") == "localhost"
    assert advertised_host("127.0.0.1") == "127.0.0.1"
    assert advertised_host(socket.gethostname()) == socket.gethostname()


def test_scaled_name_advertises_our_own_replica(monkeypatch) -> None:
    # A compose service scaled to 3: its name resolves to three addresses; one is ours (loopback
    # here stands for the container's address: the one this host can bind).
    addrs = ["10.255.255.1", "127.0.0.1", "10.255.255.2"]
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in addrs])
    assert advertised_host("decode") == "127.0.0.1"


def test_transport_binds_one_address_and_advertises_another() -> None:
    async def main() -> None:
        t = make_transport("tcp", "decode", bind_host="127.0.0.1")
        await t.start()
        try:
            assert t.endpoint.startswith("tcp://decode:")
            port = int(t.endpoint.rsplit(":", 1)[1])
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # listening where it bound
        finally:
            await t.close()

    anyio.run(main)
