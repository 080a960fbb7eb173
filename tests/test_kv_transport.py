"""The KV transports move bytes bit-exactly between differently shaped runs of block pools."""

from __future__ import annotations

import importlib.util
import uuid

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.kv_transport import TransferError, make_transport, merged_boundaries
from shared.kv_transport.base import cut
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


def test_round_trip_between_differently_shaped_runs(kind: str) -> None:
    async def main() -> None:
        rng = np.random.default_rng(0)
        src_pool = rng.integers(0, 256, size=64 * BLOCK, dtype=np.uint8)
        dst_pool = np.zeros(64 * BLOCK, dtype=np.uint8)
        src_ids = [3, 4, 5, 9, 10, 20, 21, 22, 23, 40]  # the prefill side's blocks for a prompt
        dst_ids = [0, 1, 30, 31, 32, 33, 7, 8, 9, 50]  # the decode side's reserved blocks
        rx, tx = make_transport(kind), make_transport(kind)
        await rx.start()
        await tx.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(rx.run)
                for _ in range(3):  # a reused connection must stay in step
                    tid = uuid.uuid4().hex
                    rx.expect(tid, runs(dst_pool, dst_ids))
                    await tx.send(rx.endpoint, tid, runs(src_pool, src_ids), timeout=30)
                    await rx.wait(tid, timeout=10)
                    for s, d in zip(src_ids, dst_ids, strict=True):
                        assert np.array_equal(src_pool[s * BLOCK:(s + 1) * BLOCK], dst_pool[d * BLOCK:(d + 1) * BLOCK])
                    dst_pool[:] = 0
                # An unknown transfer is refused, and the connection still works afterwards.
                with pytest.raises(TransferError):
                    await tx.send(rx.endpoint, "nobody-posted-this", runs(src_pool, src_ids), timeout=30)
                tid = uuid.uuid4().hex
                rx.expect(tid, runs(dst_pool, dst_ids[:3]))
                await tx.send(rx.endpoint, tid, runs(src_pool, src_ids[:3]), timeout=30)
                await rx.wait(tid, timeout=10)
                # An abandoned transfer (request cancelled) fails its waiter and refuses the sender.
                tid = uuid.uuid4().hex
                rx.expect(tid, runs(dst_pool, dst_ids[:2]))
                rx.forget(tid)
                with pytest.raises(TransferError):
                    await tx.send(rx.endpoint, tid, runs(src_pool, src_ids[:2]), timeout=30)
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
                await tx.send(f"{kind}://127.0.0.1:{free_port()}", "t", [memoryview(bytearray(16))], timeout=10)
        await tx.close()

    anyio.run(main)
