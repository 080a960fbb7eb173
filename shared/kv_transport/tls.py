"""Optional TLS for the TCP KV transport, configured like the NATS connection's.

``BATON_KV_TLS_CERT`` / ``BATON_KV_TLS_KEY``: this worker's certificate and key, presented both
when it listens and when it sends (every worker is both). ``BATON_KV_TLS_CA``: the CA that signs
workers' certificates; peers must present a certificate it signed, in both directions (mutual
TLS). Host names are not checked: workers are reached at pod/host addresses not known when the
certificates are issued, so the CA is what identifies a Baton worker. Off unless a certificate is
given. The one-time transfer token is checked with or without TLS; TLS adds confidentiality of
the KV bytes (prompts can be recovered from them) and peer identity.

The socket carries TLS through ``ssl.SSLObject`` over memory BIOs, so decrypted bytes land
straight in the posted pool views, as plain TCP's ``recv_into`` does.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass

_CHUNK = 1 << 20  # plaintext handed to TLS at a time: bounds the outgoing buffer
_READ = 1 << 18


@dataclass(frozen=True)
class KvTls:
    cert: str
    key: str | None = None
    ca: str | None = None

    @classmethod
    def from_env(cls) -> KvTls | None:
        env = os.environ.get
        cert, key, ca = env("BATON_KV_TLS_CERT"), env("BATON_KV_TLS_KEY"), env("BATON_KV_TLS_CA")
        if not cert:
            if key or ca:
                raise ValueError("BATON_KV_TLS_KEY/BATON_KV_TLS_CA given without BATON_KV_TLS_CERT")
            return None
        return cls(cert=cert, key=key, ca=ca)

    def context(self, server_side: bool) -> ssl.SSLContext:
        purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
        ctx = ssl.create_default_context(purpose, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.check_hostname = False
        # With a CA: peers must prove they hold a certificate it signed (both directions).
        ctx.verify_mode = ssl.CERT_REQUIRED if self.ca else ssl.CERT_NONE
        return ctx


class PlainConn:
    """A non-blocking socket driven by the event loop: zero-copy in both directions."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def recv_into(self, view: memoryview) -> int:
        return await self._loop.sock_recv_into(self.sock, view)

    async def sendall(self, data: bytes | memoryview) -> None:
        await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


class TlsConn(PlainConn):
    """TLS over the same socket: ciphertext through memory BIOs, plaintext straight into views."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool) -> None:
        super().__init__(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server_side)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self._loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        data = await self._loop.sock_recv(self.sock, _READ)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n = self._tls.read(len(view), view)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            await self._flush()  # TLS 1.3 may have answers to send (key updates)
            return n

    async def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for off in range(0, len(view), _CHUNK):
            self._tls.write(view[off : off + _CHUNK])
            await self._flush()
