"""Disaggregation's effect on users: inter-token latency of running streams while long prompts
keep arriving, aggregated against disaggregated on the same hardware budget.

Two engine processes either way, one torch thread each (``BATON_TORCH_THREADS=1``), and the same
router (``--router-mode``, kv by default: load-aware) in front:

- aggregated-cN: 2 decode workers, no prefill worker (``--no-disagg``), prefill chunked to N tokens
  a step (``--max-batched-tokens N``), for every N in ``--chunks``: a smaller chunk bounds the step
  a decode waits for, at the cost of more steps per prompt. The baseline gets its best chunk.
- disaggregated: 1 prefill worker + 1 decode worker; prompts of at least ``--remote-min-tokens``
  uncached tokens are prefilled on the prefill worker and their KV written into the decode
  worker's pool over the TCP KV transport; short prompts (the streams) prefill locally.

Load, through the frontend's streaming NATS request API (``baton.v1.api.generate``: the same
pipeline as HTTP, but each chunk names its tokens): ``--streams`` closed-loop streams (short
prompts, ``--stream-tokens`` each, restarted when done) and, open loop, a long prompt of
``--long-tokens`` random token ids (no prefix reuse) every ``--interval`` seconds, each asking
for ``--long-max-tokens``. Measured over ``--duration`` seconds after ``--warmup``:

- ITL per token: a chunk may carry several tokens (the frontend coalesces replies that pile up),
  so a chunk of k tokens arriving g seconds after the previous one counts as k gaps of g/k; the
  extra tokens of a stream's first chunk count as gaps of 0. Also reported: tokens per chunk.
- the long prompts' time to first token (TTFT);
- errors: a request fails on an error reply, a timeout, or fewer tokens than asked (EOS ignored);
- the decode worker's disaggregation decisions (proof that the remote path was taken).

``--repeats`` rounds, each running every mode once, the order rotated between rounds; median and
range over rounds.

    python bench/disagg_bench.py [--model baton-small] [--chunks 64 128 256 512] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

import httpx
import nats

from shared import subjects
from shared.messages import ApiChunk, ApiGenerateRequest, api_reply_msgpack_decoder, encode
from shared.progress import track
from tests.disagg.util import DisaggStack
from tests.procs import wait_until


@dataclass
class Stats:
    itl: list[float] = field(default_factory=list)  # seconds between successive tokens
    chunks: int = 0  # stream chunks received (in the window)
    chunk_tokens: int = 0  # tokens they carried
    stream_ttft: list[float] = field(default_factory=list)
    long_ttft: list[float] = field(default_factory=list)
    long_latency: list[float] = field(default_factory=list)
    stream_tokens: int = 0
    errors: int = 0
    error_kinds: list[str] = field(default_factory=list)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def nats_stream(nc: nats.NATS, req: ApiGenerateRequest, timeout: float) -> tuple[str, list[tuple[float, int]]]:
    """Stream one request over the NATS API: ("" or an error, [(arrival time, tokens) per chunk])."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    chunks: list[tuple[float, int]] = []
    try:
        await nc.publish(subjects.API_GENERATE, encode(req), reply=inbox)
        produced = 0
        while True:
            msg = await sub.next_msg(timeout=timeout)
            reply = api_reply_msgpack_decoder.decode(msg.data)
            if not isinstance(reply, ApiChunk):
                return f"error {reply.code}: {reply.message}", chunks
            if reply.token_ids:
                chunks.append((time.perf_counter(), len(reply.token_ids)))
                produced += len(reply.token_ids)
            if reply.finish_reason is not None:
                if produced != req.max_tokens:
                    return f"{produced} tokens, expected {req.max_tokens}", chunks
                return "", chunks
    except (nats.errors.TimeoutError, TimeoutError):
        return "timeout", chunks
    finally:
        await sub.unsubscribe()


