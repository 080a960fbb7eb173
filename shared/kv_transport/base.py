"""The KV transport interface and what both implementations share."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import msgspec


class TransferError(Exception):
    """A transfer did not complete: peer gone, unknown transfer id, size mismatch or timeout."""


class TransferHeader(msgspec.Struct, kw_only=True):
    transfer_id: str
    sizes: list[int]  # bytes of each source view, in logical order


_header_encoder = msgspec.msgpack.Encoder()
header_decoder = msgspec.msgpack.Decoder(TransferHeader)
encode_header = _header_encoder.encode


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
    async def send(self, endpoint: str, transfer_id: str, views: Sequence[memoryview], timeout: float) -> None:
        """Send ``views`` (in order) to the peer's posted transfer; returns once it has landed."""

    def expect(self, transfer_id: str, views: Sequence[memoryview]) -> Expected:
        """Post destination views for a transfer that a peer will send."""
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

    def _claim(self, header: TransferHeader) -> Expected:
        exp = self._expected.get(header.transfer_id)
        if exp is None or exp.done.is_set():
            raise TransferError(f"unknown transfer {header.transfer_id!r}")
        if exp.abort is not None:
            raise TransferError(f"transfer {header.transfer_id!r} is already being received")
        if sum(header.sizes) != sum(exp.sizes):
            raise TransferError(f"transfer {header.transfer_id!r}: {sum(header.sizes)} bytes offered, "
                                f"{sum(exp.sizes)} expected")
        return exp
