"""KV transfer throughput and latency: UCX and TCP against a plain memcpy ceiling, one run.

Pools shaped like baton-small's KV cache (8 layers, K and V, 16 tokens x 4 KV heads x 64 dims,
fp32: 256 KiB per block over all layers). Each transfer moves N blocks as one run per layer and
K/V (2 x 8 views), pool to pool, as the disaggregated prefill path does.

    python bench/kv_transfer.py [--repeats 20] [--rounds 3]

Each round measures memcpy, TCP and UCX in turn at every size (``--repeats`` transfers each, the
median kept); the table gives the median over the rounds and its min-max, so a noisy neighbour
hits every column alike. A failed transfer is counted, not hidden.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
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
    ap.add_argument("--repeats", type=int, default=20, help="transfers per size, kind and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over every kind")
    args = ap.parse_args()
    kinds = ["memcpy", "tcp"] + (["ucx"] if importlib.util.find_spec("ucxx") else [])
    sizes = (1, 16, 256)
    p50s: dict[tuple[str, int], list[float]] = {}
    errors: dict[str, int] = dict.fromkeys(kinds, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for rnd in range(args.rounds):
        for n in sizes:
            for k in kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]:  # rotate who goes first
                try:
                    ts = memcpy(n, args.repeats) if k == "memcpy" else asyncio.run(transfer(k, n, args.repeats))
                except Exception as e:
                    errors[k] += 1
                    print(f"round {rnd} {k} {n} blocks: ERROR {e!r}", flush=True)
                    continue
                p50s.setdefault((k, n), []).append(statistics.median(ts))
                print(f"round {rnd} {k:6s} {n:3d} blocks: p50 {p50s[(k, n)][-1] * 1e3:8.3f} ms", flush=True)

    def cell(k: str, n: int, nbytes: int) -> str:
        xs = p50s.get((k, n), [])
        if not xs:
            return "- | -"
        med = statistics.median(xs)
        return (f"{nbytes / med / 1e9:.2f} ({nbytes / max(xs) / 1e9:.2f}-{nbytes / min(xs) / 1e9:.2f}) | "
                f"{med * 1e3:.3g} ({min(xs) * 1e3:.3g}-{max(xs) * 1e3:.3g})")

    print(f"\n{started}, {args.rounds} rounds x {args.repeats} transfers, load average {os.getloadavg()[0]:.2f}; "
          f"errors {errors}\n")
    print("| blocks | MiB | " + " | ".join(f"{k} GB/s | {k} ms" for k in kinds) + " |")
    print("|---:|---:|" + "---:|---:|" * len(kinds))
    for n in sizes:
        nbytes = n * BLOCK_BYTES_PER_VIEW * LAYERS * KV
        print(f"| {n} | {nbytes / 2**20:g} | " + " | ".join(cell(k, n, nbytes) for k in kinds) + " |")


if __name__ == "__main__":
    main()