def token_gaps(chunks: list[tuple[float, int]], t_from: float, t_to: float) -> list[float]:
    """Inter-token gaps of one stream from its chunks (arrival time, tokens), inside [t_from, t_to].

    A chunk of k tokens arriving g after the previous chunk stands for k tokens g/k apart; tokens
    that came with the stream's first token have a gap of 0.
    """
    gaps: list[float] = []
    if chunks and t_from <= chunks[0][0] <= t_to:
        gaps += [0.0] * (chunks[0][1] - 1)
    for (a, _), (b, k) in itertools.pairwise(chunks):
        if t_from <= a and b <= t_to:
            gaps += [(b - a) / k] * k
    return gaps


async def drive(nats_url: str, args: argparse.Namespace, vocab: int) -> Stats:
    nc = await nats.connect(nats_url)
    try:
        return await _drive(nc, args, vocab)
    finally:
        await nc.close()


async def _drive(nc: nats.NATS, args: argparse.Namespace, vocab: int) -> Stats:
    st = Stats()
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    t_measure = t_start + args.warmup
    t_end = t_measure + args.duration
    stream_prompt = "A relay race story, told one token at a time:"

    async def stream_loop(i: int) -> None:
        n = 0
        while time.perf_counter() < t_end:
            req = ApiGenerateRequest(model=args.model, prompt=f"{stream_prompt} {i} {n}",
                                     max_tokens=args.stream_tokens, temperature=0, ignore_eos=True, stream=True)
            t0 = time.perf_counter()
            error, chunks = await nats_stream(nc, req, 120)
            n += 1
            if error:
                if t_measure <= t0 <= t_end:
                    st.errors += 1
                    st.error_kinds.append(error)
                await asyncio.sleep(0.1)
                continue
            if chunks and t0 >= t_measure:
                st.stream_ttft.append(chunks[0][0] - t0)
            st.itl.extend(token_gaps(chunks, t_measure, t_end))
            for t, k in chunks:
                if t_measure <= t <= t_end:
                    st.stream_tokens += k
                    st.chunks += 1
                    st.chunk_tokens += k

    async def one_long(prompt: list[int]) -> None:
        t0 = time.perf_counter()
        req = ApiGenerateRequest(model=args.model, token_ids=prompt, max_tokens=args.long_max_tokens, temperature=0,
                                 ignore_eos=True, stream=True)
        error, chunks = await nats_stream(nc, req, 180)
        if error or not chunks:
            st.errors += 1
            st.error_kinds.append(error or "no tokens")
            return
        if t_measure <= t0 <= t_end:
            st.long_ttft.append(chunks[0][0] - t0)
            st.long_latency.append(chunks[-1][0] - t0)

    async def long_arrivals() -> None:
        tasks = []
        nxt = t_start + 1.0
        while nxt < t_end:
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            prompt = [rng.randrange(3, vocab) for _ in range(args.long_tokens)]  # random: no prefix reuse
            tasks.append(asyncio.create_task(one_long(prompt)))
            nxt += args.interval
        await asyncio.gather(*tasks)

    await asyncio.gather(*(stream_loop(i) for i in range(args.streams)), long_arrivals())
    return st


