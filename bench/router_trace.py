"""Replay the Mooncake conversation trace through the real router: kv against load-aware and
load-blind baselines, with the offered load swept below saturation.

Workload. ``/work/shared/traces/conversation_trace.jsonl`` (Mooncake FAST'25, a production chat
service): each request lists ``hash_ids``, one per 512-token block, equal ids at equal positions
meaning an equal prefix. Scaled down: every id becomes a deterministic run of ``--block-tokens``
(16) token ids, so one trace block is one KV block and prefixes are shared exactly as in the trace;
input lengths scale by 16/512 and the last block is cut to the scaled length; output is capped at
``--output-cap`` tokens. A slice of the trace (``--start``, ``--requests``) keeps its arrival
pattern, compressed in time to a mean ``--rate`` (requests/s).

Timing. Mocker workers (the real scheduler, KV cache manager and prefix cache, no model) with the
mocker's default costs per *real* token: 2e-5 s prefill per token (one scaled token stands for
512/16 = 32 real ones, so 6.4e-4 s), 5 ms per decode step plus 0.1 ms per running sequence,
chunked prefill of 128 scaled (4096 real) tokens per step, ``--num-blocks`` KV blocks per worker.

Per mode, from scratch: a nats-server, one process hosting ``--workers`` mocker decode workers, the
real router (``python -m services.router --mode MODE``), and this driver, which plays the
frontend: for each request at its arrival time it asks the router, sends the GenerateRequest to
the chosen worker and streams the reply. Reported: prefix cache hit rate (prompt tokens the
workers served from cache / prompt tokens), mean/p50/p90 TTFT (route request sent -> first token),
mean end-to-end latency, throughput, the router's mean decision time.

Modes. ``kv`` (overlap weight 1: cached prefix against load), ``least-loaded`` (the same router
with ``--overlap-weight 0``: a load-aware baseline that ignores caches, so the comparison with
``kv`` isolates the cache term), ``round-robin``, ``random`` and ``kv-approx``.

Load. ``--loads`` are fractions of ``--capacity`` (requests/s). Capacity is measured when not
given (``--measure-capacity``): round-robin, the weakest policy, is offered ``--overload`` times
the cold prefill capacity, and the throughput it delivers (completed requests / makespan) is
taken as the fleet's capacity; every load in the sweep is then one both sides can sustain.
Repeats rotate the order of the modes so that noise from other jobs on the machine hits every
mode alike. A failed request (route error, worker error, timeout) is counted in ``errors`` and
excluded from the latency statistics, never dropped silently.

Oracle. Offline, with the exact cache contents: every worker an LRU cache of ``--num-blocks``
blocks, each request sent where its estimated TTFT is least (prefill backlog, a fluid queue, plus
its tokens not cached there), the engine's hit rule applied (whole blocks, at least one token
computed). The same simulation under round-robin checks it against the measured round-robin hit
rate. Also the bound of one infinite cache (every block ever seen), which no routing can beat.

    python bench/router_trace.py --start 1000 --requests 800 --workers 8 --loads 0.5 0.7 0.9 --repeats 3 \
        --modes kv least-loaded round-robin random --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from baton.nats_server import EmbeddedNats, free_port
from shared.bus import Bus, BusError
from shared.messages import (
    GenerateError,
    GenerateRequest,
    RouteDecision,
    RouteRequest,
    SamplingParams,
    TokenChunk,
    generate_reply_decoder,
    route_reply_decoder,
)
from shared.progress import track
from shared.subjects import ROUTE

TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "conversation_trace.jsonl"
TRACE_BLOCK_TOKENS = 512
MODEL = "trace-mock"  # not a model directory: the mocker falls back to a 2048-token vocabulary
VOCAB = 2048
_MASK64 = (1 << 64) - 1


# --- the workload ------------------------------------------------------------------------------


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class TraceRequest:
    index: int
    arrival: float  # seconds from the start of the replay
    hash_ids: list[int]
    tokens: list[int]
    output_tokens: int


def block_tokens(hash_id: int, n: int) -> list[int]:
    """The deterministic token run standing for one trace block (no special ids: 16.. VOCAB-1)."""
    return [16 + _mix64(hash_id * 4096 + j) % (VOCAB - 16) for j in range(n)]


def load_trace(path: Path, start: int, count: int, block: int, rate: float, output_cap: int) -> list[TraceRequest]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if len(rows) >= count:
                break
            rows.append(json.loads(line))
    t0 = rows[0]["timestamp"]
    span = max(1e-9, (rows[-1]["timestamp"] - t0) / 1000)
    # Compress (or stretch) time so the slice arrives at ``rate`` requests/s on average.
    scale = (len(rows) / rate) / span if rate > 0 else 1.0
    ratio = TRACE_BLOCK_TOKENS // block
    out = []
    for i, r in enumerate(rows):
        ids = r["hash_ids"]
        n_tokens = max(1, min(len(ids) * block, math.ceil(r["input_length"] / ratio)))
        tokens: list[int] = []
        for h in ids:
            tokens.extend(block_tokens(h, block))
        out.append(TraceRequest(i, (r["timestamp"] - t0) / 1000 * scale, ids, tokens[:n_tokens],
                                max(1, min(output_cap, r["output_length"]))))
    return out


# --- the oracle --------------------------------------------------------------------------------


def cached_tokens_rule(overlap_blocks: int, n_tokens: int, block: int) -> int:
    """What the engine serves from cache: whole blocks, and never the prompt's last token."""
    return min(overlap_blocks, (n_tokens - 1) // block) * block


def simulate_hit_rate(reqs: list[TraceRequest], workers: int, capacity: int, block: int, policy: str,
                      prefill_tokens_per_s: float) -> float:
    """Hit rate with every worker an exact LRU cache of ``capacity`` blocks.

    ``oracle``: each request goes where its estimated TTFT is least, knowing every cache exactly:
    (prefill backlog there + its uncached tokens), the backlog a fluid queue drained at the
    workers' prefill rate. (Pure "longest prefix wins" sends everything to the first worker to
    cache the shared system-prompt block.) ``round-robin``: to check the simulation against the
    measured round-robin hit rate.
    """
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(workers)]
    backlog = [0.0] * workers  # prefill tokens queued
    last_t = 0.0
    hit = total = 0
    for i, r in enumerate(reqs):
        drained = (r.arrival - last_t) * prefill_tokens_per_s
        last_t = r.arrival
        backlog = [max(0.0, b - drained) for b in backlog]
        ids = r.hash_ids[: len(r.tokens) // block]
        cached = []
        for c in caches:
            k = 0
            while k < len(ids) and ids[k] in c:
                k += 1
            cached.append(cached_tokens_rule(k, len(r.tokens), block))
        if policy == "oracle":
            w = min(range(workers), key=lambda j: (backlog[j] + len(r.tokens) - cached[j], j))
        else:
            w = i % workers
        hit += cached[w]
        total += len(r.tokens)
        backlog[w] += len(r.tokens) - cached[w]
        c = caches[w]
        for h in ids:  # LRU: the request's blocks become the most recent
            c.pop(h, None)
            c[h] = None
        while len(c) > capacity:
            c.popitem(last=False)
    return hit / total


def infinite_cache_hit_rate(reqs: list[TraceRequest], block: int) -> float:
    """One cache holding every block ever computed: no routing can do better."""
    seen: set[int] = set()
    hit = total = 0
    for r in reqs:
        ids = r.hash_ids[: len(r.tokens) // block]
        k = 0
        while k < len(ids) and ids[k] in seen:
            k += 1
        hit += cached_tokens_rule(k, len(r.tokens), block)
        total += len(r.tokens)
        seen.update(ids)
    return hit / total


# --- the worker host (a separate process) ------------------------------------------------------


def serve_workers(args: argparse.Namespace) -> None:
    """Run ``--workers`` mocker decode workers in this process until killed."""
    from services.decode.worker import DecodeSettings, DecodeWorker
    from shared.engines import EngineConfig, make_engine
    from shared.telemetry import setup_logging

    setup_logging("trace-workers", "warning")
    ratio = TRACE_BLOCK_TOKENS // args.block_tokens

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(args.workers):
                config = EngineConfig(
                    engine=args.engine, model=MODEL if args.engine == "mocker" else "baton-tiny",
                    block_size=args.block_tokens, num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
                    max_batched_tokens=args.max_batched_tokens,
                    prefill_s_per_token=2e-5 * ratio,  # per scaled token: the real tokens it stands for
                    decode_step_s=5e-3, decode_s_per_seq=1e-4,
                )
                settings = DecodeSettings(nats_url=args.nats_url, engine=config, worker_id=f"decode-{i:02d}",
                                          served_model_name="trace", discovery_ttl=6.0)
                tg.start_soon(DecodeWorker(settings, make_engine(config)).run)

    anyio.run(main, backend_options={"use_uvloop": True})


# --- the driver --------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    cached: int = 0
    prompt: int = 0
    output: int = 0
    worker: str = ""
    error: str = ""


@dataclass
class ModeResult:
    mode: str
    outcomes: list[Outcome] = field(default_factory=list)
    makespan: float = 0.0
    decision_mean_us: float = 0.0

    def summary(self) -> dict:
        ok = [o for o in self.outcomes if o.ok]
        ttft = sorted(o.ttft for o in ok)

        def q(xs: list[float], p: float) -> float:
            return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

        per_worker: dict[str, int] = {}
        for o in ok:
            per_worker[o.worker] = per_worker.get(o.worker, 0) + 1
        return {
            "mode": self.mode,
            "requests": len(self.outcomes),
            "errors": len(self.outcomes) - len(ok),
            "hit_rate": round(sum(o.cached for o in ok) / max(1, sum(o.prompt for o in ok)), 4),
            "ttft_mean_ms": round(statistics.fmean(ttft) * 1e3, 1) if ttft else None,
            "ttft_p50_ms": round(q(ttft, 0.5) * 1e3, 1),
            "ttft_p90_ms": round(q(ttft, 0.9) * 1e3, 1),
            "latency_mean_ms": round(statistics.fmean(o.latency for o in ok) * 1e3, 1) if ok else None,
            "throughput_rps": round(len(ok) / self.makespan, 2) if self.makespan else None,
            "output_tokens_per_s": round(sum(o.output for o in ok) / self.makespan, 1) if self.makespan else None,
            "makespan_s": round(self.makespan, 1),
            "router_decision_mean_us": round(self.decision_mean_us, 1),
            "requests_per_worker_min_max": [min(per_worker.values(), default=0), max(per_worker.values(), default=0)],
        }


async def one_request(bus: Bus, r: TraceRequest, t_start: float) -> Outcome:
    await anyio.sleep_until(t_start + r.arrival)
    rid = f"trace-{r.index}"
    t0 = time.perf_counter()
    try:
        return await _one_request(bus, r, rid, t0)
    except Exception as e:  # every failure is counted, whatever its kind
        return Outcome(False, error=f"{type(e).__name__}: {e}")


async def _one_request(bus: Bus, r: TraceRequest, rid: str, t0: float) -> Outcome:
    try:
        msg = await bus.request(ROUTE, RouteRequest(request_id=rid, model="trace", token_ids=r.tokens), timeout=10)
    except BusError as e:
        return Outcome(False, error=f"route: {e}")
    decision = route_reply_decoder.decode(msg.data)
    if not isinstance(decision, RouteDecision):
        return Outcome(False, error=f"route: {decision}")
    inbox = bus.inbox.open(rid)
    try:
        req = GenerateRequest(request_id=rid, token_ids=r.tokens, model="trace", stream=True,
                              sampling=SamplingParams(max_tokens=r.output_tokens, ignore_eos=True))
        await bus.publish(decision.subject, req, reply=inbox.subject)
        ttft = 0.0
        while True:
            reply = generate_reply_decoder.decode((await inbox.next(120)).data)
            if isinstance(reply, GenerateError):
                return Outcome(False, error=reply.message)
            if not isinstance(reply, TokenChunk):
                return Outcome(False, error=f"unexpected reply {type(reply).__name__}")
            if not ttft:
                ttft = time.perf_counter() - t0
            if reply.finish_reason is not None:
                usage = reply.usage
                produced = reply.index + len(reply.token_ids)
                if produced != r.output_tokens:  # ignore_eos: anything else is a failure
                    return Outcome(False, error=f"{produced} tokens, expected {r.output_tokens}")
                return Outcome(True, ttft, time.perf_counter() - t0, usage.cached_tokens if usage else 0,
                               len(r.tokens), produced, decision.worker_id)
    except BusError as e:
        return Outcome(False, error=f"generate: {e}")
    finally:
        bus.inbox.close(rid)


async def drive(nats_url: str, reqs: list[TraceRequest], workers: int) -> tuple[list[Outcome], float]:
    from shared.discovery import WorkerView

    logging.getLogger("baton.bus").setLevel(logging.ERROR)  # "disconnected" at close is expected
    bus = await Bus.connect(nats_url, "trace-driver")
    try:
        view = WorkerView(bus)
        async with anyio.create_task_group() as tg:
            tg.start_soon(view.run)
            with anyio.fail_after(120):
                await view.wait_for("decode", workers)
                while True:  # the router answers once it has caught up with the KV events stream
                    try:
                        m = await bus.request(ROUTE, RouteRequest(request_id="probe", model="trace", token_ids=[1]),
                                              timeout=2)
                        if isinstance(route_reply_decoder.decode(m.data), RouteDecision):
                            break
                    except BusError:
                        pass
                    await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
        outcomes: list[Outcome] = [Outcome(False, error="not run")] * len(reqs)
        t_start = anyio.current_time() + 0.5
        t0 = time.perf_counter()

        async def run(i: int, r: TraceRequest) -> None:
            outcomes[i] = await one_request(bus, r, t_start)

        async with anyio.create_task_group() as tg:
            for i, r in enumerate(reqs):
                tg.start_soon(run, i, r)
        return outcomes, time.perf_counter() - t0 - 0.5
    finally:
        await bus.close()


def scrape_decision_mean_us(port: int) -> float:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return float("nan")
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("baton_router_decision_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("baton_router_decision_seconds_count"):
            count = float(line.split()[-1])
    return total / count * 1e6 if count else float("nan")


# Bench mode -> (router --mode, extra router options).
MODES = {
    "kv": ("kv", []),
    "kv-approx": ("kv-approx", []),
    "least-loaded": ("kv", ["--overlap-weight", "0"]),
    "round-robin": ("round-robin", []),
    "random": ("random", []),
}


def run_mode(mode: str, reqs: list[TraceRequest], args: argparse.Namespace, d: Path) -> ModeResult:
    router_mode, router_extra = MODES[mode]
    d.mkdir(parents=True, exist_ok=True)
    nats = EmbeddedNats(data_dir=d / "js", log_file=d / "nats.log").start()
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    metrics_port = free_port()
    try:
        with open(d / "workers.log", "wb") as wlog, open(d / "router.log", "wb") as rlog:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--serve-workers", "--nats-url", nats.url, *args.worker_argv],
                stdout=wlog, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "services.router", "--nats-url", nats.url, "--mode", router_mode, "--seed", "0",
                 "--snapshot-interval", "0", "--metrics-port", str(metrics_port), "--log-level", "warning",
                 *router_extra, *args.router_args.split()],
                stdout=rlog, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        outcomes, makespan = anyio.run(drive, nats.url, reqs, args.workers, backend_options={"use_uvloop": True})
        result = ModeResult(mode, outcomes, makespan, scrape_decision_mean_us(metrics_port))
        errors = [o.error for o in outcomes if not o.ok]
        if errors:
            print(f"  {mode}: {len(errors)} errors, e.g. {errors[:3]}", flush=True)
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        nats.cleanup()



def spread(values: list[float]) -> dict:
    """Median and range of one figure over repeats (None where a repeat had nothing to measure)."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return {"median": None, "min": None, "max": None, "values": values}
    return {"median": round(statistics.median(xs), 4), "min": min(xs), "max": max(xs), "values": values}


FIGURES = ["hit_rate", "ttft_mean_ms", "ttft_p90_ms", "throughput_rps", "errors"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--start", type=int, default=1000, help="first trace request of the slice")
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--capacity", type=float, default=0.0,
                    help="the fleet's capacity in requests/s; measured with round-robin when not given")
    ap.add_argument("--overload", type=float, default=2.0,
                    help="capacity run: offered load, as a multiple of the cold prefill capacity")
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.7, 0.9], help="fractions of capacity")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="mocker", help="mocker (default) or torch (baton-tiny; small scale only)")
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per worker")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-batched-tokens", type=int, default=128)
    ap.add_argument("--output-cap", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["kv", "least-loaded", "round-robin", "random"],
                    choices=sorted(MODES))
    ap.add_argument("--router-args", default="", help="extra router options for every mode")
    ap.add_argument("--json", type=str, default="")
    ap.add_argument("--serve-workers", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nats-url", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.worker_argv = ["--workers", str(args.workers), "--engine", args.engine, "--block-tokens",
                        str(args.block_tokens), "--num-blocks", str(args.num_blocks), "--max-num-seqs",
                        str(args.max_num_seqs), "--max-batched-tokens", str(args.max_batched_tokens)]
    if args.serve_workers:
        serve_workers(args)
        return

    ratio = TRACE_BLOCK_TOKENS // args.block_tokens
    prefill_rate = 1 / (2e-5 * ratio)  # scaled prompt tokens a worker prefills per second
    base = load_trace(args.trace, args.start, args.requests, args.block_tokens, 1.0, args.output_cap)
    prompt_tokens = sum(len(r.tokens) for r in base)
    # Cold prefill capacity: the rate at which prompts alone, nothing cached, fill every worker.
    cold_capacity = args.workers * prefill_rate / (prompt_tokens / len(base))
    oracle = {
        "oracle_exact_caches": round(simulate_hit_rate(base, args.workers, args.num_blocks, args.block_tokens,
                                                       "oracle", prefill_rate), 4),
        "simulated_round_robin": round(simulate_hit_rate(base, args.workers, args.num_blocks, args.block_tokens,
                                                         "round-robin", prefill_rate), 4),
        "infinite_cache_bound": round(infinite_cache_hit_rate(base, args.block_tokens), 4),
    }
    print(f"{len(base)} requests (trace #{args.start}..), mean prompt {prompt_tokens / len(base):.0f} tokens "
          f"({prompt_tokens / len(base) / args.block_tokens:.1f} blocks), output <= {args.output_cap}; "
          f"{args.workers} workers x {args.num_blocks} blocks; cold prefill capacity {cold_capacity:.1f} req/s", flush=True)
    print(f"offline (oracle at 1 req/s): oracle hit rate {oracle['oracle_exact_caches']:.3f}; round-robin in the same "
          f"simulation {oracle['simulated_round_robin']:.3f}; one infinite cache {oracle['infinite_cache_bound']:.3f}",
          flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="baton-trace-"))
    capacity_run = None
    capacity = args.capacity
    if not capacity:
        rate = args.overload * cold_capacity
        reqs = load_trace(args.trace, args.start, args.requests, args.block_tokens, rate, args.output_cap)
        res = run_mode("round-robin", reqs, args, workdir / "capacity").summary()
        capacity = res["throughput_rps"]
        capacity_run = {"offered_rps": round(rate, 2), **res}
        print(f"capacity: round-robin offered {rate:.1f} req/s delivered {capacity} req/s "
              f"(TTFT mean {res['ttft_mean_ms']} ms, errors {res['errors']}) -> capacity {capacity} req/s", flush=True)

    cells: dict[tuple[float, str], list[dict]] = {}
    for rep in track(range(args.repeats), "repeats"):
        for load in args.loads:
            rate = load * capacity
            reqs = load_trace(args.trace, args.start, args.requests, args.block_tokens, rate, args.output_cap)
            k = rep % len(args.modes)
            for mode in args.modes[k:] + args.modes[:k]:  # rotate: noise hits every mode alike
                la = os.getloadavg()[0]
                s = run_mode(mode, reqs, args, workdir / f"r{rep}-{load}-{mode}").summary()
                s.update(offered_rps=round(rate, 2), load=load, repeat=rep, loadavg_1m=round(la, 2))
                cells.setdefault((load, mode), []).append(s)
                print(f"rep {rep} load {load:.2f} ({rate:5.1f} req/s) {mode:12} hit {s['hit_rate']:.3f}  TTFT mean "
                      f"{s['ttft_mean_ms']} p90 {s['ttft_p90_ms']} ms  {s['throughput_rps']} req/s  errors "
                      f"{s['errors']}  per worker {s['requests_per_worker_min_max']}  loadavg {la:.1f}", flush=True)

    table = []
    print(f"\nmedian [min-max] over {args.repeats} repeats; capacity {capacity} req/s")
    for (load, mode), runs in cells.items():
        row = {"load": load, "offered_rps": runs[0]["offered_rps"], "mode": mode,
               **{f: spread([r[f] for r in runs]) for f in FIGURES}, "runs": runs}
        table.append(row)
        print(f"load {load:.2f} {mode:12} " + "  ".join(
            f"{f} {row[f]['median']} [{row[f]['min']}-{row[f]['max']}]" for f in FIGURES), flush=True)
    for load in args.loads:
        by = {r["mode"]: r for r in table if r["load"] == load}
        kv = by.get("kv")
        for base_mode in ("round-robin", "least-loaded", "random"):
            if kv and base_mode in by and kv["ttft_mean_ms"]["median"]:
                b = by[base_mode]
                ratios = [bb["ttft_mean_ms"] / kk["ttft_mean_ms"] for bb, kk in zip(b["runs"], kv["runs"], strict=True)
                          if bb["ttft_mean_ms"] and kk["ttft_mean_ms"]]
                print(f"load {load:.2f}: {base_mode} / kv mean TTFT per repeat "
                      f"{[round(x, 2) for x in ratios]} (median {statistics.median(ratios):.2f}x)", flush=True)
    out = {"workload": {"requests": len(base), "start": args.start, "workers": args.workers,
                        "num_blocks": args.num_blocks, "block_tokens": args.block_tokens,
                        "output_cap": args.output_cap, "engine": args.engine,
                        "cold_capacity_rps": round(cold_capacity, 2)},
           "capacity_rps": capacity, "capacity_run": capacity_run, "oracle": oracle, "cells": table,
           "logs": str(workdir)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
