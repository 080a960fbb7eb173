"""The KV transports move bytes bit-exactly between differently shaped runs of block pools."""

from __future__ import annotations

import importlib.util
import subprocess
import uuid
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.kv_transport import KvTls, TransferError, make_transport, merged_boundaries
from shared.kv_transport.base import cut
from shared.kv_transport.tcp import TcpTransport
from tests.require import missing

pytestmark = pytest.mark.timeout(120)

KINDS = ["tcp", "ucx"]
BLOCK = 4096  # bytes per block in these tests


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each transport; ucx skips where ucxx is not installed, and fails under CI=true."""
    if request.param == "ucx" and importlib.util.find_spec("ucxx") is None:
        missing("ucxx is not installed (pip install 'baton[ucx]')")
    return request.param


def runs(pool: np.ndarray, block_ids: list[int]) -> list[memoryview]:
    """Views of contiguous runs of blocks, in the order of ``block_ids`` (as an engine would give)."""
    out, i = [], 0
    while i < len(block_ids):
        j = i
        while j + 1 < len(block_ids) and block_ids[j + 1] == block_ids[j] + 1:
            j += 1
        out.append(memoryview(pool[block_ids[i] * BLOCK:(block_ids[j] + 1) * BLOCK]))
        i = j + 1
    return out


@given(st.lists(st.integers(1, 50), min_size=1, max_size=8), st.lists(st.integers(1, 50), min_size=1, max_size=8))
@settings(max_examples=200)
def test_merged_boundaries_cut_both_sides(a: list[int], b: list[int]) -> None:
    if sum(a) != sum(b):
        b = [*b, sum(a) - sum(b)] if sum(a) > sum(b) else b
        if sum(a) != sum(b):
            with pytest.raises(TransferError):
                merged_boundaries(a, b)
            return
    pieces = merged_boundaries(a, b)
    assert sum(pieces) == sum(a)
    for sizes in (a, b):
        bufs = [memoryview(bytearray(n)) for n in sizes]
        assert sum(len(p) for p in cut(bufs, pieces)) == sum(sizes)


async def _round_trips(rx, tx) -> None:  # type: ignore[no-untyped-def]
    """Transfers between two started transports: good ones land bit-exactly; a transfer without
    its token (unknown id, wrong token, replayed token, wrong length) is refused with nothing
    written, and the sender can still transfer afterwards."""
    rng = np.random.default_rng(0)
    src_pool = rng.integers(0, 256, size=64 * BLOCK, dtype=np.uint8)
    dst_pool = np.zeros(64 * BLOCK, dtype=np.uint8)
    src_ids = [3, 4, 5, 9, 10, 20, 21, 22, 23, 40]  # the prefill side's blocks for a prompt
    dst_ids = [0, 1, 30, 31, 32, 33, 7, 8, 9, 50]  # the decode side's reserved blocks
    async with anyio.create_task_group() as tg:
        tg.start_soon(rx.run)
        for _ in range(3):  # a reused connection must stay in step
            tid = uuid.uuid4().hex
            token = rx.expect(tid, runs(dst_pool, dst_ids)).token
            await tx.send(rx.endpoint, tid, runs(src_pool, src_ids), timeout=30, token=token)
            await rx.wait(tid, timeout=10)
            for s, d in zip(src_ids, dst_ids, strict=True):
                assert np.array_equal(src_pool[s * BLOCK:(s + 1) * BLOCK], dst_pool[d * BLOCK:(d + 1) * BLOCK])
            dst_pool[:] = 0
            # The token was good once: replaying it is refused.
            with pytest.raises(TransferError, match="refused"):
                await tx.send(rx.endpoint, tid, runs(src_pool, src_ids), timeout=30, token=token)
        # An unknown transfer is refused, and the sender still works afterwards.
        with pytest.raises(TransferError, match="refused"):
            await tx.send(rx.endpoint, "nobody-posted-this", runs(src_pool, src_ids), timeout=30, token=token)
        tid = uuid.uuid4().hex
        token = rx.expect(tid, runs(dst_pool, dst_ids[:3])).token
        # A wrong token, and the right token with another length: refused, nothing written, and
        # the reservation still stands for its real sender.
        with pytest.raises(TransferError, match="refused"):
            await tx.send(rx.endpoint, tid, runs(src_pool, src_ids[:3]), timeout=30, token=bytes(len(token)))
        with pytest.raises(TransferError, match="refused"):
            await tx.send(rx.endpoint, tid, runs(src_pool, src_ids[:2]), timeout=30, token=token)
        assert not dst_pool.any()
        await tx.send(rx.endpoint, tid, runs(src_pool, src_ids[:3]), timeout=30, token=token)
        await rx.wait(tid, timeout=10)
        assert dst_pool.any()
        # An abandoned transfer (request cancelled) fails its waiter and refuses the sender.
        tid = uuid.uuid4().hex
        token = rx.expect(tid, runs(dst_pool, dst_ids[:2])).token
        rx.forget(tid)
        with pytest.raises(TransferError):
            await tx.send(rx.endpoint, tid, runs(src_pool, src_ids[:2]), timeout=30, token=token)
        assert rx.refused >= 6
        tg.cancel_scope.cancel()


def test_round_trip_between_differently_shaped_runs(kind: str) -> None:
    async def main() -> None:
        rx, tx = make_transport(kind), make_transport(kind)
        await rx.start()
        await tx.start()
        try:
            await _round_trips(rx, tx)
        finally:
            await tx.close()
            await rx.close()

    anyio.run(main)


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A CA-less self-signed certificate for 127.0.0.1, made with openssl (always on Linux)."""
    cert, key = tmp / "kv.crt", tmp / "kv.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=baton-kv", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    return cert, key


def test_tls_round_trip_and_refusals(tmp_path: Path) -> None:
    """Mutual TLS: the same transfers as plain TCP; a peer without a certificate the CA signed, or
    speaking plain TCP, is refused during the handshake."""
    cert, key = _self_signed(tmp_path)
    tls = KvTls(cert=str(cert), key=str(key), ca=str(cert))  # self-signed: it is its own CA

    async def main() -> None:
        rx, tx = TcpTransport(tls=tls), TcpTransport(tls=tls)
        await rx.start()
        await tx.start()
        try:
            await _round_trips(rx, tx)
            async with anyio.create_task_group() as tg:
                tg.start_soon(rx.run)
                (tmp_path / "other").mkdir()
                other = _self_signed(tmp_path / "other")
                stranger = TcpTransport(tls=KvTls(cert=str(other[0]), key=str(other[1]), ca=str(cert)))
                plain = TcpTransport()
                dst = np.zeros(BLOCK, dtype=np.uint8)
                for peer in (stranger, plain):
                    tid = uuid.uuid4().hex
                    token = rx.expect(tid, [memoryview(dst)]).token
                    with pytest.raises(TransferError):
                        await peer.send(rx.endpoint, tid, [memoryview(np.ones(BLOCK, np.uint8))], timeout=10,
                                        token=token)
                    await peer.close()
                    rx.forget(tid)
                assert not dst.any()
                tg.cancel_scope.cancel()
        finally:
            await tx.close()
            await rx.close()

    anyio.run(main)


def test_send_to_nobody_fails_fast(kind: str) -> None:
    async def main() -> None:
        tx = make_transport(kind)
        await tx.start()
        from baton.nats_server import free_port

        with anyio.fail_after(15):
            with pytest.raises(TransferError):
                await tx.send(f"{kind}://127.0.0.1:{free_port()}", "t", [memoryview(bytearray(16))], timeout=10,
                              token=bytes(32))
        await tx.close()

    anyio.run(main)
