"""Multi-turn chat with a device KV pool too small for every conversation: host/disk tiers vs none.

Many users each hold a long conversation; each turn re-sends the whole history plus a new
message. With a device pool that cannot hold every history, a returning user's prefix has been
evicted. Without tiers it is recomputed. With tiers it is copied back from host memory or disk.

One background stream decodes throughout, so the inter-token latency it sees shows whether
onboarding hurts running streams. Same requests, torch engine, for every configuration.

Fairness:
- Equal memory: the baseline's device pool is the tiered run's device pool plus its host tier
  (``--device-blocks`` + ``--host-blocks``), so the tiers are credited only with what the disk adds
  and with nothing that more device memory would give as well.
- Cold disk: before every turn the disk tier's writes are flushed, each tier file is fsynced and
  its pages dropped from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``), so every disk
  hit is a read from the device, not from RAM. (The flush and drop are outside the timed turn.)
- User order: ``round-robin`` (each user in turn: LRU's worst case, every prefix evicted by the
  time its user returns) and ``random`` (a seeded random interleaving of the users' turns).
- ``--repeats`` rounds; within each round every (order, configuration) runs once, the
  configurations alternating, so noise from other jobs hits them alike; median and range.

    python bench/kv_tiers_bench.py [--model baton-small] [--users 8] [--turns 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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
from shared.progress import track


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def visit_order(users: int, turns: int, order: str, seed: int) -> list[tuple[int, int]]:
    """(user, turn) pairs in visiting order; each user's turns stay in sequence."""
    if order == "round-robin":
        return [(u, t) for t in range(turns) for u in range(users)]
    slots = [u for u in range(users) for _ in range(turns)]
    random.Random(seed).shuffle(slots)
    seen = [0] * users
    out = []
    for u in slots:
        out.append((u, seen[u]))
        seen[u] += 1
    return out


def drop_disk_pages(directory: str) -> int:
    """Write back and evict every tier file's pages, so the next read comes from the device."""
    n = 0
    for f in Path(directory).glob("*.kv"):
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError:  # evicted meanwhile
            continue
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


async def run_config(args: argparse.Namespace, device_blocks: int, tiers: dict, order: str, seed: int) -> dict:
    cfg = EngineConfig(engine="torch", model=args.model, num_blocks=device_blocks, max_batched_tokens=256,
                       **tiers)
    engine = TorchEngine(cfg)
    rng = random.Random(0)
    disk_dir = tiers.get("disk_kv_dir")
    histories = [[rng.randrange(10, 2000) for _ in range(args.history)] for _ in range(args.users)]
    ttfts: list[float] = []
    itls: list[float] = []
    errors = 0
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.wait_ready()

        async def background() -> None:
            prompt = [random.Random(1).randrange(10, 2000) for _ in range(32)]  # own rng: histories stay equal
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
        elapsed = 0.0
        for u, turn in visit_order(args.users, args.turns, order, seed):
            if disk_dir:  # outside the timed turn: every disk hit below reads from the device
                await anyio.to_thread.run_sync(engine.kv_tiers.flush)
                await anyio.to_thread.run_sync(drop_disk_pages, disk_dir)
            histories[u] += [rng.randrange(10, 2000) for _ in range(args.message)]
            start = time.perf_counter()
            first = None
            out_tokens: list[int] = []
            async for out in engine.generate(f"u{u}-t{turn}", list(histories[u]),
                                             SamplingParams(max_tokens=args.reply, temperature=0, ignore_eos=True)):
                if first is None and out.token_ids:
                    first = time.perf_counter() - start
                out_tokens += out.token_ids
            elapsed += time.perf_counter() - start
            if len(out_tokens) != args.reply:
                errors += 1
            elif turn > 0:  # the first turn is cold in every configuration
                ttfts.append(first or 0.0)
            histories[u] += out_tokens
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
            "turns_per_s": args.users * args.turns / elapsed,  # timed turns only "prompt_tokens": st.prompt_tokens,
            "device_hit_tokens": st.prefix_hit_tokens - engine.scheduler.kv.onboarded_blocks * cfg.block_size,
            "onboarded_tokens": engine.scheduler.kv.onboarded_blocks * cfg.block_size, "tier_block_hits": tier_hits,
            "bg_itl_p50_ms": pct(itls, 0.5) * 1e3, "bg_itl_p99_ms": pct(itls, 0.99) * 1e3, "errors": errors,
        }
        tg.cancel_scope.cancel()
    if engine.kv_tiers is not None:
        engine.kv_tiers.close()
    if disk_dir:
        shutil.rmtree(disk_dir, ignore_errors=True)
    return result


