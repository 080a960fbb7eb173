"""Multi-turn chat with a device KV pool too small for every conversation: host/disk tiers vs none.

Many users each hold a long conversation; each turn re-sends the whole history plus a new
message. With a device pool that cannot hold every history, a returning user's prefix has been
evicted. Without tiers it is recomputed. With tiers it is copied back from host memory or disk.

One background stream decodes throughout, so the inter-token latency it sees shows whether
onboarding hurts running streams. One run measures both configurations, same requests, torch
engine.

    python bench/kv_tiers_bench.py [--model baton-small] [--users 8] [--turns 4]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared.engines.base import EngineConfig
from shared.engines.torch_engine import TorchEngine
from shared.messages import SamplingParams


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def run_config(args: argparse.Namespace, tiers: dict) -> dict:
    cfg = EngineConfig(engine="torch", model=args.model, num_blocks=args.device_blocks, max_batched_tokens=256,
                       **tiers)
    engine = TorchEngine(cfg)
    rng = random.Random(0)
    histories = [[rng.randrange(10, 2000) for _ in range(args.history)] for _ in range(args.users)]
    ttfts: list[float] = []
    itls: list[float] = []
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.wait_ready()

        async def background() -> None:
            prompt = [rng.randrange(10, 2000) for _ in range(32)]
            i = 0
            while not done.is_set():
                last = None
                async for out in engine.generate(f"bg-{i}", prompt, SamplingParams(max_tokens=200, temperature=0,
                                                                                    ignore_eos=True)):
                    now = time.perf_counter()
                    if last is not None and out.token_ids:
                        itls.append(now - last)
                    last = now
                    if done.is_set():
                        break
                i += 1

        tg.start_soon(background)
        t0 = time.perf_counter()
        for turn in range(args.turns):
            for u in range(args.users):
                histories[u] += [rng.randrange(10, 2000) for _ in range(args.message)]
                start = time.perf_counter()
                first = None
                out_tokens: list[int] = []
                async for out in engine.generate(f"u{u}-t{turn}", list(histories[u]),
                                                 SamplingParams(max_tokens=args.reply, temperature=0, ignore_eos=True)):
                    if first is None and out.token_ids:
                        first = time.perf_counter() - start
                    out_tokens += out.token_ids
                if turn > 0:  # the first turn is cold in both configurations
                    ttfts.append(first or 0.0)
                histories[u] += out_tokens
        elapsed = time.perf_counter() - t0
        done.set()
        st = engine.stats()
        tier_hits = {}
        if engine.kv_tiers is not None:
            engine.kv_tiers.flush()
            for t in (engine.kv_tiers.host, engine.kv_tiers.disk):
                if t is not None:
                    tier_hits[t.tier] = t.stats.hits
        result = {
            "ttft_mean_ms": statistics.fmean(ttfts) * 1e3, "ttft_p90_ms": pct(ttfts, 0.9) * 1e3,
            "turns_per_s": args.users * args.turns / elapsed, "prompt_tokens": st.prompt_tokens,
            "device_hit_tokens": st.prefix_hit_tokens - engine.scheduler.kv.onboarded_blocks * cfg.block_size,
            "onboarded_tokens": engine.scheduler.kv.onboarded_blocks * cfg.block_size, "tier_block_hits": tier_hits,
            "bg_itl_p50_ms": pct(itls, 0.5) * 1e3, "bg_itl_p99_ms": pct(itls, 0.99) * 1e3,
        }
        tg.cancel_scope.cancel()
    if engine.kv_tiers is not None:
        engine.kv_tiers.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="baton-small")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--history", type=int, default=512, help="initial tokens of each conversation")
    ap.add_argument("--message", type=int, default=48)
    ap.add_argument("--reply", type=int, default=16)
    ap.add_argument("--device-blocks", type=int, default=160, help="device pool: too small for every history")
    args = ap.parse_args()
    disk = tempfile.mkdtemp(prefix="baton-kv-disk-")
    configs = {
        "no tiers": {},
        "host + disk": {"host_kv_blocks": 128, "disk_kv_dir": disk, "disk_kv_blocks": 4096},
    }
    results = {name: anyio.run(run_config, args, tiers) for name, tiers in configs.items()}
    print(f"{args.users} users x {args.turns} turns, history {args.history} tokens, device pool "
          f"{args.device_blocks} blocks of 16 tokens, model {args.model}")
    for name, r in results.items():
        print(f"{name:12} TTFT mean {r['ttft_mean_ms']:8.1f} ms  p90 {r['ttft_p90_ms']:8.1f} ms  "
              f"{r['turns_per_s']:5.2f} turns/s  device-hit tok {r['device_hit_tokens']:6d}  "
              f"onboarded tok {r['onboarded_tokens']:6d}  tier block hits {r['tier_block_hits']}  "
              f"background ITL p50 {r['bg_itl_p50_ms']:.1f} ms p99 {r['bg_itl_p99_ms']:.1f} ms")
    a, b = results["no tiers"], results["host + disk"]
    print(f"TTFT mean improvement: {a['ttft_mean_ms'] / b['ttft_mean_ms']:.2f}x "
          f"({(1 - b['ttft_mean_ms'] / a['ttft_mean_ms']) * 100:.0f}% lower); "
          f"throughput {b['turns_per_s'] / a['turns_per_s']:.2f}x; background ITL p99 "
          f"{a['bg_itl_p99_ms']:.0f} -> {b['bg_itl_p99_ms']:.0f} ms")


if __name__ == "__main__":
    main()
