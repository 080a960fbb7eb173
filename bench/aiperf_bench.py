"""Baton through aiperf, the load tool platform teams use: streaming chat at concurrency 1, 16, 64.

    python bench/aiperf_bench.py --aiperf /tmp/aiperf-venv/bin/aiperf [--engines mocker,torch]
        [--concurrency 1 16 64] [--repeats 3] [--isl 128] [--osl 64] [--json out.json]

aiperf is not a Baton dependency: ``bench/aiperf.sh`` (``make bench-aiperf``) installs it into a
throwaway virtualenv and runs this script. For each engine a ``baton up`` stack is started
(embedded NATS, frontend, router, one decode worker, no prefill worker); all stacks stay up and
each repeat runs every (concurrency, engine) cell once, in turn, so noise from other jobs on the
machine lands on all of them alike. aiperf runs offline: its tokenizer is the built-in model's
own directory (``--tokenizer <dir>``; HF_HUB_OFFLINE is left unset, as it breaks aiperf's loader
for a local path). Token counts are the server's (``--use-server-token-count``): the built-in
models' gibberish does not re-tokenize to the same count. Prompts are aiperf's synthetic ones,
``--isl`` tokens (no spread), ``--osl`` output tokens with EOS ignored, one warm-up request per
concurrency slot before each measured run.

The mocker runs at its default simulated timing (5 ms per decode step + 0.1 ms per sequence,
20 us per prefill token), so its TTFT and ITL are Baton's stack on top of a known engine cost;
the torch engine runs the real model (``--model``, default baton-small) at its default dtype.
"""

from __future__ import annotations

import argparse
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
from shared.models import resolve_model
from shared.progress import track

# (name in the table, key in aiperf's profile_export_aiperf.json, statistic)
METRICS = [
    ("req/s", "request_throughput", "avg"),
    ("output tok/s", "output_token_throughput", "avg"),
    ("TTFT p50 ms", "time_to_first_token", "p50"),
    ("TTFT p90 ms", "time_to_first_token", "p90"),
    ("ITL p50 ms", "inter_token_latency", "p50"),
    ("ITL p90 ms", "inter_token_latency", "p90"),
    ("latency p50 ms", "request_latency", "p50"),
]


