"""The planner against a fixed fleet: worker-seconds spent and p90 TTFT on the same load.

Two load patterns, each replayed open-loop (arrivals at their times, whatever the latency):

* ``spike``: quiet, spike, quiet: Poisson arrivals at ``--quiet-rate``, then ``--spike-rate``, then
  ``--quiet-rate`` again; prompts of 128..384 random tokens, 16..48 output tokens.
* ``trace``: a slice of the Mooncake conversation trace (``--trace``) with its real arrival times,
  compressed by ``--trace-speed``; each 512-token hash block becomes a deterministic run of 16
  tokens (so the trace's prefix sharing is kept), input lengths scaled by 16/512, output lengths
  by 1/16 (capped at 64), then ``--trace-tail`` seconds of idle.
* ``trace-swing``: the same trace rows, real inter-arrival times, compressed ``--swing-speeds``
  (0.25x in the quiet phases, 1.5x in the spike; ``--phases`` long): quiet, spike, quiet on real traffic.

Each pattern runs twice from scratch under ``baton up`` with mocker workers (``--mocker-speedup``
makes them slow, so a few requests a second keep a worker busy on this small machine):

* planner: ``--planner-policy sla`` (or ``--policy load``) with the local connector, one decode
  worker to start with and at most ``--fleet``, a ``baton profile`` of the same worker config;
* fixed: as many decode workers as the planner ran at its peak on the pattern (or ``--fixed``),
  ``--planner-policy none`` (the same worker options).

Both use the KV-aware router. The client streams every request over HTTP (``/v1/completions``)
and records TTFT (first token), status and completion tokens; a sampler records, every 0.5 s,
the decode worker processes alive (children of ``baton up``: draining ones count), the workers
registered and the requests waiting in the workers (the planner's observations). Worker-seconds
= decode processes alive, integrated from the first arrival to the end of the pattern.

Writes into ``--out`` (docs/): ``planner-bench.json`` (config, summaries, decisions),
``planner-<pattern>.csv`` (time series), ``planner-<pattern>.png`` (rate, queue depth, replicas
and p90 TTFT over time, both fleets), and ``planner-profile.json`` (the profile the SLA policy used).

    python bench/planner_bench.py                     # both patterns, SLA policy (~12 min)
    python bench/planner_bench.py --patterns spike --policy load
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from baton.nats_server import free_port
from shared import subjects
from shared.bus import Bus, NatsSecurity
from shared.messages import PlannerObservation, ScaleDecision, planner_observation_decoder
from shared.nats_auth import creds_path

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
VOCAB_LO, VOCAB_HI = 16, 2000  # ordinary token ids of baton-tiny (2048 ids, specials at the bottom)
_MASK64 = (1 << 64) - 1
decision_decoder = msgspec.msgpack.Decoder(ScaleDecision)


# --- load patterns -----------------------------------------------------------------------------


@dataclass
class Req:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_tokens: int


@dataclass
class Pattern:
    name: str
    requests: list[Req]
    duration: float  # the pattern's end (>= last arrival): worker-seconds are counted up to here
    phases: list[tuple[str, float, float]] = field(default_factory=list)  # (label, start, end)


def spike_pattern(quiet_rate: float, spike_rate: float, phases: tuple[float, float, float], seed: int) -> Pattern:
    rng = random.Random(seed)
    reqs: list[Req] = []
    t0 = 0.0
    marks = []
    for label, rate, length in (("quiet", quiet_rate, phases[0]), ("spike", spike_rate, phases[1]),
                                ("quiet", quiet_rate, phases[2])):
        t = t0
        while True:
            t += rng.expovariate(rate)
            if t >= t0 + length:
                break
            n = rng.randint(128, 384)
            reqs.append(Req(t, [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)], rng.randint(16, 48)))
        marks.append((label, t0, t0 + length))
        t0 += length
    return Pattern("spike", reqs, t0, marks)


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def trace_pattern(path: Path, start: int, phases: list[tuple[str, float, float]], tail: float = 0.0,
                  lead: float = 2.0, name: str = "trace") -> Pattern:
    """Consecutive trace rows from ``start`` with their real arrival times, compressed by each
    phase's speed ((label, replay seconds, trace seconds per replay second)); then ``tail`` s idle."""
    block, ratio = 16, 512 // 16
    reqs: list[Req] = []
    marks: list[tuple[str, float, float]] = [("idle", 0.0, lead)] if lead else []
    bounds = []  # (trace time where the phase starts, its replay start, speed, replay end)
    trace_t, replay_t = 0.0, lead
    for label, seconds, speed in phases:
        bounds.append((trace_t, replay_t, speed, replay_t + seconds))
        marks.append((label, replay_t, replay_t + seconds))
        trace_t += seconds * speed
        replay_t += seconds
    t_first = None
    with open(path) as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            r = json.loads(line)
            ts = r["timestamp"] / 1000
            t_first = ts if t_first is None else t_first
            rel = ts - t_first
            if rel >= trace_t:
                break
            b = next(b for b in reversed(bounds) if rel >= b[0])
            at = b[1] + (rel - b[0]) / b[2]
            tokens: list[int] = []
            for h in r["hash_ids"]:
                tokens += [VOCAB_LO + _mix64(h * 4096 + j) % (VOCAB_HI - VOCAB_LO) for j in range(block)]
            n = max(1, min(len(tokens), math.ceil(r["input_length"] / ratio), 2048))
            reqs.append(Req(at, tokens[:n], max(1, min(64, round(r["output_length"] / 16)))))
    if tail:
        marks.append(("idle", replay_t, replay_t + tail))
    return Pattern(name, reqs, replay_t + tail, marks)


