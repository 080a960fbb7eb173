"""KV transport over TCP sockets (optionally TLS), zero-copy at both ends.

Wire, per transfer on a persistent connection:

1. sender -> receiver: a fixed-size auth frame (``AUTH_FRAME``: transfer id, the one-time token
   the receiver issued with its reservation, total payload bytes);
2. receiver -> sender: one byte, 1 (go: id known, token right and unused, length equal to the
   reservation) or 0 (refused; the receiver then closes the connection);
3. sender -> receiver: the raw bytes of every view in order, read with ``recv_into`` straight
   into the posted views;
4. receiver -> sender: one status byte (1: all bytes landed).

Nothing is allocated from a length a peer sent, and no byte reaches the pool before step 2. A new
connection must authenticate its first transfer (TLS handshake included) within
``HANDSHAKE_TIMEOUT``; once a frame has started, the rest of it must follow as fast.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

import anyio

from shared.kv_transport.base import (
    AUTH_FRAME,
    HANDSHAKE_TIMEOUT,
    KvTransport,
    TransferError,
    as_bytes,
    pack_auth,
    unpack_auth,
)
from shared.kv_transport.tls import KvTls, PlainConn, TlsConn

log = logging.getLogger("baton.kv_transport.tcp")

MAX_PENDING = 1024  # connections not yet authenticated; beyond this new ones are closed at once
_GO, _NO = b"\x01", b"\x00"


async def _recv_exactly_into(conn: PlainConn, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = await conn.recv_into(view[got:])
        if n == 0:
            raise TransferError("peer closed the connection mid-transfer")
        got += n


async def _recv_byte(conn: PlainConn) -> bytes:
    buf = bytearray(1)
    await _recv_exactly_into(conn, memoryview(buf))
    return bytes(buf)


class TcpTransport(KvTransport):
    name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, bind_host: str | None = None,
                 tls: KvTls | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        super().__init__()
        self.host = host  # advertised in endpoint
        self.bind_host = bind_host or host
        self._port = port
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self._server_ctx = tls.context(server_side=True) if tls else None
        self._client_ctx = tls.context(server_side=False) if tls else None
        self._listener: socket.socket | None = None
        self._pool: dict[str, tuple[PlainConn, asyncio.Lock]] = {}
        self._pending = 0

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
                sock, _ = await loop.sock_accept(self._listener)
                if self._pending >= MAX_PENDING:
                    sock.close()
                    continue
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tg.start_soon(self._serve_peer, sock)

    async def _serve_peer(self, sock: socket.socket) -> None:
        conn: PlainConn = PlainConn(sock)
        frame = memoryview(bytearray(AUTH_FRAME.size))  # all an unauthenticated peer can make us hold
        authenticated = False
        self._pending += 1
        try:
            if self._server_ctx is not None:
                conn = TlsConn(sock, self._server_ctx, server_side=True)
                with anyio.fail_after(self.handshake_timeout):
                    await conn.handshake()
            while True:
                try:
                    if authenticated:
                        # An authenticated peer may idle between transfers (a pooled connection).
                        if await conn.recv_into(frame[:1]) == 0:
                            return
                        start = 1
                    else:
                        start = 0
                    with anyio.fail_after(self.handshake_timeout):
                        await _recv_exactly_into(conn, frame[start:])
                except TimeoutError:
                    self._count_refusal(f"no authentication within {self.handshake_timeout}s")
                    return
                try:
                    transfer_id, token, total = unpack_auth(frame)
                    exp = self._authorize(transfer_id, token, total)
                except TransferError as e:
                    self._count_refusal(e)
                    await conn.sendall(_NO)
                    return  # nothing was written; the connection is closed
                if not authenticated:
                    authenticated = True
                    self._pending -= 1
                await conn.sendall(_GO)
                # The bytes land in a task of their own that forget() can cancel at once: a
                # cancelled recv_into never writes, so the owner may reuse the views.
                recv = asyncio.ensure_future(self._recv_views(conn, exp.views))
                exp.abort = recv.cancel
                try:
                    await asyncio.wait({recv})
                finally:
                    exp.abort = None
                    recv.cancel()  # no-op once done; stops it if this task is cancelled
                if recv.cancelled():
                    log.info("transfer %r abandoned mid-way; dropping the connection", transfer_id)
                    return  # the stream is out of step: the sender sees the connection close
                recv.result()  # a broken peer: raises
                ok = exp.error is None
                exp.done.set()
                await conn.sendall(_GO if ok else _NO)
        except (OSError, TransferError) as e:  # ssl.SSLError is an OSError
            if not authenticated:  # garbage, a failed TLS handshake, a frame cut short
                self._count_refusal(f"unauthenticated peer: {e!r}")
            log.debug("KV peer connection ended: %r", e)
        except TimeoutError:
            self._count_refusal(f"no TLS handshake within {self.handshake_timeout}s")
        finally:
            if not authenticated:
                self._pending -= 1
            conn.close()

    @staticmethod
    async def _recv_views(conn: PlainConn, views: list[memoryview]) -> None:
        for view in views:
            await _recv_exactly_into(conn, view)

    async def _connection(self, endpoint: str) -> tuple[PlainConn, asyncio.Lock]:
        if endpoint in self._pool:
            return self._pool[endpoint]
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, (host, int(port)))
            conn: PlainConn = PlainConn(sock)
            if self._client_ctx is not None:
                conn = TlsConn(sock, self._client_ctx, server_side=False)
                await conn.handshake()
        except OSError as e:
            sock.close()
            raise TransferError(f"cannot reach {endpoint}: {e}") from e
        entry = (conn, asyncio.Lock())
        self._pool[endpoint] = entry
        return entry

    async def send(self, endpoint: str, transfer_id: str, views: Sequence[memoryview], timeout: float, *,
                   token: bytes) -> None:
        views = as_bytes(views)
        frame = pack_auth(transfer_id, token, sum(len(v) for v in views))
        refused = False
        try:
            with anyio.fail_after(timeout):
                conn, lock = await self._connection(endpoint)
                async with lock:
                    await conn.sendall(frame)
                    go = await _recv_byte(conn)
                    if go != _GO:
                        refused = True
                        raise TransferError(f"{endpoint} refused transfer {transfer_id!r} (token or length)")
                    for v in views:
                        await conn.sendall(v)
                    status = await _recv_byte(conn)
        except (TimeoutError, OSError, TransferError) as e:
            self._drop(endpoint)  # the stream is out of step, dead or refused: never reuse it
            if refused:
                raise
            raise TransferError(f"transfer {transfer_id!r} to {endpoint} failed: {e!r}") from e
        if status != _GO:
            raise TransferError(f"{endpoint} did not confirm transfer {transfer_id!r}")

    def _drop(self, endpoint: str) -> None:
        entry = self._pool.pop(endpoint, None)
        if entry is not None:
            entry[0].close()

    async def close(self) -> None:
        for endpoint in list(self._pool):
            self._drop(endpoint)
        if self._listener is not None:
            self._listener.close()