FIGURES = ["ttft_mean_ms", "ttft_p90_ms", "turns_per_s", "onboarded_tokens", "bg_itl_p50_ms", "bg_itl_p99_ms",
           "errors"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="baton-small")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--history", type=int, default=512, help="initial tokens of each conversation")
    ap.add_argument("--message", type=int, default=48)
    ap.add_argument("--reply", type=int, default=16)
    ap.add_argument("--device-blocks", type=int, default=160, help="tiered run's device pool: too small")
    ap.add_argument("--host-blocks", type=int, default=128, help="tiered run's host tier")
    ap.add_argument("--disk-blocks", type=int, default=4096)
    ap.add_argument("--disk-dir", default="", help="parent of the disk tiers (default: a temporary dir on disk)")
    ap.add_argument("--orders", nargs="+", default=["round-robin", "random"], choices=["round-robin", "random"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    equal = args.device_blocks + args.host_blocks
    configs = [f"no tiers, device {equal}", f"device {args.device_blocks} + host {args.host_blocks} + disk"]
    runs: dict[tuple[str, str], list[dict]] = {}
    loads = []
    for rep in track(range(args.repeats), "repeats"):
        for order in args.orders:
            names = configs if rep % 2 == 0 else configs[::-1]  # alternate which goes first
            for name in names:
                if name.startswith("no tiers"):
                    blocks, tiers = equal, {}
                else:
                    disk = tempfile.mkdtemp(prefix="baton-kv-disk-", dir=args.disk_dir or None)
                    blocks, tiers = args.device_blocks, {"host_kv_blocks": args.host_blocks, "disk_kv_dir": disk,
                                                         "disk_kv_blocks": args.disk_blocks}
                loads.append(os.getloadavg()[0])
                r = anyio.run(run_config, args, blocks, tiers, order, rep)
                runs.setdefault((order, name), []).append(r)
                print(f"rep {rep} {order:11} {name:28} TTFT mean {r['ttft_mean_ms']:7.1f} p90 {r['ttft_p90_ms']:7.1f} ms "
                      f"{r['turns_per_s']:5.2f} turns/s onboarded tok {r['onboarded_tokens']:6d} tier hits "
                      f"{r['tier_block_hits']} bg ITL p50 {r['bg_itl_p50_ms']:.1f} p99 {r['bg_itl_p99_ms']:.1f} ms "
                      f"errors {r['errors']} loadavg {loads[-1]:.1f}", flush=True)
    print(f"\n{args.users} users x {args.turns} turns, history {args.history} tokens, model {args.model}; "
          f"median [min-max] of {args.repeats}; load average {min(loads):.1f}-{max(loads):.1f}")
    table = []
    for (order, name), rs in runs.items():
        row = {"order": order, "config": name}
        for f in FIGURES:
            xs = [r[f] for r in rs]
            row[f] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": xs}
        table.append(row)
        print(f"{order:11} {name:28} " + "  ".join(
            f"{f} {row[f]['median']:.1f} [{row[f]['min']:.1f}-{row[f]['max']:.1f}]" for f in FIGURES))
    for order in args.orders:
        a, b = runs[(order, configs[0])], runs[(order, configs[1])]
        ratios = [x["ttft_mean_ms"] / y["ttft_mean_ms"] for x, y in zip(a, b, strict=True)]
        print(f"{order}: baseline / tiered mean TTFT per repeat {[round(x, 2) for x in ratios]} "
              f"(median {statistics.median(ratios):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "loadavg": loads, "table": table}, indent=1))


if __name__ == "__main__":
    main()
