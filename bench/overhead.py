"""Baton's own overhead: the whole stack with a near-free mocker engine.

Starts ``baton up --engine mocker --mocker-speedup 1e9`` (embedded NATS, frontend, router, one
decode worker) and drives /v1/completions with 16-token completions at concurrency 1, 16 and 64,
non-streamed and streamed, from a lean client on the same machine. Prints a table and JSON.

    python bench/overhead.py [--duration 5] [--concurrency 1 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from baton.nats_server import free_port
from bench.loadgen import run_load


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", type=str, default="", help="also write the results here")
    ap.add_argument("--up-args", type=str, default="", help="extra arguments for baton up")
    args = ap.parse_args()

    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    proc = start_stack(port, logdir, args.up_args.split())
    results = []
    try:
        payload = {"model": "baton-tiny", "prompt": "Measure the overhead of every hop in the stack.",
                   "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
        for stream in (False, True):
            for c in args.concurrency:
                r = asyncio.run(run_load("127.0.0.1", port, "/v1/completions", {**payload, "stream": stream}, c,
                                         args.duration))
                results.append(r.summary())
                s = results[-1]
                print(f"stream={stream!s:5} c={c:3}  {s['rps']:8.1f} req/s  p50 {s['p50_ms']:7.2f} ms  "
                      f"p99 {s['p99_ms']:7.2f} ms  ttft p50 {s['ttft_p50_ms']:7.2f} ms  errors {s['errors']}",
                      flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
