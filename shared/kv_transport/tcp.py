"""KV transport over plain TCP sockets, zero-copy at both ends.

Wire, per transfer on a persistent connection: a 4-byte length and a msgpack TransferHeader,
then the raw bytes of every view in order, then one status byte back from the receiver (1: all
bytes landed in the posted views; 0: refused, the bytes were drained and dropped). The receiver
reads with ``sock_recv_into`` straight into the posted views, the sender writes with
``sock_sendall`` straight from the engine's pool: no staging copies.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Sequence

import anyio

from shared.kv_transport.base import (
    KvTransport,
    TransferError,
    TransferHeader,
    as_bytes,
    encode_header,
    header_decoder,
)

log = logging.getLogger("baton.kv_transport.tcp")

_LEN = struct.Struct("!I")
_SCRATCH = 1 << 20


async def _recv_exactly_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise TransferError("peer closed the connection mid-transfer")
        got += n


async def _recv_bytes(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    await _recv_exactly_into(loop, sock, memoryview(buf))
    return bytes(buf)


class TcpTransport(KvTransport):
    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, bind_host: str | None = None) -> None:
        super().__init__()
        self.host = host  # advertised in endpoint
        self.bind_host = bind_host or host
        self._port = port
        self._listener: socket.socket | None = None
        self._pool: dict[str, tuple[socket.socket, asyncio.Lock]] = {}
        self._stop = anyio.Event()

    @property
    def endpoint(self) -> str:
        assert self._listener is not None, "start() first"
        return f"tcp://{self.host}:{self._listener.getsockname()[1]}"

    async def start(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.bind_host, self._port))
        s.listen(128)
        s.setblocking(False)
        self._listener = s

    async def run(self) -> None:
        """Accept peers and receive their transfers until cancelled (run it in a task group)."""
        assert self._listener is not None, "start() first"
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            while True:
                conn, _ = await loop.sock_accept(self._listener)
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tg.start_soon(self._serve_peer, conn)

    async def _serve_peer(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    head_len = _LEN.unpack(await _recv_bytes(loop, conn, _LEN.size))[0]
                except TransferError:
                    return  # the peer closed between transfers: normal
                header = header_decoder.decode(await _recv_bytes(loop, conn, head_len))
                try:
                    exp = self._claim(header)
                except TransferError as e:
                    log.warning("refusing transfer: %s", e)
                    await self._drain(loop, conn, sum(header.sizes))
                    await loop.sock_sendall(conn, b"\x00")
                    continue
                # The bytes land in a task of their own that forget() can cancel at once: a
                # cancelled sock_recv_into never writes, so the owner may reuse the views.
                recv = asyncio.ensure_future(self._recv_views(loop, conn, exp.views))
                exp.abort = recv.cancel
                try:
                    await asyncio.wait({recv})
                finally:
                    exp.abort = None
                    recv.cancel()  # no-op once done; stops it if this task is cancelled
                if recv.cancelled():
                    log.info("transfer %r abandoned mid-way; dropping the connection", header.transfer_id)
                    return  # the stream is out of step: the sender sees the connection close
                recv.result()  # a broken peer: raises
                ok = exp.error is None
                exp.done.set()
                await loop.sock_sendall(conn, b"\x01" if ok else b"\x00")
        except (OSError, TransferError) as e:
            log.debug("peer connection ended: %r", e)
        finally:
            conn.close()

    @staticmethod
    async def _recv_views(loop: asyncio.AbstractEventLoop, conn: socket.socket, views: list[memoryview]) -> None:
        for view in views:
            await _recv_exactly_into(loop, conn, view)

    async def _drain(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> None:
        scratch = memoryview(bytearray(min(n, _SCRATCH) or 1))
        while n > 0:
            k = min(n, len(scratch))
            await _recv_exactly_into(loop, conn, scratch[:k])
            n -= k

    async def _connection(self, endpoint: str) -> tuple[socket.socket, asyncio.Lock]:
        if endpoint in self._pool:
            return self._pool[endpoint]
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, (host, int(port)))
        except OSError as e:
            sock.close()
            raise TransferError(f"cannot reach {endpoint}: {e}") from e
        entry = (sock, asyncio.Lock())
        self._pool[endpoint] = entry
        return entry

    async def send(self, endpoint: str, transfer_id: str, views: Sequence[memoryview], timeout: float) -> None:
        views = as_bytes(views)
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(timeout):
                sock, lock = await self._connection(endpoint)
                async with lock:
                    header = encode_header(TransferHeader(transfer_id=transfer_id, sizes=[len(v) for v in views]))
                    await loop.sock_sendall(sock, _LEN.pack(len(header)) + header)
                    for v in views:
                        await loop.sock_sendall(sock, v)
                    status = await _recv_bytes(loop, sock, 1)
        except (TimeoutError, OSError, TransferError) as e:
            self._drop(endpoint)  # the stream is out of step or dead: never reuse it
            raise TransferError(f"transfer {transfer_id!r} to {endpoint} failed: {e!r}") from e
        if status != b"\x01":
            raise TransferError(f"{endpoint} refused transfer {transfer_id!r}")

    def _drop(self, endpoint: str) -> None:
        entry = self._pool.pop(endpoint, None)
        if entry is not None:
            entry[0].close()

    async def close(self) -> None:
        for endpoint in list(self._pool):
            self._drop(endpoint)
        if self._listener is not None:
            self._listener.close()
