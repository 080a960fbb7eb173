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

from shared.kv_hash import block_hashes
from shared.messages import KvEventBatch, KvStored, LoadReport, WorkerInfo, encode, kv_event_decoder
from shared.routing.kv_index import depths_by_slot, prefix_depths
from shared.routing.kv_policy import KvRouter, KvRouterConfig

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


class Samples:
    """Per-call durations on two clocks: wall time, and this thread's CPU time.

    On a shared machine other processes preempt this one mid-call and inflate wall-clock tails;
    thread CPU time is what the call costs on a dedicated core. Both are reported.
    """

    def __init__(self) -> None:
        self.wall: list[int] = []
        self.cpu: list[int] = []

    def extend(self, other: Samples) -> None:
        self.wall.extend(other.wall)
        self.cpu.extend(other.cpu)


def timed(fn, n: int) -> Samples:
    out = Samples()
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    w_append, c_append = out.wall.append, out.cpu.append
    for _ in range(n):
        c0 = cpu()
        w0 = wall()
        fn()
        w_append(wall() - w0)
        c_append(cpu() - c0)
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

    def fresh_state() -> None:
        # What a load report and the prediction TTL would do: forget this bench's own decisions.
        router.predicted.current, router.predicted.previous = {}, {}
        for ld in router.loads.values():
            ld.expire_pending(float("inf"))

    for name, toks in cases.items():
        req = SimpleNamespace(request_id="r", model="m", token_ids=toks, block_hashes=block_hashes(toks, BLOCK),
                              block_size=BLOCK)
        plain = SimpleNamespace(request_id="r", model="m", token_ids=toks)
        fresh_state()
        best_overlap = max(router.overlaps(req.block_hashes, now).values(), default=0)
        overlap = router.decide(req, workers, now)[1]  # type: ignore[arg-type]
        decide = timed(lambda req=req: router.decide(req, workers, now), args.decisions)  # type: ignore[misc]
        choose, hashing = Samples(), Samples()
        for _ in range(args.decisions // 4):
            choose.extend(timed(lambda req=req: router.choose_worker(req, workers), 1))  # type: ignore[misc]
            fresh_state()
        for _ in range(300):
            hashing.extend(timed(lambda plain=plain: router.choose_worker(plain, workers), 1))  # type: ignore[misc]
            fresh_state()
        r: dict[str, float] = {"best_overlap_blocks": best_overlap, "chosen_overlap_blocks": overlap}
        for key, smp in (("decide", decide), ("choose_worker", choose), ("router_hashes_prompt", hashing)):
            for clock in ("cpu", "wall"):
                xs = getattr(smp, clock)
                r[f"{key}_{clock}_p50"] = us(pct(xs, 0.5))
                r[f"{key}_{clock}_p99"] = us(pct(xs, 0.99))
        results["decision_us"][name] = r
        print(f"{name:20} overlap best {best_overlap:3} chosen {overlap:3} | "
              + " | ".join(f"{key} p50 {r[key + '_cpu_p50']:6.1f} p99 {r[key + '_cpu_p99']:6.1f}"
                           f" (wall {r[key + '_wall_p50']:.1f}/{r[key + '_wall_p99']:.1f})"
                           for key in ("decide", "choose_worker", "router_hashes_prompt")) + " us", flush=True)
    fresh_state()

    # Where the time goes (full hit, the worst case). Predictions hold 20k other blocks, as recent
    # decisions would; they cost a lookup only where the event index falls short.
    hs = hashes
    router.predicted.add(1 << 5, [rng.getrandbits(64) for _ in range(20_000)], now)
    cur, prev = router.predicted.maps(now)
    pairs = prefix_depths(hs, (router.index.holders, cur, prev))
    depths = depths_by_slot(pairs)
    only_predicted = {h: 1 << 3 for h in hs}
    parts = {
        "hash_prompt_4k": timed(lambda: block_hashes(tokens, BLOCK), 300),
        "walk_256_blocks": timed(lambda: prefix_depths(hs, (router.index.holders, cur, prev)), 5000),
        "walk_256_blocks_predicted_only": timed(lambda: prefix_depths(hs, ({}, only_predicted, prev)), 5000),
        "decode_masks": timed(lambda: depths_by_slot(pairs), 5000),
        "cost_loop_64_workers": timed(lambda: router._costs(workers, depths, len(tokens)), 5000),
        "record_256_new_blocks": timed(lambda: router.predicted.add(1 << 7, hs, now), 5000),
    }
    results["breakdown_cpu_p50_us"] = {k: us(pct(v.cpu, 0.5)) for k, v in parts.items()}
    print("where the time goes (CPU p50, us):", results["breakdown_cpu_p50_us"], flush=True)

    # Ingestion at steady state: each batch stores a fresh run on a worker and evicts the oldest
    # run it added, so the index stays at its size (no dict growth flattering or hurting the rate).
    run_len = 64
    n_batches = 4000
    seqs = {w.worker_id: router.index.last_seq(w.worker_id) for w in workers}
    held: dict[str, list[list[int]]] = {w.worker_id: [] for w in workers}

    def next_batch(i: int) -> KvEventBatch:
        wid = workers[i % len(workers)].worker_id
        new = [rng.getrandbits(64) for _ in range(run_len)]
        held[wid].append(new)
        evict = held[wid].pop(0) if len(held[wid]) > 4 else []
        seqs[wid] += 1
        return KvEventBatch(worker_id=wid, seq=seqs[wid], stored=[KvStored(block_hashes=new)], removed=evict)

    for i in range(len(workers) * 5):  # warm up: every worker holds 4 runs to evict from
        router.index.apply(next_batch(i))
    # Batches as the router gets them: msgpack bytes, so removed hashes are new int objects (not the
    # very objects the index keys on), as after a real decode.
    encoded = [encode(next_batch(i)) for i in range(n_batches)]
    decode = kv_event_decoder.decode
    size_before = router.index.stats().entries
    gc.collect()
    c0, w0 = time.thread_time(), time.perf_counter()
    decoded = [decode(m) for m in encoded]
    decode_cpu = time.thread_time() - c0
    apply = router.index.apply
    c1, w1 = time.thread_time(), time.perf_counter()
    for b in decoded:
        apply(b)
    apply_cpu, apply_wall = time.thread_time() - c1, time.perf_counter() - w1
    both_wall = time.perf_counter() - w0
    events = sum(len(b.stored[0].block_hashes) + len(b.removed) for b in decoded)
    results["ingest"] = {
        "batch": f"{run_len} stored + {run_len} removed, one worker",
        "block_events": events,
        "apply_events_per_s": round(events / apply_cpu),
        "decode_only_events_per_s": round(events / decode_cpu),
        "decode_and_apply_events_per_s": round(events / (decode_cpu + apply_cpu)),
        "apply_events_per_wall_s": round(events / apply_wall),
        "decode_and_apply_events_per_wall_s": round(events / both_wall),
        "index_entries_before_after": [size_before, router.index.stats().entries],
    }
    ing = results["ingest"]
    print(f"ingest ({run_len} stored + {run_len} evicted per batch, index steady at {size_before:,}), per CPU second: "
          f"apply {ing['apply_events_per_s']:,} block events/s, msgpack decode alone "
          f"{ing['decode_only_events_per_s']:,}/s, decode + apply {ing['decode_and_apply_events_per_s']:,}/s "
          f"(wall: apply {ing['apply_events_per_wall_s']:,}/s, both {ing['decode_and_apply_events_per_wall_s']:,}/s)",
          flush=True)

    if not args.skip_memory:
        del router, decoded, encoded, held
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