def start_stack(engine: str, model: str, logdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    logdir.mkdir(parents=True, exist_ok=True)
    log = open(logdir / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "up", "--engine", engine, "--model", model, "--host", "127.0.0.1",
         "--port", str(port), "--nats-port", str(free_port()), "--prefill-workers", "0", "--log-dir", str(logdir),
         "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while "Baton is ready" not in (logdir / "up.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"baton up --engine {engine} did not start:\n{(logdir / 'up.log').read_text()}")
        time.sleep(0.2)
    return proc, port


def run_aiperf(aiperf: str, url: str, model: str, tokenizer: Path, concurrency: int, requests: int,
               args: argparse.Namespace, out: Path) -> dict:
    """One aiperf profile run; returns its summary JSON (or an 'error' entry if it failed)."""
    cmd = [aiperf, "profile", "--model", model, "--tokenizer", str(tokenizer), "--url", url,
           "--endpoint-type", "chat", "--streaming", "--concurrency", str(concurrency),
           "--request-count", str(requests), "--warmup-request-count", str(concurrency),
           "--isl", str(args.isl), "--isl-stddev", "0", "--osl", str(args.osl), "--osl-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--use-server-token-count", "--random-seed", "0",
           "--ui-type", "none", "--no-server-metrics", "--artifact-dir", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # breaks its local-path loader
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    (out / "aiperf.stdout").parent.mkdir(parents=True, exist_ok=True)
    (out / "aiperf.stdout").write_text(r.stdout + r.stderr)
    summary = out / "profile_export_aiperf.json"
    if r.returncode != 0 or not summary.exists():
        return {"error": f"aiperf exited {r.returncode}: {(r.stdout + r.stderr)[-500:]}"}
    return json.loads(summary.read_text())


def cell(data: dict, key: str, stat: str) -> float:
    v = data.get(key) or {}
    x = v.get(stat) if isinstance(v, dict) else None
    return float("nan") if x is None else float(x)


def errors_of(data: dict, requested: int) -> int:
    """Failed requests: aiperf's error summary, else the requests that did not complete."""
    if "error" in data:
        return requested
    n = sum(int(e.get("count", 0)) for e in data.get("error_summary") or [])
    done = cell(data, "completed_request_count", "avg")
    return max(n, requested - int(done)) if done == done else n


def spread(values: list[float], fmt: str) -> str:
    ok = [v for v in values if v == v]
    if not ok:
        return "-"
    med = statistics.median(ok)
    return fmt.format(med) if len(ok) == 1 else f"{fmt.format(med)} ({fmt.format(min(ok))}-{fmt.format(max(ok))})"


def table(runs: list[dict], engines: list[str], concurrency: list[int], started: str, version: str,
          repeats: int) -> str:
    loads = [r["load1"] for r in runs]
    out = [f"\n{started}, aiperf {version}, {repeats} repeats, load average {min(loads):.2f}-{max(loads):.2f}; "
           "median (min-max) over the repeats\n",
           "| engine | c | " + " | ".join(name for name, _, _ in METRICS) + " | errors / requests |",
           "|---|---:|" + "---:|" * len(METRICS) + "---:|"]
    for engine in engines:
        for c in concurrency:
            rows = [r for r in runs if r["engine"] == engine and r["concurrency"] == c]
            if not rows:
                continue
            cols = [spread([r[f"{key}.{stat}"] for r in rows],
                           "{:.0f}" if key == "output_token_throughput" else "{:.1f}")
                    for _, key, stat in METRICS]
            out.append(f"| {engine} | {c} | " + " | ".join(cols)
                       + f" | {sum(r['errors'] for r in rows)} / {sum(r['requests'] for r in rows)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aiperf", default=os.environ.get("AIPERF", "/tmp/aiperf-venv/bin/aiperf"))
    ap.add_argument("--engines", default="mocker,torch")
    ap.add_argument("--model", default="baton-small")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--requests-per-slot", type=int, default=4, help="requests per run: this x concurrency, >= 16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per aiperf run")
    ap.add_argument("--json", default="", help="write every run's summary here")
    ap.add_argument("--report", default="", help="print the table of a saved --json file, run nothing")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        a = saved["args"]
        print(table(saved["runs"], a["engines"].split(","), a["concurrency"], saved["started"], saved["aiperf"],
                    a["repeats"]))
        return
    if not Path(args.aiperf).exists():
        sys.exit(f"aiperf not found at {args.aiperf}: run bench/aiperf.sh (make bench-aiperf), or pass --aiperf")
    version = subprocess.run([args.aiperf, "--version"], capture_output=True, text=True).stdout.strip()
    tokenizer = resolve_model(args.model).path  # builds the built-in model if needed
    workdir = Path(tempfile.mkdtemp(prefix="baton-aiperf-"))
    engines = args.engines.split(",")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"{started}: aiperf {version}, model {args.model}, tokenizer {tokenizer}, ISL {args.isl}, OSL {args.osl}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    stacks: dict[str, tuple[subprocess.Popen, int]] = {}
    runs: list[dict] = []
    try:
        for engine in engines:
            stacks[engine] = start_stack(engine, args.model, workdir / f"up-{engine}")
        for repeat in track(range(args.repeats), "repeats"):
            for c in args.concurrency:
                order = engines[repeat % len(engines):] + engines[:repeat % len(engines)]
                for engine in order:
                    n = max(16, args.requests_per_slot * c)
                    url = f"http://127.0.0.1:{stacks[engine][1]}"
                    data = run_aiperf(args.aiperf, url, args.model, tokenizer, c, n, args,
                                      workdir / f"{engine}-c{c}-r{repeat}")
                    row = {"engine": engine, "concurrency": c, "repeat": repeat, "requests": n,
                           "errors": errors_of(data, n), "load1": os.getloadavg()[0],
                           **{f"{key}.{stat}": cell(data, key, stat) for _, key, stat in METRICS}}
                    if "error" in data:
                        row["error"] = data["error"]
                    runs.append(row)
                    print(f"  #{repeat} {engine:6s} c={c:3d}: {row['request_throughput.avg']:7.1f} req/s "
                          f"{row['output_token_throughput.avg']:8.1f} tok/s  TTFT p50 "
                          f"{row['time_to_first_token.p50']:8.1f} ms  ITL p50 {row['inter_token_latency.p50']:6.2f} ms  "
                          f"errors {row['errors']}/{n}  load {row['load1']:.2f}", flush=True)
    finally:
        for proc, _ in stacks.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in stacks.values():
            proc.wait(60)
    print(table(runs, engines, args.concurrency, started, version, args.repeats))
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started, "aiperf": version, "args": vars(args),
                                               "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