def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    env = {"BATON_TORCH_THREADS": str(args.threads), "BATON_LOG_LEVEL": "warning",
           "BATON_ROUTER_MODE": args.router_mode}
    if mode.startswith("aggregated"):
        chunk = mode.removeprefix("aggregated-c")
        s = DisaggStack(workdir, "torch", model=args.model, decode_workers=2, prefill_workers=0,
                        metrics=True, env=env, decode_args=[["--no-disagg", "--max-batched-tokens", chunk]] * 2)
    else:
        s = DisaggStack(workdir, "torch", model=args.model, decode_workers=1, prefill_workers=1,
                        metrics=True, env=env,
                        decode_args=[["--remote-prefill-min-tokens", str(args.remote_min_tokens)]])
    try:
        s.start(ready_timeout=180)
        if mode == "disaggregated":
            wait_until(lambda: s.health().get("prefill_workers") == 1, 120, 0.2, "prefill worker")
            time.sleep(2)  # the decode worker's discovery view catches up
        # Warm both workers' kernels (and the decode worker's view of the prefill worker).
        for i in range(2):
            httpx.post(f"{s.url}/v1/completions", timeout=120, json={
                "model": args.model, "prompt": list(range(10 + i, 10 + i + args.long_tokens)), "max_tokens": 4,
                "temperature": 0, "ignore_eos": True}).raise_for_status()
        vocab = 2048
        st = asyncio.run(drive(s.nats.url, args, vocab))
        decisions = {d: s.metric("decode-0", "baton_disagg_decisions_total", decision=d)
                     for d in ("remote", "fallback_local", "local_short", "local_disabled", "local_queue_full",
                               "local_no_blocks", "local_no_prefill_worker")}
        decisions = {k: int(v) for k, v in decisions.items() if v}
    finally:
        s.stop()
    ms = 1e3
    return {
        "mode": mode,
        "stream_chunks": st.chunks,
        "tokens_per_chunk": round(st.chunk_tokens / st.chunks, 3) if st.chunks else None,
        "itl_p50_ms": round(pct(st.itl, 0.5) * ms, 1),
        "itl_p90_ms": round(pct(st.itl, 0.9) * ms, 1),
        "itl_p99_ms": round(pct(st.itl, 0.99) * ms, 1),
        "itl_max_ms": round(max(st.itl, default=float("nan")) * ms, 1),
        "itl_mean_ms": round(statistics.fmean(st.itl) * ms, 1) if st.itl else None,
        "stream_tokens_per_s": round(st.stream_tokens / args.duration, 1),
        "stream_ttft_p50_ms": round(pct(st.stream_ttft, 0.5) * ms, 1),
        "long_prompts": len(st.long_ttft),
        "long_ttft_p50_ms": round(pct(st.long_ttft, 0.5) * ms, 1),
        "long_ttft_p99_ms": round(pct(st.long_ttft, 0.99) * ms, 1),
        "long_latency_p50_ms": round(pct(st.long_latency, 0.5) * ms, 1),
        "errors": st.errors,
        "error_kinds": sorted(set(st.error_kinds))[:5],
        "decode0_decisions": decisions,
    }


FIGURES = ["itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "itl_max_ms", "stream_tokens_per_s", "long_ttft_p50_ms",
           "long_ttft_p99_ms", "tokens_per_chunk", "errors"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="baton-small")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-tokens", type=int, default=96)
    ap.add_argument("--long-tokens", type=int, default=1024)
    ap.add_argument("--long-max-tokens", type=int, default=8)
    ap.add_argument("--interval", type=float, default=2.5, help="seconds between long prompts")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine process")
    ap.add_argument("--remote-min-tokens", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 512],
                    help="prefill chunk sizes (tokens per step) of the aggregated baseline")
    ap.add_argument("--router-mode", default="kv", help="router policy, the same for every mode")
    ap.add_argument("--modes", nargs="+", default=None,
                    help="default: aggregated-cN for every --chunks N, then disaggregated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    modes = args.modes or [*(f"aggregated-c{c}" for c in args.chunks), "disaggregated"]

    from shared.builtin_model import ensure_builtin

    ensure_builtin(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="baton-disagg-bench-"))
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    loads = []
    for rep in track(range(args.repeats), "repeats"):
        k = rep % len(modes)
        for m in modes[k:] + modes[:k]:  # rotate: noise from other jobs hits every mode alike
            loads.append(os.getloadavg()[0])
            r = run_mode(m, args, workdir / f"r{rep}-{m}")
            r["loadavg_1m"] = round(loads[-1], 2)
            runs[m].append(r)
            print(f"rep {rep} " + " ".join(f"{c}={r[c]}" for c in ["mode", *FIGURES]) +
                  f" decisions={r['decode0_decisions']} loadavg={loads[-1]:.1f}", flush=True)
    print(f"\nmedian [min-max] over {args.repeats} repeats; load average {min(loads):.1f}-{max(loads):.1f}")
    table = []
    for m in modes:
        row: dict = {"mode": m}
        for f in FIGURES:
            xs = [r[f] for r in runs[m] if r[f] is not None]
            row[f] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None
        table.append(row)
        print(f"{m:16} " + "  ".join(f"{f} {row[f]['median']} [{row[f]['min']}-{row[f]['max']}]"
                                     for f in FIGURES if row[f]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "loadavg": loads, "table": table, "runs": runs},
                                              indent=1))


if __name__ == "__main__":
    main()