# --- the client --------------------------------------------------------------------------------


@dataclass
class Result:
    arrival: float
    ttft: float = math.nan
    latency: float = math.nan
    status: int = 0
    tokens: int = 0
    expected: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.tokens == self.expected


REQUEST_TIMEOUT_S = 300.0  # a request not answered in this long counts as an error (a cold scale-up is slower)


async def one_request(port: int, req: Req, model: str, timeout: float = REQUEST_TIMEOUT_S) -> Result:
    """One streamed request on its own connection; its connect and every read are bounded by
    ``timeout`` seconds in all."""
    res = Result(req.arrival, expected=req.max_tokens)
    try:
        async with asyncio.timeout(timeout):
            return await _one_request(port, req, model, res)
    except TimeoutError:
        res.error = f"no complete response within {timeout:g} s"
        return res


async def _one_request(port: int, req: Req, model: str, res: Result) -> Result:
    body = json.dumps({"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
                       "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        res.error = f"connect: {e}"
        return res
    try:
        writer.write(head + body)
        res.status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"transfer-encoding") and b"chunked" in line.lower():
                chunked = True
        data = b""
        if not chunked:
            data = await reader.read()
            res.error = data.decode(errors="replace")[:200] or f"status {res.status}"
            return res
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            if math.isnan(res.ttft):
                res.ttft = time.perf_counter() - t0
            data += chunk[:-2]
        res.latency = time.perf_counter() - t0
        for event in data.split(b"\n\n"):
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            obj = json.loads(event[6:])
            if "error" in obj:
                res.error = str(obj["error"])[:200]
            if obj.get("usage"):
                res.tokens = obj["usage"]["completion_tokens"]
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    return res


# --- the stack ---------------------------------------------------------------------------------


def children_of(pid: int) -> dict[int, bytes]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] == "Z":
                    continue
                kids.setdefault(int(fields[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    out: dict[int, bytes] = {}
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            try:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    out[c] = f.read()
            except OSError:
                continue
            todo.append(c)
    return out


def decode_processes(root: int) -> int:
    return sum(1 for cmd in children_of(root).values() if b"services.decode" in cmd)


@dataclass
class Sample:
    t: float
    processes: int
    registered: int
    waiting: int
    running: int
    inflight: int


@dataclass
class Run:
    pattern: str
    fleet: str
    results: list[Result]
    samples: list[Sample]
    decisions: list[dict]
    duration: float

    def worker_seconds(self, start: float = 0.0, end: float | None = None) -> float:
        end = self.duration if end is None else end
        ws = 0.0
        for a, b in pairwise(self.samples):
            lo, hi = max(a.t, start), min(b.t, end)
            if hi > lo:
                ws += a.processes * (hi - lo)
        return ws

    def summary(self, phases: list[tuple[str, float, float]] | None = None) -> dict:
        ok = [r for r in self.results if r.ok]
        ttft = sorted(r.ttft for r in ok)

        def q(p: float, xs: list[float] = ttft) -> float:
            return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3, 1) if xs else math.nan

        ws = self.worker_seconds()
        per_phase = []
        for i, (label, lo, hi) in enumerate(phases or []):
            last = i == len(phases or []) - 1
            rs = sorted(r.ttft for r in ok if lo <= r.arrival < hi)
            per_phase.append({"phase": label, "start": lo, "end": hi, "requests": len(rs), "ttft_p90_ms": q(0.9, rs),
                              "worker_seconds": round(self.worker_seconds(lo, self.duration if last else hi), 1)})
        return {
            "pattern": self.pattern, "fleet": self.fleet, "requests": len(self.results),
            "failed": len(self.results) - len(ok), "ttft_p50_ms": q(0.5), "ttft_p90_ms": q(0.9),
            "ttft_p99_ms": q(0.99), "worker_seconds": round(ws, 1), "duration_s": round(self.duration, 1),
            "peak_processes": max((s.processes for s in self.samples), default=0),
            "mean_processes": round(ws / self.duration, 2) if self.duration else 0,
            "decisions": len(self.decisions),
            "errors": sorted({r.error or f"status {r.status}" for r in self.results if not r.ok})[:5],
            "phases": per_phase,
        }


def start_stack(port: int, nats_port: int, logdir: Path, args: argparse.Namespace, fleet: str,
                profile: Path, fixed: int) -> subprocess.Popen:
    worker = f"--max-num-seqs {args.max_num_seqs}"
    common = ["--engine", "mocker", "--mocker-speedup", str(args.mocker_speedup), "--host", "127.0.0.1",
              "--port", str(port), "--nats-port", str(nats_port), "--prefill-workers", "0", "--log-dir", str(logdir),
              "--log-level", "info", "--router-mode", args.router_mode, "--planner-interval", str(args.interval),
              "--discovery-ttl", "3", "--data-dir", str(logdir / "nats")]
    if fleet == "fixed":
        extra = ["--decode-workers", str(fixed), "--planner-policy", "none", "--planner-args", worker]
    else:
        if args.policy == "sla":
            pol = (f"--profile {profile} --ttft-target-ms {args.ttft_target_ms} --itl-target-ms {args.itl_target_ms} "
                   f"--drain-window {args.drain_window}")
        else:
            pol = "--decode-queue-up 1 --decode-queue-down 0.2"
        damping = (f"--up-intervals {args.up_intervals} --down-intervals {args.down_intervals} "
                   f"--up-cooldown {args.up_cooldown} --down-cooldown {args.down_cooldown} --startup-grace 8")
        extra = ["--decode-workers", "1", "--min-decode-workers", "1", "--max-decode-workers", str(args.fleet),
                 "--planner-policy", args.policy, "--planner-args", f"{worker} {pol} {damping}"]
    log = open(logdir / "up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "baton", "up", *common, *extra], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while "Baton is ready" not in (logdir / "up.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((logdir / "up.log").read_text()[-3000:])
        time.sleep(0.2)
    return proc


async def drive(pattern: Pattern, fleet: str, port: int, nats_port: int, root: int, want: int,
                creds: Path) -> Run:
    # baton up's NATS has authentication on: watch the planner as its operator (admin) identity.
    bus = await Bus.connect(f"nats://127.0.0.1:{nats_port}", "planner-bench",
                            security=NatsSecurity(creds_file=str(creds)))
    nc = bus.nc
    last: list[PlannerObservation] = []
    decisions: list[dict] = []
    t_start = [math.inf]

    async def on_obs(msg) -> None:
        last[:] = [planner_observation_decoder.decode(msg.data)]

    async def on_decision(msg) -> None:
        d = decision_decoder.decode(msg.data)
        decisions.append({"t": round(time.time() - t_start[0], 2), "role": d.role, "before": d.before,
                          "after": d.after, "reason": d.reason, "dry_run": d.dry_run})

    await nc.subscribe(subjects.PLANNER_OBSERVATIONS, cb=on_obs)
    await nc.subscribe(subjects.PLANNER_DECISIONS, cb=on_decision)
    # Steady start: the fleet registered, the router warm.
    deadline = time.monotonic() + 60
    while not (last and last[0].decode_workers == want):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{want} decode workers never registered")
        await asyncio.sleep(0.2)
    await one_request(port, Req(0, list(range(100, 140)), 4), "baton-tiny")

    loop = asyncio.get_running_loop()
    t0 = loop.time() + 1.0
    t_start[0] = time.time() + 1.0
    samples: list[Sample] = []
    inflight = [0]
    done = asyncio.Event()

    async def sampler() -> None:
        while True:
            t = loop.time() - t0
            o = last[0] if last else PlannerObservation(timestamp=0)
            samples.append(Sample(round(t, 2), decode_processes(root), o.decode_workers, o.decode_waiting,
                                  o.decode_running, inflight[0]))
            if done.is_set() and t >= pattern.duration:
                return
            await asyncio.sleep(0.5)

    async def fire(req: Req) -> Result:
        await asyncio.sleep(max(0.0, t0 + req.arrival - loop.time()))
        inflight[0] += 1
        try:
            return await one_request(port, req, "baton-tiny")
        finally:
            inflight[0] -= 1

    samp = asyncio.ensure_future(sampler())
    results = await asyncio.gather(*(fire(r) for r in pattern.requests))
    done.set()
    await samp
    await nc.close()
    end = max(pattern.duration, max((r.arrival + r.latency for r in results if r.latency == r.latency), default=0))
    return Run(pattern.name, fleet, list(results), samples, decisions, end)


def run_one(pattern: Pattern, fleet: str, args: argparse.Namespace, profile: Path, keep: Path,
            fixed: int = 0) -> Run:
    port, nats_port = free_port(), free_port()
    logdir = keep / f"{pattern.name}-{fleet}"
    logdir.mkdir(parents=True, exist_ok=True)
    proc = start_stack(port, nats_port, logdir, args, fleet, profile, fixed)
    try:
        want = fixed if fleet == "fixed" else 1
        run = asyncio.run(drive(pattern, fleet, port, nats_port, proc.pid, want,
                                creds_path(logdir / "nats" / "auth", "admin")))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    s = run.summary(pattern.phases)
    print(f"{pattern.name:6} {fleet:8} requests {s['requests']:4}  failed {s['failed']}  ttft p50 {s['ttft_p50_ms']:8.1f}"
          f"  p90 {s['ttft_p90_ms']:8.1f}  p99 {s['ttft_p99_ms']:8.1f} ms  worker-s {s['worker_seconds']:7.1f}"
          f"  peak {s['peak_processes']}  decisions {s['decisions']}", flush=True)
    return run


# --- outputs -----------------------------------------------------------------------------------


def windows(run: Run, width: float) -> list[tuple[float, float, float]]:
    """(window start, arrivals/s, p90 TTFT ms of requests arriving in it) per ``width`` seconds."""
    out = []
    n = math.ceil(run.duration / width)
    for i in range(n):
        lo, hi = i * width, (i + 1) * width
        rs = [r for r in run.results if lo <= r.arrival < hi]
        ttft = sorted(r.ttft for r in rs if r.ok)
        p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] * 1e3 if ttft else math.nan
        out.append((lo, len(rs) / width, p90))
    return out


def write_csv(path: Path, runs: list[Run], width: float) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fleet", "kind", "t", "decode_processes", "registered", "waiting", "running", "client_inflight",
                    "arrivals_per_s", "ttft_p90_ms"])
        for run in runs:
            for s in run.samples:
                w.writerow([run.fleet, "sample", s.t, s.processes, s.registered, s.waiting, s.running, s.inflight,
                            "", ""])
            for lo, rate, p90 in windows(run, width):
                w.writerow([run.fleet, "window", lo, "", "", "", "", "", round(rate, 3),
                            "" if math.isnan(p90) else round(p90, 1)])


