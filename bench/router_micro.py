"""Router micro-benchmarks on one core: decision latency and KV event ingestion.

Setup: 64 workers, ~1,000,000 (worker, block) pairs indexed, built from 4k-token sequences
(256 blocks of 16 tokens), with a shared "system prompt" head on some of them so masks hold
several workers. Then:

* decision latency for a 4k-token prompt (256 blocks) with the frontend's precomputed hashes:
  a full hit on 8 workers (the walk's worst case), a half hit, a miss; ``decide`` alone (the
  choice) and ``choose_worker`` (plus recording pending work and predicted blocks);
* the same with the router hashing the prompt itself (``shared.kv_hash.block_hashes``);
* where the time goes: hashing, the prefix walk, decoding masks, the 64-worker cost loop;
* ingestion at steady state (each batch stores a new run and evicts an old one of the same
  worker, so the index stays at 1M): ``KvBlockIndex.apply`` on decoded batches, and msgpack
  decode + apply as the router does per message (less NATS);
* memory: bytes per indexed (worker, block) pair (tracemalloc, everything the index retains).

    python bench/router_micro.py [--blocks 1000000] [--workers 64] [--cpu 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.router.kv_index import depths_by_slot, prefix_depths
from services.router.kv_policy import KvRouter, KvRouterConfig
from shared.kv_hash import block_hashes
from shared.messages import KvEventBatch, KvStored, LoadReport, WorkerInfo, encode, kv_event_decoder

BLOCK = 16
SEQ_BLOCKS = 256  # a 4k-token sequence
SYSTEM_BLOCKS = 32  # shared head (a system prompt) on a quarter of the sequences


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def us(ns: float) -> float:
    return round(ns / 1e3, 2)


def build(router: KvRouter, total: int, n_workers: int, rng: random.Random) -> None:
    """Fill the index with ~``total`` (worker, block) pairs: 4k-token sequences, a quarter with a shared head."""
    system = [rng.getrandbits(64) for _ in range(SYSTEM_BLOCKS)]
    per_worker = total // n_workers
    seq_no = 0
    for w in range(n_workers):
        wid = f"decode-{w:02d}"
        held = 0
        seq = 0
        while held < per_worker:
            n = min(SEQ_BLOCKS, per_worker - held)
            hashes = [rng.getrandbits(64) for _ in range(n)]
            if seq_no % 4 == 0 and n > SYSTEM_BLOCKS:
                hashes[:SYSTEM_BLOCKS] = system
            seq += 1
            seq_no += 1
            router.index.apply(KvEventBatch(worker_id=wid, seq=seq, stored=[KvStored(block_hashes=hashes)]))
            held = router.index.block_count(wid)


def timed(fn, n: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--cpu", type=int, default=0, help="pin to this CPU (-1: do not pin)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the (slow) tracemalloc measurement")
    ap.add_argument("--json", type=str, default="")
    args = ap.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    rng = random.Random(42)
    results: dict = {"workers": args.workers, "target_blocks": args.blocks}

    router = KvRouter(KvRouterConfig(seed=1))
    t0 = time.perf_counter()
    build(router, args.blocks, args.workers, rng)
    st = router.index.stats()
    results["index"] = {"distinct_blocks": st.blocks, "entries": st.entries, "build_s": round(time.perf_counter() - t0, 2)}
    print(f"index: {st.entries:,} (worker, block) pairs, {st.blocks:,} distinct blocks, {args.workers} workers "
          f"(built in {results['index']['build_s']} s)", flush=True)

    workers = [WorkerInfo(worker_id=f"decode-{w:02d}", role="decode", model="m", block_size=BLOCK)
               for w in range(args.workers)]
    for w in workers:  # realistic loads so the cost loop does real arithmetic
        router.on_load(LoadReport(worker_id=w.worker_id, role="decode", timestamp=0,
                                  kv_blocks_used=rng.randrange(0, 4000), kv_blocks_total=16384,
                                  running=rng.randrange(0, 32), prefill_tokens_queued=rng.randrange(0, 8192)))

    # A 4k-token prompt fully cached on 8 workers (the walk goes all 256 blocks), half-cached, cold.
    tokens = [rng.randrange(32000) for _ in range(SEQ_BLOCKS * BLOCK)]
    hashes = block_hashes(tokens, BLOCK)
    for w in workers[:8]:
        router.index.store(w.worker_id, hashes)
    for w in workers[8:12]:
        router.index.store(w.worker_id, hashes[:128])
    half_tokens = tokens[: 128 * BLOCK] + [rng.randrange(32000) for _ in range(128 * BLOCK)]
    cold_tokens = [rng.randrange(32000) for _ in range(SEQ_BLOCKS * BLOCK)]
    cases = {
        "full_hit_8_workers": tokens,
        "half_hit_12_workers": half_tokens,
        "miss": cold_tokens,
    }
    now = time.monotonic()
    results["decision_us"] = {}
    gc.collect()
    for name, toks in cases.items():
        req = SimpleNamespace(request_id="r", model="m", token_ids=toks, block_hashes=block_hashes(toks, BLOCK),
                              block_size=BLOCK)
        plain = SimpleNamespace(request_id="r", model="m", token_ids=toks)
        d_decide = timed(lambda req=req: router.decide(req, workers, now), args.decisions)  # type: ignore[misc]
        # choose_worker records pending work, which a load report clears: reset it as a report would.
        d_choose = []
        for i in range(args.decisions // 4):
            d_choose.extend(timed(lambda req=req: router.choose_worker(req, workers), 1))  # type: ignore[misc]
            if i % 64 == 63:
                for ld in router.loads.values():
                    ld.expire_pending(time.monotonic() + 1)
        d_hash = timed(lambda plain=plain: router.choose_worker(plain, workers), 300)  # type: ignore[misc]
        for ld in router.loads.values():
            ld.expire_pending(time.monotonic() + 1)
        overlap = router.decide(req, workers, now)[1]
        r = {
            "overlap_blocks": overlap,
            "decide_p50": us(pct(d_decide, 0.5)), "decide_p99": us(pct(d_decide, 0.99)),
            "choose_p50": us(pct(d_choose, 0.5)), "choose_p99": us(pct(d_choose, 0.99)),
            "with_hashing_p50": us(pct(d_hash, 0.5)), "with_hashing_p99": us(pct(d_hash, 0.99)),
        }
        results["decision_us"][name] = r
        print(f"decision {name:20} overlap {overlap:3}  decide p50 {r['decide_p50']:7.1f} p99 {r['decide_p99']:7.1f} us"
              f"  choose_worker p50 {r['choose_p50']:7.1f} p99 {r['choose_p99']:7.1f} us"
              f"  hashing in the router: p50 {r['with_hashing_p50']:7.1f} p99 {r['with_hashing_p99']:7.1f} us",
              flush=True)

    # Where the time goes (full hit, the worst case).
    hs = hashes
    cur, prev = router.predicted.maps(now)
    pairs = prefix_depths(hs, (router.index.holders, cur, prev))
    depths = depths_by_slot(pairs)
    parts = {
        "hash_prompt_4k": timed(lambda: block_hashes(tokens, BLOCK), 300),
        "walk_256_blocks": timed(lambda: prefix_depths(hs, (router.index.holders, cur, prev)), 5000),
        "walk_256_blocks_events_only": timed(lambda: prefix_depths(hs, (router.index.holders,)), 5000),
        "decode_masks": timed(lambda: depths_by_slot(pairs), 5000),
        "cost_loop_64_workers": timed(lambda: router._costs(workers, depths, len(tokens)), 5000),
    }
    results["breakdown_p50_us"] = {k: us(pct(v, 0.5)) for k, v in parts.items()}
    print("where the time goes (p50, us):", results["breakdown_p50_us"], flush=True)

    # Ingestion at steady state: each batch stores a fresh run on a worker and evicts one it holds.
    n_batches = 4000
    run_len = 64
    batches: list[KvEventBatch] = []
    seqs = {w.worker_id: router.index.last_seq(w.worker_id) for w in workers}
    held: dict[str, list[list[int]]] = {w.worker_id: [] for w in workers}
    for i in range(n_batches):
        wid = workers[i % len(workers)].worker_id
        new = [rng.getrandbits(64) for _ in range(run_len)]
        held[wid].append(new)
        evict = held[wid].pop(0) if len(held[wid]) > 4 else []
        seqs[wid] += 1
        batches.append(KvEventBatch(worker_id=wid, seq=seqs[wid], stored=[KvStored(block_hashes=new)], removed=evict))
    events = sum(len(b.stored[0].block_hashes) + len(b.removed) for b in batches)
    raw = [encode(b) for b in batches]
    gc.collect()
    t = time.perf_counter()
    for b in batches:
        router.index.apply(b)
    apply_s = time.perf_counter() - t
    # Same batch shapes again for decode+apply (new seqs and hashes, so nothing is a duplicate).
    raw2 = []
    for b in batches:
        seqs[b.worker_id] += 1
        raw2.append(encode(KvEventBatch(worker_id=b.worker_id, seq=seqs[b.worker_id],
                                        stored=[KvStored(block_hashes=[rng.getrandbits(64) for _ in range(run_len)])],
                                        removed=b.stored[0].block_hashes)))
    decode = kv_event_decoder.decode
    t = time.perf_counter()
    for m in raw2:
        router.index.apply(decode(m))
    decode_apply_s = time.perf_counter() - t
    t = time.perf_counter()
    for m in raw:
        decode(m)
    decode_only_s = time.perf_counter() - t
    results["ingest"] = {
        "block_events": events,
        "apply_events_per_s": round(events / apply_s),
        "decode_and_apply_events_per_s": round(events / decode_apply_s),
        "decode_only_events_per_s": round(events / decode_only_s),
        "batch": f"{run_len} stored + {run_len} removed",
        "index_entries_after": router.index.stats().entries,
    }
    print(f"ingest ({run_len} stored + {run_len} evicted per batch, index at ~1M): apply "
          f"{results['ingest']['apply_events_per_s']:,} block events/s; msgpack decode + apply "
          f"{results['ingest']['decode_and_apply_events_per_s']:,}/s (decode alone "
          f"{results['ingest']['decode_only_events_per_s']:,}/s)", flush=True)

    if not args.skip_memory:
        del router, batches, raw, raw2, held
        gc.collect()
        rng2 = random.Random(7)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        mem_router = KvRouter()
        build(mem_router, args.blocks, args.workers, rng2)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        st = mem_router.index.stats()
        results["memory"] = {"bytes": used, "entries": st.entries,
                             "bytes_per_indexed_block": round(used / st.entries, 1)}
        print(f"memory: {used / 2**20:.1f} MiB for {st.entries:,} pairs = "
              f"{results['memory']['bytes_per_indexed_block']} bytes per indexed block", flush=True)

    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
