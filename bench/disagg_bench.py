"""Disaggregation's effect on users: inter-token latency of running streams while long prompts
keep arriving, aggregated against disaggregated on the same hardware budget.

Two engine processes either way, one torch thread each (``BATON_TORCH_THREADS=1``):

- aggregated: 2 decode workers, no prefill worker (``--no-disagg``); the router spreads streams
  and long prompts over both, so a long prompt's prefill chunks share steps with running decodes.
- disaggregated: 1 prefill worker + 1 decode worker; prompts of at least ``--remote-min-tokens``
  uncached tokens are prefilled on the prefill worker and their KV written into the decode
  worker's pool over the TCP KV transport; short prompts (the streams) prefill locally.

Load, through the frontend's streaming /v1/completions: ``--streams`` closed-loop streams (short
prompts, ``--stream-tokens`` each, restarted when done) and, open loop, a long prompt of
``--long-tokens`` random token ids (no prefix reuse) every ``--interval`` seconds, each asking
for ``--long-max-tokens``. Measured over ``--duration`` seconds after ``--warmup``: the gaps
between successive SSE events of the streams (ITL), the long prompts' time to first token
(TTFT), and the decode worker's disaggregation decisions (proof that the remote path was taken).

    python bench/disagg_bench.py [--model baton-small] [--duration 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from tests.disagg.util import DisaggStack
from tests.procs import wait_until


@dataclass
class Stats:
    itl: list[float] = field(default_factory=list)  # seconds between successive stream events
    stream_ttft: list[float] = field(default_factory=list)
    long_ttft: list[float] = field(default_factory=list)
    long_latency: list[float] = field(default_factory=list)
    stream_tokens: int = 0
    errors: int = 0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def sse_request(port: int, payload: dict) -> tuple[int, list[float], int]:
    """POST a streamed completion; (status, arrival time of every token-bearing event, tokens)."""
    body = json.dumps({**payload, "stream": True, "stream_options": {"include_usage": True}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times: list[float] = []
    tokens = 0
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        status = int((await reader.readline()).split()[1])
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        buf = b""
        while True:
            size_line = await reader.readline()
            if not size_line:
                break
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                break
            buf += await reader.readexactly(size + 2)
            buf = buf[:-2] if buf.endswith(b"\r\n") else buf
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]" or not data.startswith(b"{"):
                    continue
                obj = json.loads(data)
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                elif obj.get("choices"):
                    times.append(time.perf_counter())
        return status, times, tokens
    finally:
        writer.close()


async def drive(port: int, args: argparse.Namespace, vocab: int) -> Stats:
    st = Stats()
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    t_measure = t_start + args.warmup
    t_end = t_measure + args.duration
    stream_prompt = "A relay race story, told one token at a time:"

    async def stream_loop(i: int) -> None:
        n = 0
        while time.perf_counter() < t_end:
            payload = {"model": args.model, "prompt": f"{stream_prompt} {i} {n}", "max_tokens": args.stream_tokens,
                       "temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            status, times, _tokens = await sse_request(port, payload)
            n += 1
            if status != 200:
                st.errors += 1
                await asyncio.sleep(0.1)
                continue
            if times and t0 >= t_measure:
                st.stream_ttft.append(times[0] - t0)
            for a, b in itertools.pairwise(times):
                if t_measure <= a and b <= t_end:
                    st.itl.append(b - a)
            st.stream_tokens += sum(1 for t in times if t_measure <= t <= t_end)

    async def one_long(prompt: list[int]) -> None:
        t0 = time.perf_counter()
        payload = {"model": args.model, "prompt": prompt, "max_tokens": args.long_max_tokens, "temperature": 0,
                   "ignore_eos": True}
        status, times, _ = await sse_request(port, payload)
        if status != 200 or not times:
            st.errors += 1
            return
        if t_measure <= t0 <= t_end:
            st.long_ttft.append(times[0] - t0)
            st.long_latency.append(times[-1] - t0)

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
    env = {"BATON_TORCH_THREADS": str(args.threads), "BATON_LOG_LEVEL": "warning"}
    if mode == "aggregated":
        s = DisaggStack(workdir / mode, "torch", model=args.model, decode_workers=2, prefill_workers=0,
                        metrics=True, env=env, decode_args=[["--no-disagg"]] * 2)
    else:
        s = DisaggStack(workdir / mode, "torch", model=args.model, decode_workers=1, prefill_workers=1,
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
        st = asyncio.run(drive(s.port, args, vocab))
        decisions = {d: s.metric("decode-0", "baton_disagg_decisions_total", decision=d)
                     for d in ("remote", "fallback_local", "local_short", "local_disabled", "local_queue_full",
                               "local_no_blocks", "local_no_prefill_worker")}
        decisions = {k: int(v) for k, v in decisions.items() if v}
    finally:
        s.stop()
    ms = 1e3
    return {
        "mode": mode,
        "stream_events": len(st.itl) + 1,
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
        "decode0_decisions": decisions,
    }


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
    ap.add_argument("--modes", nargs="+", default=["aggregated", "disaggregated"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    from shared.builtin_model import ensure_builtin

    ensure_builtin(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="baton-disagg-bench-"))
    results = [run_mode(m, args, workdir) for m in args.modes]
    cols = ["mode", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "itl_max_ms", "stream_tokens_per_s", "long_prompts",
            "long_ttft_p50_ms", "long_ttft_p99_ms", "errors"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    for r in results:
        print(f"{r['mode']}: decode-0 decisions {r['decode0_decisions']}")
    if len(results) == 2 and results[1]["itl_p99_ms"]:
        a, d = results
        print(f"ITL p99 aggregated/disaggregated: {a['itl_p99_ms'] / d['itl_p99_ms']:.2f}x; "
              f"long-prompt TTFT p50 {a['long_ttft_p50_ms']} -> {d['long_ttft_p50_ms']} ms")
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
