"""Replay the Mooncake conversation trace through the real router: kv vs round-robin vs random.

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

Oracle. Offline, with the exact cache contents: every worker an LRU cache of ``--num-blocks``
blocks, each request sent where its estimated TTFT is least (prefill backlog, a fluid queue, plus
its tokens not cached there), the engine's hit rule applied (whole blocks, at least one token
computed). The same simulation under round-robin checks it against the measured round-robin hit
rate. Also the bound of one infinite cache (every block ever seen), which no routing can beat.

    python bench/router_trace.py [--requests 1000] [--workers 8] [--rate 24] [--modes kv round-robin random]
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
            assert isinstance(reply, TokenChunk)
            if not ttft:
                ttft = time.perf_counter() - t0
            if reply.finish_reason is not None:
                usage = reply.usage
                return Outcome(True, ttft, time.perf_counter() - t0, usage.cached_tokens if usage else 0,
                               len(r.tokens), reply.index + len(reply.token_ids), decision.worker_id)
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


def run_mode(mode: str, reqs: list[TraceRequest], args: argparse.Namespace, workdir: Path) -> ModeResult:
    d = workdir / mode
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
                [sys.executable, "-m", "services.router", "--nats-url", nats.url, "--mode", mode, "--seed", "0",
                 "--snapshot-interval", "0", "--metrics-port", str(metrics_port), "--log-level", "warning",
                 *args.router_args.split()],
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--start", type=int, default=0, help="first trace request of the slice")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=24.0, help="mean arrival rate after time compression (req/s)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--engine", default="mocker", help="mocker (default) or torch (baton-tiny; small scale only)")
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per worker")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-batched-tokens", type=int, default=128)
    ap.add_argument("--output-cap", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["kv", "round-robin", "random"],
                    help="any of kv, kv-approx, round-robin, random")
    ap.add_argument("--router-args", default="", help="extra router options, e.g. '--overlap-weight 2'")
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

    reqs = load_trace(args.trace, args.start, args.requests, args.block_tokens, args.rate, args.output_cap)
    prompt_tokens = sum(len(r.tokens) for r in reqs)
    ratio = TRACE_BLOCK_TOKENS // args.block_tokens
    span = reqs[-1].arrival
    demand = prompt_tokens * 2e-5 * ratio / (args.workers * span)
    print(f"{len(reqs)} requests (trace #{args.start}..), {span:.0f} s at {len(reqs) / span:.1f} req/s, "
          f"mean prompt {prompt_tokens / len(reqs):.0f} tokens ({prompt_tokens / len(reqs) / args.block_tokens:.1f} "
          f"blocks), output <= {args.output_cap}; {args.workers} workers x {args.num_blocks} blocks; "
          f"cold prefill demand = {demand:.2f} of the workers' prefill capacity", flush=True)
    prefill_rate = 1 / (2e-5 * ratio)
    oracle = {
        "oracle_exact_caches": round(simulate_hit_rate(reqs, args.workers, args.num_blocks, args.block_tokens,
                                                       "oracle", prefill_rate), 4),
        "simulated_round_robin": round(simulate_hit_rate(reqs, args.workers, args.num_blocks, args.block_tokens,
                                                         "round-robin", prefill_rate), 4),
        "infinite_cache_bound": round(infinite_cache_hit_rate(reqs, args.block_tokens), 4),
    }
    print(f"offline: oracle hit rate (exact caches, least estimated TTFT) {oracle['oracle_exact_caches']:.3f}; "
          f"round-robin in the same simulation {oracle['simulated_round_robin']:.3f}; "
          f"one infinite cache {oracle['infinite_cache_bound']:.3f}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="baton-trace-"))
    summaries = []
    for mode in args.modes:
        res = run_mode(mode, reqs, args, workdir)
        s = res.summary()
        summaries.append(s)
        print(f"{mode:12} hit {s['hit_rate']:.3f}  TTFT mean {s['ttft_mean_ms']} ms p50 {s['ttft_p50_ms']} "
              f"p90 {s['ttft_p90_ms']} ms  latency mean {s['latency_mean_ms']} ms  {s['throughput_rps']} req/s "
              f"{s['output_tokens_per_s']} tok/s  decision {s['router_decision_mean_us']} us  "
              f"errors {s['errors']}  per worker {s['requests_per_worker_min_max']}", flush=True)
    by_mode = {s["mode"]: s for s in summaries}
    if "kv" in by_mode and "round-robin" in by_mode and by_mode["kv"]["ttft_mean_ms"]:
        kv, rr = by_mode["kv"], by_mode["round-robin"]
        print(f"kv vs round-robin: mean TTFT {rr['ttft_mean_ms'] / kv['ttft_mean_ms']:.2f}x lower, p90 "
              f"{rr['ttft_p90_ms'] / kv['ttft_p90_ms']:.2f}x lower, hit rate {kv['hit_rate'] / max(rr['hit_rate'], 1e-9):.2f}x "
              f"({kv['hit_rate']:.3f} vs oracle {oracle['oracle_exact_caches']:.3f})", flush=True)
    out = {"workload": {"requests": len(reqs), "start": args.start, "rate": args.rate, "workers": args.workers,
                        "num_blocks": args.num_blocks, "block_tokens": args.block_tokens,
                        "output_cap": args.output_cap, "engine": args.engine, "prefill_demand": round(demand, 3)},
           "oracle": oracle, "modes": summaries, "logs": str(workdir)}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
