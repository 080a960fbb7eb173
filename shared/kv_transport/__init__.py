"""Moving KV blocks between workers, off the message bus: a small interface, two implementations.

- ``tcp``: plain sockets, zero-copy on both ends (``sendall`` from and ``recv_into`` straight
  into the engines' pool memory). Works everywhere.
- ``ucx``: UCX through ``ucxx`` (extra ``baton[ucx]``), which picks shared memory, TCP, RDMA or
  NVLink as the hardware allows.

The receiver posts destination views (its reserved blocks) under a transfer id *before* the
sender sends; the sender streams its source views in the same logical order. Only the small job
metadata goes over NATS.
"""

from __future__ import annotations

from shared.kv_transport.base import KvTransport, TransferError, merged_boundaries

TRANSPORTS = ("tcp", "ucx")


def make_transport(kind: str, host: str = "127.0.0.1", bind_host: str | None = None) -> KvTransport:
    """``host`` is the address peers dial (advertised in ``endpoint``); ``bind_host`` the one we listen
    on (default: ``host``). See shared/kv_address.py."""
    if kind == "tcp":
        from shared.kv_transport.tcp import TcpTransport

        return TcpTransport(host, bind_host=bind_host)
    if kind == "ucx":
        from shared.kv_transport.ucx import UcxTransport

        return UcxTransport(host)
    raise ValueError(f"unknown KV transport {kind!r}; choose one of {', '.join(TRANSPORTS)}")


__all__ = ["TRANSPORTS", "KvTransport", "TransferError", "make_transport", "merged_boundaries"]