def plot(path: Path, pattern: Pattern, runs: list[Run], width: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"planner": "tab:blue", "fixed": "tab:gray"}
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    ax_rate, ax_queue, ax_rep, ax_ttft = axes
    w0 = windows(runs[0], width)
    ax_rate.step([x for x, _, _ in w0], [r for _, r, _ in w0], where="post", color="black")
    ax_rate.set_ylabel("arrivals/s")
    for run in runs:
        c = colors.get(run.fleet, None)
        ts = [s.t for s in run.samples]
        ax_queue.plot(ts, [s.waiting for s in run.samples], color=c, label=f"{run.fleet}: waiting in workers")
        ax_queue.plot(ts, [s.inflight for s in run.samples], color=c, ls=":", label=f"{run.fleet}: in flight (client)")
        ax_rep.step(ts, [s.processes for s in run.samples], where="post", color=c, label=f"{run.fleet}: processes")
        if run.fleet == "planner":
            ax_rep.step(ts, [s.registered for s in run.samples], where="post", color=c, ls="--", alpha=0.6,
                        label="planner: registered")
        ws = windows(run, width)
        ax_ttft.step([x for x, _, _ in ws], [p for _, _, p in ws], where="post", color=c, label=run.fleet)
    for ax in axes:
        for label, lo, hi in pattern.phases:
            if label in ("spike", "trace"):
                ax.axvspan(lo, hi, color="orange", alpha=0.08)
    ax_queue.set_ylabel("queue depth (requests)")
    ax_queue.legend(fontsize=8, loc="upper right")
    ax_rep.set_ylabel("decode workers")
    ax_rep.legend(fontsize=8, loc="upper right")
    ax_ttft.set_ylabel(f"p90 TTFT per {width:.0f}s (ms)")
    ax_ttft.set_yscale("log")
    ax_ttft.legend(fontsize=8, loc="upper right")
    ax_ttft.set_xlabel("seconds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(x):
    """NaN (no request in a window) as null: strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patterns", nargs="+", default=["spike", "trace", "trace-swing"],
                    choices=["spike", "trace", "trace-swing"])
    ap.add_argument("--policy", default="sla", choices=["sla", "load"])
    ap.add_argument("--fleet", type=int, default=4, help="the planner's maximum decode workers")
    ap.add_argument("--fixed", type=int, default=0, help="fixed fleet size (0: the planner's peak on the pattern)")
    ap.add_argument("--mocker-speedup", type=float, default=0.05)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--router-mode", default="kv")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--quiet-rate", type=float, default=0.7)
    ap.add_argument("--spike-rate", type=float, default=5.5)
    ap.add_argument("--phases", type=float, nargs=3, default=[50.0, 45.0, 55.0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--trace-start", type=int, default=3000)
    ap.add_argument("--trace-seconds", type=float, default=90.0, help="replay length after compression")
    ap.add_argument("--trace-speed", type=float, default=1.5, help="trace time / replay time")
    ap.add_argument("--trace-tail", type=float, default=30.0)
    ap.add_argument("--swing-speeds", type=float, nargs=2, default=[0.25, 1.5],
                    help="trace-swing: compression in the quiet phases and in the spike (--phases long)")
    ap.add_argument("--ttft-target-ms", type=float, default=700.0)
    ap.add_argument("--itl-target-ms", type=float, default=150.0)
    ap.add_argument("--drain-window", type=float, default=8.0)
    ap.add_argument("--up-intervals", type=int, default=2)
    ap.add_argument("--down-intervals", type=int, default=5)
    ap.add_argument("--up-cooldown", type=float, default=3.0)
    ap.add_argument("--down-cooldown", type=float, default=6.0)
    ap.add_argument("--window", type=float, default=5.0, help="seconds per p90 TTFT window in the plot")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--reprofile", action="store_true", help="measure the profile again even if one is there")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    keep = Path(tempfile.mkdtemp(prefix="baton-planner-bench-"))
    print(f"logs in {keep}", flush=True)
    profile = args.out / "planner-profile.json"
    if args.reprofile or not profile.exists():
        cmd = [sys.executable, "-m", "baton", "profile", "--engine", "mocker", "--mocker-speedup",
               str(args.mocker_speedup), "--max-num-seqs", str(args.max_num_seqs), "--isl", "64,256,1024",
               "--concurrency", "1,2,4,8,16", "--decode-isl", "256", "--osl", "32", "-o", str(profile)]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)

    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "command": " ".join(sys.argv), "runs": {}}
    out_json = args.out / "planner-bench.json"
    if out_json.exists():  # keep other patterns' results when re-running one
        old = json.loads(out_json.read_text())
        report["runs"] = {k: v for k, v in old.get("runs", {}).items() if k not in args.patterns}
    for name in args.patterns:
        if name == "spike":
            pat = spike_pattern(args.quiet_rate, args.spike_rate, tuple(args.phases), args.seed)
            title = (f"quiet {args.quiet_rate:g}/s - spike {args.spike_rate:g}/s - quiet; mocker x{args.mocker_speedup:g},"
                     f" {args.policy} planner (1..{args.fleet}) vs a fixed fleet of its peak size")
        elif name == "trace":
            pat = trace_pattern(args.trace, args.trace_start, [("trace", args.trace_seconds, args.trace_speed)],
                                args.trace_tail)
            title = (f"Mooncake trace rows {args.trace_start}.., {args.trace_speed:g}x compressed, then idle; "
                     f"{args.policy} planner (1..{args.fleet}) vs a fixed fleet of its peak size")
        else:
            q, sp = args.swing_speeds
            pat = trace_pattern(args.trace, args.trace_start, [("quiet", args.phases[0], q), ("spike", args.phases[1], sp),
                                                               ("quiet", args.phases[2], q)], name="trace-swing")
            title = (f"Mooncake trace rows {args.trace_start}.., real arrivals compressed {q:g}x / {sp:g}x / {q:g}x; "
                     f"{args.policy} planner (1..{args.fleet}) vs a fixed fleet of its peak size")
        print(f"{name}: {len(pat.requests)} requests over {pat.duration:.0f}s", flush=True)
        planner = run_one(pat, "planner", args, profile, keep)
        # The fixed fleet: the size the planner needed at its peak (or --fixed).
        fixed_n = args.fixed or max(1, planner.summary()["peak_processes"])
        runs = [planner, run_one(pat, "fixed", args, profile, keep, fixed_n)]
        sp, sf = runs[0].summary(pat.phases), runs[1].summary(pat.phases)
        ratio_ws = sp["worker_seconds"] / sf["worker_seconds"] if sf["worker_seconds"] else math.nan
        ratio_ttft = sp["ttft_p90_ms"] / sf["ttft_p90_ms"] if sf["ttft_p90_ms"] else math.nan
        verdict = {"worker_seconds_ratio": round(ratio_ws, 3), "ttft_p90_ratio": round(ratio_ttft, 3),
                   "goal_met": bool(ratio_ws <= 0.6 and ratio_ttft <= 1.5 and sp["failed"] == 0 and sf["failed"] == 0)}
        print(f"{name}: planner/fixed worker-seconds {ratio_ws:.2f}, p90 TTFT {ratio_ttft:.2f}x -> "
              f"{'goal met' if verdict['goal_met'] else 'goal NOT met'}", flush=True)
        report["runs"][name] = {"command": " ".join(["python", *sys.argv]), "planner": sp, "fixed": sf,
                                "fixed_size": fixed_n, **verdict,
                                "decisions": runs[0].decisions,
                                "phases": pat.phases}
        write_csv(args.out / f"planner-{name}.csv", runs, args.window)
        out_json.write_text(json.dumps(_finite(report), indent=2) + "\n")  # before the plot: it needs matplotlib
        try:
            plot(args.out / f"planner-{name}.png", pat, runs, args.window, title)
        except ImportError as e:
            print(f"{name}: no plot ({e}); the figures are in {out_json}", flush=True)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("decisions", "phases")}
                      for k, v in report["runs"].items()}, indent=2))


if __name__ == "__main__":
    main()
