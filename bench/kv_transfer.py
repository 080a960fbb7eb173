"""KV transfer throughput and latency: UCX and TCP against a plain memcpy ceiling, one run.

Pools shaped like baton-small's KV cache (8 layers, K and V, 16 tokens x 4 KV heads x 64 dims,
fp32: 256 KiB per block over all layers). Each transfer moves N blocks as one run per layer and
K/V (2 x 8 views), pool to pool, as the disaggregated prefill path does.

    python bench/kv_transfer.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
import uuid
from pathlib import Path

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared.kv_transport import make_transport

LAYERS, KV = 8, 2
BLOCK_BYTES_PER_VIEW = 16 * 4 * 64 * 4  # one block of one layer's K (or V)
POOL_BLOCKS = 300


def pools() -> tuple[list[np.ndarray], list[np.ndarray]]:
    src = [np.random.default_rng(i).integers(0, 255, POOL_BLOCKS * BLOCK_BYTES_PER_VIEW, dtype=np.uint8)
           for i in range(LAYERS * KV)]
    dst = [np.zeros(POOL_BLOCKS * BLOCK_BYTES_PER_VIEW, dtype=np.uint8) for _ in range(LAYERS * KV)]
    return src, dst


def views(pool: list[np.ndarray], start: int, n: int) -> list[memoryview]:
    return [memoryview(p[start * BLOCK_BYTES_PER_VIEW:(start + n) * BLOCK_BYTES_PER_VIEW]) for p in pool]


def memcpy(n: int, repeats: int) -> list[float]:
    src, dst = pools()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s, d in zip(views(src, 0, n), views(dst, 10, n), strict=True):
            np.copyto(np.frombuffer(d, dtype=np.uint8), np.frombuffer(s, dtype=np.uint8))
        out.append(time.perf_counter() - t0)
    return out


async def transfer(kind: str, n: int, repeats: int) -> list[float]:
    src, dst = pools()
    rx, tx = make_transport(kind), make_transport(kind)
    await rx.start()
    await tx.start()
    out = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(rx.run)
        for i in range(repeats + 1):
            tid = uuid.uuid4().hex
            token = rx.expect(tid, views(dst, 10, n)).token
            t0 = time.perf_counter()
            await tx.send(rx.endpoint, tid, views(src, 0, n), timeout=60, token=token)
            await rx.wait(tid, timeout=60)
            if i:  # the first one also pays for connecting
                out.append(time.perf_counter() - t0)
        assert all(np.array_equal(s[:n * BLOCK_BYTES_PER_VIEW], d[10 * BLOCK_BYTES_PER_VIEW:(10 + n) * BLOCK_BYTES_PER_VIEW])
                   for s, d in zip(src, dst, strict=True))
        tg.cancel_scope.cancel()
    await tx.close()
    await rx.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    kinds = ["tcp"] + (["ucx"] if importlib.util.find_spec("ucxx") else [])
    print(f"{'blocks':>6} {'MiB':>7} " + " ".join(f"{k + ' GB/s':>10} {k + ' p50 ms':>11}" for k in ["memcpy", *kinds]))
    for n in (1, 16, 256):
        nbytes = n * BLOCK_BYTES_PER_VIEW * LAYERS * KV
        cols = []
        for k in ["memcpy", *kinds]:
            ts = memcpy(n, args.repeats) if k == "memcpy" else asyncio.run(transfer(k, n, args.repeats))
            p50 = statistics.median(ts)
            cols.append(f"{nbytes / p50 / 1e9:10.2f} {p50 * 1e3:11.3f}")
        print(f"{n:6d} {nbytes / 2**20:7.2f} " + " ".join(cols), flush=True)


if __name__ == "__main__":
    main()
