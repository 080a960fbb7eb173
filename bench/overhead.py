"""Baton's own overhead: the whole stack with a near-free mocker engine.

Starts ``baton up --engine mocker --mocker-speedup 1e9`` (embedded NATS, frontend, router, one
decode worker) and drives /v1/completions with 16-token completions at concurrency 1, 16 and 64,
non-streamed and streamed, from a lean client on the same machine. Each repeat runs every
(mode, concurrency) cell once, so noise from other jobs lands on all cells alike; the table gives
the median and min-max over the repeats, and the failed requests (non-200) of all of them.

    python bench/overhead.py [--duration 5] [--concurrency 1 16 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from baton.nats_server import free_port
from bench.loadgen import run_load
from shared.progress import track


def start_stack(port: int, logdir: Path, extra: list[str]) -> subprocess.Popen:
    log = open(logdir / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "up", "--engine", "mocker", "--mocker-speedup", "1e9", "--host", "127.0.0.1",
         "--port", str(port), "--nats-port", str(free_port()), "--prefill-workers", "0", "--log-dir", str(logdir),
         "--log-level", "warning", *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while "Baton is ready" not in (logdir / "up.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((logdir / "up.log").read_text())
        time.sleep(0.1)
    return proc


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    ok = [v for v in values if v == v]
    if not ok:
        return "-"
    return f"{fmt.format(statistics.median(ok))} ({fmt.format(min(ok))}-{fmt.format(max(ok))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=str, default="", help="also write every run here")
    ap.add_argument("--up-args", type=str, default="", help="extra arguments for baton up")
    args = ap.parse_args()

    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    proc = start_stack(port, logdir, args.up_args.split())
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs: list[dict] = []
    try:
        payload = {"model": "baton-tiny", "prompt": "Measure the overhead of every hop in the stack.",
                   "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
        for repeat in track(range(args.repeats), "repeats"):
            for stream in (False, True):
                for c in args.concurrency:
                    r = asyncio.run(run_load("127.0.0.1", port, "/v1/completions", {**payload, "stream": stream}, c,
                                             args.duration))
                    s = {**r.summary(), "repeat": repeat, "load1": os.getloadavg()[0]}
                    runs.append(s)
                    print(f"#{repeat} stream={stream!s:5} c={c:3}  {s['rps']:8.1f} req/s  p50 {s['p50_ms']:7.2f} ms  "
                          f"p99 {s['p99_ms']:7.2f} ms  ttft p50 {s['ttft_p50_ms']:7.2f} ms  errors {s['errors']}  "
                          f"load {s['load1']:.2f}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    loads = [r["load1"] for r in runs]
    print(f"\n{started}, {args.repeats} repeats of {args.duration:g} s per cell, "
          f"load average {min(loads):.2f}-{max(loads):.2f}; median (min-max) over the repeats\n")
    print("| mode | c | req/s | p50 ms | p99 ms | TTFT p50 ms | errors / requests |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stream in (False, True):
        for c in args.concurrency:
            cell = [r for r in runs if r["stream"] == stream and r["concurrency"] == c]
            print(f"| {'streamed' if stream else 'non-streamed'} | {c} | {spread([r['rps'] for r in cell], '{:.0f}')} | "
                  f"{spread([r['p50_ms'] for r in cell], '{:.2f}')} | {spread([r['p99_ms'] for r in cell], '{:.1f}')} | "
                  f"{spread([r['ttft_p50_ms'] for r in cell], '{:.2f}')} | "
                  f"{sum(r['errors'] for r in cell)} / {sum(r['requests'] for r in cell)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started, "args": vars(args), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
