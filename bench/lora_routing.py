"""LoRA-aware routing against adapter-blind routing: 8 adapters over 4 workers.

Each run starts a fresh stack of real processes (nats-server, a frontend with the embedded KV
router, 4 mocker decode workers holding at most ``--max-loras`` adapters resident each, LRU
beyond, each load costing ``--load-s`` simulated seconds that stall that worker's step), sends
an open-loop Poisson stream of streamed completions, each for one of 8 adapters (uniform) with a
random prompt (no prefix sharing, so only the adapter term differs), and reports:

* adapter loads: how often a worker had to make an adapter resident (the workers'
  ``baton_worker_lora_loads`` gauge, summed), and the loads avoided against the blind side;
* TTFT p50/p90 (client side: request sent -> first streamed token) and errors.

Both sides are the same policy (``kv``) on the same stack and workload; only the router's
``--router-lora-load-weight`` differs: the default (32 blocks; ``--aware-weights`` adds sides with
other weights) vs 0 (adapter-blind). Sides alternate within each repeat; rates are swept below
saturation.

    PYTHONPATH=$PWD python bench/lora_routing.py --rates 10,20 --repeats 3 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from baton.nats_server import EmbeddedNats, free_port

ADAPTERS = [f"lora-{i}" for i in range(8)]
SIDES = {"lora-aware": 32.0, "adapter-blind": 0.0}  # side -> --router-lora-load-weight


@dataclass
class Run:
    side: str
    rate: float
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    loads: int = 0
    requests: int = 0

    def pct(self, q: float) -> float:
        xs = sorted(self.ttft)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", *cmd], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def scrape_loads(port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r'^baton_worker_lora_loads\{role="decode"\} ([0-9.e+]+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], out: Run, max_tokens: int) -> None:
    t0 = time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.errors += 1
                await r.aread()
                return
            first = None
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - t0
            if first is None:
                out.errors += 1
            else:
                out.ttft.append(first)
    except httpx.HTTPError:
        out.errors += 1


async def drive(url: str, rate: float, duration: float, seed: int, out: Run, args: argparse.Namespace) -> None:
    rng = random.Random(seed)  # the same arrivals, adapters and prompts for both sides
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = []
        t_end = time.perf_counter() + duration
        next_at = time.perf_counter()
        while next_at < t_end:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            prompt = [rng.randrange(10, 2000) for _ in range(args.prompt_len)]
            model = rng.choice(ADAPTERS)
            tasks.append(asyncio.create_task(one(client, url, model, prompt, out, args.max_tokens)))
            out.requests += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)


def run_once(side: str, rate: float, seed: int, args: argparse.Namespace, workdir: Path) -> Run:
    nats = EmbeddedNats(data_dir=workdir / f"nats-{side}-{rate}-{seed}").start()
    procs: list[subprocess.Popen[bytes]] = []
    out = Run(side, rate)
    try:
        common = ["--nats-url", nats.url, "--discovery-ttl", "3"]
        modules = ",".join(f"{a}=/adapters/{a}" for a in ADAPTERS)  # the mocker reads no files
        metrics = [free_port() for _ in range(args.workers)]
        for i, mport in enumerate(metrics):
            procs.append(start(["services.decode", *common, "--engine", "mocker", "--model", "baton-tiny",
                                "--worker-id", f"decode-{i}", "--max-loras", str(args.max_loras),
                                "--mocker-lora-load-s", str(args.load_s), "--lora-modules", modules,
                                "--metrics-port", str(mport), "--no-disagg"], workdir / f"decode-{i}.log"))
        port = free_port()
        procs.append(start(["services.frontend", *common, "--model", "baton-tiny", "--host", "127.0.0.1",
                            "--port", str(port), "--router", "embedded", "--router-mode", "kv",
                            "--router-lora-load-weight", str(SIDES[side])], workdir / "frontend.log"))
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("decode_workers") == args.workers:
                    models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=2).json()["data"]}
                    if set(ADAPTERS) <= models:
                        break
            except (httpx.HTTPError, ValueError):
                pass
            if time.time() > deadline:
                raise RuntimeError("stack did not become ready")
            time.sleep(0.2)
        asyncio.run(drive(url, rate, args.duration, seed, out, args))
        time.sleep(args.report_wait)  # the workers' gauges refresh every second
        out.loads = sum(scrape_loads(p) for p in metrics)
    finally:
        stop(procs)
        nats.stop()
    return out


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="10,20", help="requests per second, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-loras", type=int, default=2)
    ap.add_argument("--load-s", type=float, default=0.1, help="simulated seconds per adapter load")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--report-wait", type=float, default=2.0)
    ap.add_argument("--aware-weights", default="32", help="router lora_load_weight of each LoRA-aware side")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    SIDES.clear()
    for w in args.aware_weights.split(","):
        SIDES[f"lora-aware w={float(w):g}"] = float(w)
    SIDES["adapter-blind"] = 0.0
    rates = [float(r) for r in args.rates.split(",")]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="baton-lora-bench-") as d:
        for rate in rates:
            for rep in range(args.repeats):
                order = list(SIDES)[rep % len(SIDES):] + list(SIDES)[:rep % len(SIDES)]  # rotate who goes first
                for side in order:
                    r = run_once(side, rate, 1000 * rep + int(rate), args, Path(d))
                    runs.append(r)
                    print(f"rate {rate:g} rep {rep} {side:>18}: {r.requests} req, {r.errors} errors, "
                          f"{r.loads} loads, TTFT p50 {r.pct(0.5) * 1e3:.1f} ms p90 {r.pct(0.9) * 1e3:.1f} ms",
                          flush=True)
    print("\n| rate (req/s) | routing | adapter loads | TTFT p50 ms | TTFT p90 ms | errors / requests |")
    print("|---:|---|---:|---:|---:|---:|")
    for rate in rates:
        for side in SIDES:
            rs = [r for r in runs if r.rate == rate and r.side == side]
            print(f"| {rate:g} | {side} | {spread([r.loads for r in rs])} | {spread([r.pct(0.5) * 1e3 for r in rs])} | "
                  f"{spread([r.pct(0.9) * 1e3 for r in rs])} | {sum(r.errors for r in rs)} / "
                  f"{sum(r.requests for r in rs)} |")
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "ttft": None, "p50": r.pct(0.5), "p90": r.pct(0.9)}
                                         for r in runs], indent=1))


if __name__ == "__main__":
    main()
