"""Priorities and fairness under saturation (issue 20): what the admission queue buys.

One stack of real processes: nats-server, router, one mocker decode worker (a simulated cost per
engine step: 5 ms + 0.1 ms per running sequence, divided by ``--mocker-speedup``, 5 by default)
and a frontend with admission on (4 slots at the workers, 1 of them reserved for priorities
below 0) and a keys file. Measured, each ``--repeats`` times:

- **TTFT of a high-priority stream** (priority -5, 4 tokens, streamed): idle, and saturated while
  12 closed-loop low-priority clients (priority 5, 256 tokens, not streamed) fill the other 3
  slots and keep 9 requests waiting in the admission queue. Idle and saturated alternate in
  ``--rounds`` rounds (the machine's own load drifts), ``--samples`` requests per round and side.
  Baseline: the same stream at the flood's own priority and tenant (what it gets without a
  priority): it waits its turn in the queue.
- **Throughput of two tenants** with equal weights, one keeping 10x as many requests outstanding
  (40 closed-loop clients against 4, 96 tokens each, not streamed), over a window after a warm-up.
  Baseline: the same clients all under one key, i.e. one tenant, first come first served.

    python bench/priority_bench.py [--repeats 3] [--json out.json]

The assertions on the same measurements (p90 within 2x, ratio within 10%) are in
tests/frontend/test_priority_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import httpx

MODEL = "baton-tiny"
HIGH, LOW = -5, 5
ADMISSION = ["--admission-max-running", "4", "--admission-reserved", "1", "--admission-queue-timeout", "60",
             "--priority-min", "-10", "--priority-max", "10"]


def completion(priority: int | None = None, max_tokens: int = 4, stream: bool = False) -> dict:
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens, "stream": stream}
    if priority is not None:
        body["priority"] = priority
    return body


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **headers}


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass
class Load:
    """What closed-loop clients got: (label, finished at) per success, and the errors."""

    done: list[tuple[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def closed_loop(client: httpx.AsyncClient, url: str, key: str, body: dict, load: Load,
                      label: str | None = None) -> None:
    """One client: its next request as soon as the last one ends."""
    while True:
        r = await client.post(url, json=body, headers=auth(key))
        if r.status_code == 200:
            load.done.append((label or key, time.monotonic()))
        else:
            load.errors.append(f"{r.status_code} {r.text[:200]}")
            await anyio.sleep(0.05)


async def ttft(client: httpx.AsyncClient, url: str, key: str, priority: int) -> float:
    """Seconds from sending a streamed completion to its first token."""
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=completion(priority=priority, max_tokens=4, stream=True),
                             headers=auth(key)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
        if first is None:
            raise RuntimeError("a stream without a token")
        return first


async def gauge(client: httpx.AsyncClient, base: str, name: str = "baton_frontend_admission_queued") -> float:
    text = (await client.get(f"{base}/metrics")).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def client_limits() -> httpx.Limits:
    return httpx.Limits(max_connections=64, max_keepalive_connections=64)


async def measure_ttft(base: str, rounds: int, samples: int) -> dict[str, float]:
    """High-priority TTFT idle and saturated, in alternating rounds; and the flood-priority baseline."""
    url = f"{base}/v1/completions"
    idle: list[float] = []
    saturated: list[float] = []
    depth: list[float] = []
    same: list[float] = []
    load = Load()
    async with httpx.AsyncClient(timeout=120, limits=client_limits()) as client:
        for _ in range(3):  # warm the path (tokenizer, connections)
            await ttft(client, url, "sk-hi", HIGH)
        for _ in range(rounds):
            idle += [await ttft(client, url, "sk-hi", HIGH) for _ in range(samples)]
            async with anyio.create_task_group() as tg:
                # 12 low-priority clients, answers not streamed: 3 run, 9 wait in the admission queue
                for _ in range(12):
                    tg.start_soon(closed_loop, client, url, "sk-lo", completion(priority=LOW, max_tokens=256), load)
                with anyio.fail_after(30):
                    while await gauge(client, base) < 6:
                        await anyio.sleep(0.05)
                for _ in range(samples):
                    saturated.append(await ttft(client, url, "sk-hi", HIGH))
                    depth.append(await gauge(client, base))
                # the flood's tenant at the flood's priority waits its turn in the queue
                same.append(await ttft(client, url, "sk-lo", LOW))
                tg.cancel_scope.cancel()
            with anyio.fail_after(30):  # idle again: the flood's requests cancelled
                while await gauge(client, base, "baton_frontend_admission_running") > 0:
                    await anyio.sleep(0.05)
    return {"idle_p50": statistics.median(idle), "idle_p90": quantile(idle, 0.9),
            "sat_p50": statistics.median(saturated), "sat_p90": quantile(saturated, 0.9),
            "same_priority_p50": statistics.median(same), "queue_min": min(depth),
            "low_done": len(load.done), "low_errors": len(load.errors)}


async def measure_tenants(base: str, keys: tuple[str, str], warmup: float, window: float) -> dict[str, float]:
    """Requests a second of a heavy client group (40 outstanding) and a light one (4), under the
    two keys given (two tenants, or one key twice: one tenant)."""
    url = f"{base}/v1/completions"
    body = completion(max_tokens=96)  # ~0.1 s at the worker: the clients' turnaround is small beside it
    load = Load()
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=client_limits()) as client:
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(closed_loop, client, url, keys[0], body, load, "heavy")
            for _ in range(4):
                tg.start_soon(closed_loop, client, url, keys[1], body, load, "light")
            await anyio.sleep(warmup + window)
            tg.cancel_scope.cancel()
    lo, hi = t0 + warmup, t0 + warmup + window
    heavy = sum(1 for k, t in load.done if k == "heavy" and lo <= t < hi)
    light = sum(1 for k, t in load.done if k == "light" and lo <= t < hi)
    return {"heavy_rps": heavy / window, "light_rps": light / window,
            "ratio": min(heavy, light) / max(heavy, light) if max(heavy, light) else 0.0,
            "errors": len(load.errors)}


KEYS = "sk-a\nsk-b\nsk-tpm tpm=300 name=metered\nsk-hi\nsk-lo\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--mocker-speedup", default="5")
    ap.add_argument("--window", type=float, default=6.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from tests.procs import Stack, running

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="baton-priority-") as tmp:
        keys = Path(tmp) / "keys.txt"
        keys.write_text(KEYS)
        stack = Stack(Path(tmp), "mocker", extra_decode_args=["--mocker-speedup", args.mocker_speedup])
        stack.frontend_extra = ["--api-keys-file", str(keys), *ADMISSION]
        with running(stack):
            for i in range(args.repeats):
                row = {"load_average": os.getloadavg()[0]}
                row.update(anyio.run(measure_ttft, stack.url, args.rounds, args.samples))
                fair = anyio.run(measure_tenants, stack.url, ("sk-a", "sk-b"), 1.5, args.window)
                fifo = anyio.run(measure_tenants, stack.url, ("sk-a", "sk-a"), 1.5, args.window)
                row.update({f"wfq_{k}": v for k, v in fair.items()})
                row.update({f"one_key_{k}": v for k, v in fifo.items()})
                results.append(row)
                print(f"repeat {i + 1}: " + json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    summary = {k: {"median": statistics.median(r[k] for r in results), "min": min(r[k] for r in results),
                   "max": max(r[k] for r in results)} for k in results[0]}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"repeats": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
