"""Moving KV blocks between workers, off the message bus: a small interface, two implementations.

- ``tcp``: plain sockets, zero-copy on both ends (``sendall`` from and ``recv_into`` straight
  into the engines' pool memory). Works everywhere.
- ``ucx``: UCX through ``ucxx`` (extra ``baton[ucx]``), which picks shared memory, TCP, RDMA or
  NVLink as the hardware allows.

The receiver posts destination views (its reserved blocks) under a transfer id *before* the
sender sends; the sender streams its source views in the same logical order. Only the small job
metadata goes over NATS.

Every transfer is authenticated: ``expect()`` issues a random one-time token, which travels to
the sender in the job message; the sender presents it (with the transfer id and total length) in
a fixed-size frame before any payload is accepted. A wrong, missing or reused token, or a length
other than the reservation's, closes the connection with nothing written. TCP can add TLS
(``KvTls``: mutual, certificates like the NATS ones).
"""

from __future__ import annotations

from shared.kv_transport.base import KvTransport, TransferError, merged_boundaries
from shared.kv_transport.tls import KvTls

TRANSPORTS = ("tcp", "ucx")


def make_transport(kind: str, host: str = "127.0.0.1", bind_host: str | None = None,
                   tls: KvTls | None = None) -> KvTransport:
    """``host`` is the address peers dial (advertised in ``endpoint``); ``bind_host`` the one we listen
    on (default: ``host``; see shared/kv_address.py). ``tls`` applies to the tcp transport only."""
    if kind == "tcp":
        from shared.kv_transport.tcp import TcpTransport

        return TcpTransport(host, bind_host=bind_host, tls=tls)
    if kind == "ucx":
        if tls is not None:
            raise ValueError("KV TLS (BATON_KV_TLS_*) applies to the tcp transport; UCX brings its own transports")
        from shared.kv_transport.ucx import UcxTransport

        return UcxTransport(host)
    raise ValueError(f"unknown KV transport {kind!r}; choose one of {', '.join(TRANSPORTS)}")


__all__ = ["TRANSPORTS", "KvTls", "KvTransport", "TransferError", "make_transport", "merged_boundaries"]
