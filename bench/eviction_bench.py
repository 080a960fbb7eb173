"""Eviction policies for a KV tier on a real trace: LRU against S3-FIFO.

Replays Mooncake's conversation trace (../shared/traces/conversation_trace.jsonl). Each request
reads its blocks in order; a block held is a hit, a block not held is computed and inserted. The
hit rate is reported at several tier capacities (in blocks of the trace: 512 tokens each).

    python bench/eviction_bench.py [--trace ../shared/traces/conversation_trace.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared.engines.eviction import LruPolicy, S3FifoPolicy

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"


def replay(requests: list[list[int]], policy) -> float:
    hits = total = 0
    for blocks in requests:
        for h in blocks:
            total += 1
            if policy.touch(h):
                hits += 1
            else:
                policy.insert(h)
    return hits / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--capacities", type=int, nargs="+", default=[1000, 4000, 16000, 64000])
    args = ap.parse_args()
    requests = [json.loads(line)["hash_ids"] for line in open(args.trace)]
    distinct = len({h for r in requests for h in r})
    accesses = sum(len(r) for r in requests)
    print(f"{len(requests)} requests, {accesses} block reads, {distinct} distinct blocks; "
          f"infinite-cache hit rate {1 - distinct / accesses:.3f}")
    print(f"{'capacity':>9} {'LRU':>7} {'S3-FIFO':>8} {'ratio':>6}")
    for cap in args.capacities:
        lru = replay(requests, LruPolicy(cap))
        s3 = replay(requests, S3FifoPolicy(cap))
        print(f"{cap:9d} {lru:7.3f} {s3:8.3f} {s3 / lru if lru else float('nan'):6.2f}", flush=True)


if __name__ == "__main__":
    main()
