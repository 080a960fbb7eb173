"""The KV transport interface and what both implementations share."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
from prometheus_client import Counter


class TransferError(Exception):
    """A transfer did not complete: peer gone, unknown transfer id, size mismatch or timeout."""


log = logging.getLogger("baton.kv_transport")

REFUSED = Counter("baton_kv_transfers_refused_total",
                  "KV transfers refused: unknown id, wrong or used token, wrong length, no authentication in time")

TOKEN_BYTES = 32  # one-time transfer tokens: 256 random bits, never guessed
MAX_TRANSFER_ID = 255
# What a sender presents before a byte of payload is accepted: transfer id (length + padded
# bytes), its one-time token, and the total payload length. Fixed size: a listener reads exactly
# this many bytes from an unauthenticated peer and never allocates from a length it was sent.
AUTH_FRAME = struct.Struct(f"!B{MAX_TRANSFER_ID}s{TOKEN_BYTES}sQ")
HANDSHAKE_TIMEOUT = 5.0  # seconds a new peer has to authenticate (TLS handshake included)


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def pack_auth(transfer_id: str, token: bytes, total: int) -> bytes:
    tid = transfer_id.encode()
    if len(tid) > MAX_TRANSFER_ID:
        raise TransferError(f"transfer id longer than {MAX_TRANSFER_ID} bytes")
    if len(token) != TOKEN_BYTES:
        raise TransferError("a transfer needs the one-time token its receiver issued")
    return AUTH_FRAME.pack(len(tid), tid, token, total)


def unpack_auth(frame: bytes | bytearray | memoryview) -> tuple[str, bytes, int]:
    n, tid, token, total = AUTH_FRAME.unpack(frame)
    if n > MAX_TRANSFER_ID:
        raise TransferError("malformed transfer header")
    return tid[:n].decode(errors="replace"), token, total


def merged_boundaries(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Piece lengths such that every piece lies inside one view of ``a`` and one of ``b``.

    The two sides hold the same bytes in differently shaped runs (a sequence's blocks are
    contiguous in different places on each worker). Message transports need equal message
    sizes on both ends, so both sides cut their views at the union of both sides' boundaries.
    """
    if sum(a) != sum(b):
        raise TransferError(f"size mismatch: sender has {sum(a)} bytes, receiver expects {sum(b)}")
    cuts: set[int] = set()
    for sizes in (a, b):
        pos = 0
        for n in sizes:
            pos += n
            cuts.add(pos)
    out, prev = [], 0
    for c in sorted(cuts):
        if c > prev:
            out.append(c - prev)
            prev = c
    return out


def cut(views: Sequence[memoryview], pieces: Sequence[int]) -> list[memoryview]:
    """Slice ``views`` (bytes, in order) into consecutive pieces of the given lengths."""
    out: list[memoryview] = []
    it = iter(views)
    cur = next(it, None)
    off = 0
    for n in pieces:
        while cur is not None and off == len(cur):
            cur, off = next(it, None), 0
        assert cur is not None and off + n <= len(cur), "pieces must respect view boundaries"
        out.append(cur[off : off + n])
        off += n
    return out


def as_bytes(views: Sequence[memoryview]) -> list[memoryview]:
    return [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views]


@dataclass
class Expected:
    views: list[memoryview]
    token: bytes = field(default_factory=new_token)  # the sender must present it; good once
    claimed: bool = False  # a sender presented the token: it cannot be presented again
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    # Set by a transport while bytes are landing in ``views``: stops that at once, so that after
    # forget() nothing writes into memory its owner may already have handed to someone else.
    abort: Callable[[], None] | None = None

    @property
    def sizes(self) -> list[int]:
        return [len(v) for v in self.views]


class KvTransport(ABC):
    """Receive into posted views; send from views. One instance per worker."""

    name = "kv"

    def __init__(self) -> None:
        self._expected: dict[str, Expected] = {}
        self.refused = 0  # transfers refused (unknown id, wrong or used token, wrong length, timeout)
        self._last_refusal_log = -1e9

    def _count_refusal(self, why: object) -> None:
        """Count a refused peer; logged at most every 10 s, so a flood of them cannot flood the logs."""
        self.refused += 1
        REFUSED.inc()
        now = time.monotonic()
        if now - self._last_refusal_log >= 10.0:
            self._last_refusal_log = now
            log.warning("refused a KV transfer (%s); %d refused so far", why, self.refused)
        else:
            log.debug("refused a KV transfer: %s", why)

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where peers send to, e.g. ``tcp://127.0.0.1:40123``; valid after start()."""

    @abstractmethod
    async def start(self) -> None:
        """Open the listening side."""

    @abstractmethod
    async def run(self) -> None:
        """Serve incoming transfers until cancelled (start it in the worker's task group)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def send(self, endpoint: str, transfer_id: str, views: Sequence[memoryview], timeout: float, *,
                   token: bytes) -> None:
        """Send ``views`` (in order) to the peer's posted transfer, presenting the one-time ``token``
        its receiver issued; returns once it has landed."""

    def expect(self, transfer_id: str, views: Sequence[memoryview]) -> Expected:
        """Post destination views for a transfer that a peer will send. The returned Expected's
        ``token`` must reach the sender (in the job message): without it nothing is accepted."""
        if transfer_id in self._expected:
            raise TransferError(f"transfer {transfer_id!r} already posted")
        exp = Expected(as_bytes(views))
        self._expected[transfer_id] = exp
        return exp

    def forget(self, transfer_id: str) -> None:
        """Stop accepting a transfer (its request was cancelled or timed out)."""
        exp = self._expected.pop(transfer_id, None)
        if exp is not None and not exp.done.is_set():
            exp.error = "abandoned"
            exp.done.set()
            if exp.abort is not None:
                exp.abort()

    async def wait(self, transfer_id: str, timeout: float) -> None:
        exp = self._expected.get(transfer_id)
        if exp is None:
            raise TransferError(f"transfer {transfer_id!r} was not posted")
        try:
            with anyio.fail_after(timeout):
                await exp.done.wait()
        except TimeoutError:
            self.forget(transfer_id)  # a transfer still landing must stop before the views are reused
            raise TransferError(f"transfer {transfer_id!r} did not arrive within {timeout}s") from None
        finally:
            self._expected.pop(transfer_id, None)
        if exp.error:
            raise TransferError(exp.error)

    def _authorize(self, transfer_id: str, token: bytes, total: int) -> Expected:
        """The posted transfer a peer may now write into, or TransferError: unknown id, wrong or
        already used token, or a length other than the reservation's."""
        exp = self._expected.get(transfer_id)
        # Compared in constant time, and also for unknown ids, so timing tells a guesser nothing.
        good = hmac.compare_digest(token, exp.token if exp is not None else bytes(TOKEN_BYTES))
        if exp is None or not good:
            raise TransferError(f"transfer {transfer_id!r}: unknown, or wrong token")
        if exp.claimed or exp.done.is_set():
            raise TransferError(f"transfer {transfer_id!r}: token already used")
        if total != sum(exp.sizes):
            raise TransferError(f"transfer {transfer_id!r}: {total} bytes offered, {sum(exp.sizes)} reserved")
        exp.claimed = True
        return exp
