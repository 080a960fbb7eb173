"""KV transport over UCX (``ucxx``): shared memory, TCP, RDMA or NVLink, whatever UCX finds.

Per transfer on a cached endpoint: the sender sends the fixed-size auth frame (transfer id,
one-time token, total bytes; see ``base.AUTH_FRAME``); the receiver checks it before anything
else is received and answers with its own view sizes (or a refusal, then closes the endpoint);
the sender sends its view sizes; both cut their views at the union of
both sides' boundaries (``merged_boundaries``) so every UCX message lands in one contiguous
region at each end, with no staging copies; then one status byte back. On CPU-only hosts set
``UCX_TLS=tcp,self,sm`` (done here unless already set).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

import anyio
import msgspec
import numpy as np

from shared.kv_transport.base import (
    AUTH_FRAME,
    HANDSHAKE_TIMEOUT,
    KvTransport,
    TransferError,
    as_bytes,
    cut,
    merged_boundaries,
    pack_auth,
    unpack_auth,
)

log = logging.getLogger("baton.kv_transport.ucx")


def _ucxx():  # imported lazily: the extra is optional
    os.environ.setdefault("UCX_TLS", "tcp,self,sm")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    import ucxx

    return ucxx


async def _send_blob(ep, data: bytes) -> None:
    await ep.send(np.array([len(data)], dtype=np.uint64))
    await ep.send(np.frombuffer(data, dtype=np.uint8) if data else np.zeros(1, dtype=np.uint8))


MAX_BLOB = 1 << 20  # a list of view sizes; only exchanged after the token was checked


async def _recv_blob(ep) -> bytes:
    n = np.empty(1, dtype=np.uint64)
    await ep.recv(n)
    if int(n[0]) > MAX_BLOB:
        raise TransferError(f"peer announced a {int(n[0])}-byte header (limit {MAX_BLOB})")
    buf = np.empty(max(int(n[0]), 1), dtype=np.uint8)
    await ep.recv(buf)
    return buf[: int(n[0])].tobytes()


class UcxTransport(KvTransport):
    name = "ucx"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        super().__init__()
        self.handshake_timeout = handshake_timeout
        self.host = host
        self._port = port
        self._listener = None
        self._eps: dict[str, tuple[object, asyncio.Lock]] = {}

    @property
    def endpoint(self) -> str:
        assert self._listener is not None, "start() first"
        return f"ucx://{self.host}:{self._listener.port}"

    async def start(self) -> None:
        ucxx = _ucxx()
        self._listener = ucxx.create_listener(self._serve_peer, port=self._port)

    async def run(self) -> None:
        await anyio.sleep_forever()  # ucxx drives the listener's handlers itself

    async def _serve_peer(self, ep) -> None:
        frame = np.empty(AUTH_FRAME.size, dtype=np.uint8)  # all an unauthenticated peer can make us hold
        authenticated = False
        try:
            while True:
                try:
                    # A new peer must authenticate at once; a proven one may idle between transfers.
                    await asyncio.wait_for(ep.recv(frame), None if authenticated else self.handshake_timeout)
                except TimeoutError:
                    self._count_refusal(f"no authentication within {self.handshake_timeout}s")
                    return
                except Exception:
                    return  # peer closed between transfers
                try:
                    transfer_id, token, total = unpack_auth(frame.tobytes())
                    exp = self._authorize(transfer_id, token, total)
                except TransferError as e:
                    self._count_refusal(e)
                    await _send_blob(ep, msgspec.msgpack.encode(None))
                    return  # nothing was received into the pool; the endpoint is closed
                authenticated = True
                await _send_blob(ep, msgspec.msgpack.encode(exp.sizes))
                theirs = msgspec.msgpack.decode(await _recv_blob(ep), type=list[int])
                if sum(theirs) != total:
                    raise TransferError(f"transfer {transfer_id!r}: sizes do not add up to the announced length")
                for piece in cut(exp.views, merged_boundaries(theirs, exp.sizes)):
                    await ep.recv(np.frombuffer(piece, dtype=np.uint8))
                exp.done.set()
                await ep.send(np.ones(1, dtype=np.uint8))
        except Exception as e:
            log.debug("KV peer endpoint ended: %r", e)
        finally:
            try:
                await ep.close()
            except Exception:
                pass

    async def _endpoint(self, endpoint: str):
        if endpoint in self._eps:
            return self._eps[endpoint]
        host, _, port = endpoint.removeprefix("ucx://").rpartition(":")
        try:
            ep = await _ucxx().create_endpoint(host, int(port))
        except Exception as e:
            raise TransferError(f"cannot reach {endpoint}: {e!r}") from e
        entry = (ep, asyncio.Lock())
        self._eps[endpoint] = entry
        return entry

    async def send(self, endpoint: str, transfer_id: str, views: Sequence[memoryview], timeout: float, *,
                   token: bytes) -> None:
        views = as_bytes(views)
        sizes = [len(v) for v in views]
        frame = np.frombuffer(bytearray(pack_auth(transfer_id, token, sum(sizes))), dtype=np.uint8)
        try:
            with anyio.fail_after(timeout):
                ep, lock = await self._endpoint(endpoint)
                async with lock:
                    await ep.send(frame)
                    theirs = msgspec.msgpack.decode(await _recv_blob(ep), type=list[int] | None)
                    if theirs is None:
                        raise TransferError(f"{endpoint} refused transfer {transfer_id!r} (token or length)")
                    await _send_blob(ep, msgspec.msgpack.encode(sizes))
                    for piece in cut(views, merged_boundaries(sizes, theirs)):
                        # ucxx wants a writable-typed buffer object; the bytes are only read
                        await ep.send(np.frombuffer(piece, dtype=np.uint8))
                    status = np.zeros(1, dtype=np.uint8)
                    await ep.recv(status)
        except TransferError:
            self._drop(endpoint)
            raise
        except Exception as e:
            self._drop(endpoint)
            raise TransferError(f"transfer {transfer_id!r} to {endpoint} failed: {e!r}") from e
        if status[0] != 1:
            raise TransferError(f"{endpoint} did not confirm transfer {transfer_id!r}")

    def _drop(self, endpoint: str) -> None:
        self._eps.pop(endpoint, None)  # ucxx closes endpoints when collected

    async def close(self) -> None:
        self._eps.clear()
        if self._listener is not None:
            self._listener.close()
