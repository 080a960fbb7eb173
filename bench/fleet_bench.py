"""Fleet scale: what the frontends, routers and NATS cost per request as the worker count grows.

The stack, all real processes on this machine: one nats-server (JetStream, monitoring port on for
/varz), 2 routers (``--mode kv``, queue group), 2 frontends, and ONE decode process hosting N
simulated workers (``python -m services.decode --engine mocker --replicas N``, services/decode/
fleet.py: each replica a full worker on the bus, with its own id, registration, load reports and
KV events; they share one NATS connection).

Workload: the Mooncake conversation trace (/work/shared/traces/conversation_trace.jsonl), scaled
as bench/router_trace.py does (each 512-token hash block becomes a deterministic run of 16 token
ids, so prefixes are shared as in the trace), a slice of ``--requests`` rows compressed in time to
a mean ``--rate`` requests/s, output capped at ``--output-cap`` tokens. The driver (this process)
sends each row at its arrival time as a /v1/completions request with token-id prompts, alternating
between the two frontends (open loop: a slow stack does not slow the arrivals).

Per point (N, rate), after all N workers are visible to both frontends:
  idle window   ``--idle`` s with no requests: background CPU/s per component and background NATS
                traffic (discovery heartbeats, load reports: these grow with N, not with rate);
  load window   from the first request to the last reply: CPU seconds per request per component
                (psutil, user+system, per process), NATS messages per request (/varz in_msgs and
                out_msgs deltas), both raw and net of the idle background over the same time;
                router decision p99 (the routers' baton_router_decision_seconds histogram, merged,
                p99 interpolated within its buckets), discovery ($KV.baton_workers.>), KV-event
                (baton.kv.events.>) and load-report (baton.load.>) traffic in messages/s and bytes/s,
                counted by a subscriber of the driver's (its own deliveries are taken off out_msgs);
                latency p50/p99, errors (non-200 or no answer in 60 s), achieved throughput, and each
                process's CPU utilisation (cores), the first to near one core being the bottleneck.

Each point runs ``--repeats`` times, each on a fresh stack; the summary is the median with min..max.

    python bench/fleet_bench.py --workers 16 64 256 --rates 25 50 100 --repeats 3 --json /tmp/fleet.json
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
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import httpx
import nats
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/fleet_bench.py` from anywhere

from baton.nats_server import EmbeddedNats, free_port
from bench.router_trace import load_trace
from shared import subjects

ROOT = Path(__file__).resolve().parents[1]
TRACE = Path("/work/shared/traces/conversation_trace.jsonl")
COMPONENTS = ("frontend", "router", "worker_host", "nats_server", "driver")
SUBJECT_GROUPS = {
    "discovery": f"$KV.{subjects.WORKERS_BUCKET}.>",
    "kv_events": subjects.kv_events("*"),
    "load_reports": subjects.load("*"),
}


@dataclass
class Point:
    workers: int
    rate: float
    repeat: int
    routers: int = 2
    requests: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # "HTTP 503", "ReadTimeout", ...
    duration_s: float = 0.0
    throughput: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    startup_s: float = 0.0
    worker_host_rss_mb: float = 0.0
    # Per component: CPU seconds per request in the load window (raw, and net of idle background).
    cpu_ms_per_req: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_req_net: dict[str, float] = field(default_factory=dict)
    cpu_util_load: dict[str, float] = field(default_factory=dict)  # cores busy during the load window
    cpu_util_idle: dict[str, float] = field(default_factory=dict)  # cores busy with no requests
    nats_msgs_per_req: float = 0.0  # (in + out) / request, net of idle background
    nats_msgs_per_req_raw: float = 0.0
    nats_in_per_req: float = 0.0
    nats_out_per_req: float = 0.0
    nats_bytes_per_req: float = 0.0
    nats_idle_msgs_per_s: float = 0.0
    nats_idle_bytes_per_s: float = 0.0
    subject_msgs_per_s: dict[str, float] = field(default_factory=dict)   # load window
    subject_bytes_per_s: dict[str, float] = field(default_factory=dict)
    subject_idle_msgs_per_s: dict[str, float] = field(default_factory=dict)
    router_decision_p99_us: float = float("nan")
    router_decisions: int = 0
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)


# --- processes ---------------------------------------------------------------------------------


class Proc:
    def __init__(self, component: str, module: str, args: list[str], log: Path) -> None:
        self.component = component
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True, cwd=ROOT)
        self.ps = psutil.Process(self.popen.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def cpu_s(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def varz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as r:
        return json.loads(r.read())


def decision_buckets(port: int) -> dict[float, float]:
    """Cumulative counts of baton_router_decision_seconds by upper bound (le)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("baton_router_decision_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
    return out


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float:
    """As Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]] if bounds else 0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for upper in bounds:
        count = cumulative[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def frontend_workers(port: int) -> int:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        return int(r.json().get("decode_workers", 0)) if r.status_code == 200 else 0
    except (httpx.HTTPError, ValueError):
        return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- one point ---------------------------------------------------------------------------------


class SubjectCounter:
    def __init__(self) -> None:
        self.msgs = dict.fromkeys(SUBJECT_GROUPS, 0)
        self.bytes = dict.fromkeys(SUBJECT_GROUPS, 0)

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        return dict(self.msgs), dict(self.bytes)

    @property
    def total(self) -> int:
        return sum(self.msgs.values())


async def measure(args: argparse.Namespace, workers: int, rate: float, repeat: int, workdir: Path) -> Point:
    point = Point(workers, rate, repeat, args.routers)
    monitor = free_port()
    server = EmbeddedNats(data_dir=workdir / "nats", log_file=workdir / "nats.log", extra_args=["-m", str(monitor)])
    server.start()
    procs: list[Proc] = []
    try:
        common = ["--nats-url", server.url, "--discovery-ttl", str(args.discovery_ttl), "--log-level", "warning"]
        t_start = time.monotonic()
        host = Proc("worker_host", "services.decode",
                    [*common, "--engine", "mocker", "--replicas", str(workers), "--worker-id", "sim", "--no-disagg",
                     "--mocker-speedup", str(args.speedup), "--block-size", "16"], workdir / "decode.log")
        procs.append(host)
        router_ports = [free_port() for _ in range(args.routers)]
        for i, p in enumerate(router_ports):
            procs.append(Proc("router", "services.router", [*common, "--mode", "kv", "--metrics-port", str(p)],
                              workdir / f"router-{i}.log"))
        fe_ports = [free_port() for _ in range(2)]
        for i, p in enumerate(fe_ports):
            procs.append(Proc("frontend", "services.frontend",
                              [*common, "--host", "127.0.0.1", "--port", str(p)], workdir / f"frontend-{i}.log"))
        deadline = time.monotonic() + args.ready_timeout
        while not all(frontend_workers(p) == workers for p in fe_ports):
            for pr in procs:
                if pr.popen.poll() is not None:
                    raise RuntimeError(f"{pr.component} exited early; see {workdir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{workers} workers not visible to both frontends in {args.ready_timeout}s")
            await anyio.sleep(0.2)
        point.startup_s = time.monotonic() - t_start
        nats_ps = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
        me = psutil.Process()

        def cpu_by_component() -> dict[str, float]:
            out = dict.fromkeys(COMPONENTS, 0.0)
            for pr in procs:
                out[pr.component] += cpu_s(pr.ps)
            out["nats_server"] = cpu_s(nats_ps)
            out["driver"] = cpu_s(me)
            return out

        counter = SubjectCounter()
        nc = await nats.connect(server.url, name="fleet-bench-counter")
        for group, subject in SUBJECT_GROUPS.items():
            async def count(msg, group: str = group) -> None:
                counter.msgs[group] += 1
                counter.bytes[group] += len(msg.data) + len(msg.subject)
            await nc.subscribe(subject, cb=count)
        await nc.flush()
        try:
            await anyio.sleep(1.0)  # settle: first load reports and KV watches after startup
            # --- idle window
            c0, v0, s0, t0 = cpu_by_component(), varz(monitor), counter.snapshot(), time.monotonic()
            await anyio.sleep(args.idle)
            c1, v1, s1, t1 = cpu_by_component(), varz(monitor), counter.snapshot(), time.monotonic()
            idle = t1 - t0
            idle_cpu = {k: (c1[k] - c0[k]) / idle for k in COMPONENTS}
            point.cpu_util_idle = {k: round(v, 4) for k, v in idle_cpu.items()}
            own_idle = sum(s1[0].values()) - sum(s0[0].values())
            idle_msgs = (v1["in_msgs"] - v0["in_msgs"]) + (v1["out_msgs"] - v0["out_msgs"]) - own_idle
            point.nats_idle_msgs_per_s = idle_msgs / idle
            point.nats_idle_bytes_per_s = ((v1["in_bytes"] - v0["in_bytes"]) + (v1["out_bytes"] - v0["out_bytes"])) / idle
            point.subject_idle_msgs_per_s = {g: (s1[0][g] - s0[0][g]) / idle for g in SUBJECT_GROUPS}

            # --- load window
            reqs = load_trace(TRACE, args.start, args.requests, 16, rate, args.output_cap)
            buckets0 = [decision_buckets(p) for p in router_ports]
            c0, v0, s0 = cpu_by_component(), varz(monitor), counter.snapshot()
            latencies: list[float] = []
            errors = 0
            error_kinds: dict[str, int] = {}
            t0 = time.monotonic()
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                async def one(i: int) -> None:
                    nonlocal errors
                    r = reqs[i]
                    await anyio.sleep(max(0.0, t0 + r.arrival - time.monotonic()))
                    sent = time.monotonic()
                    try:
                        resp = await client.post(
                            f"http://127.0.0.1:{fe_ports[i % 2]}/v1/completions",
                            json={"model": "baton-tiny", "prompt": r.tokens, "max_tokens": r.output_tokens,
                                  "ignore_eos": True})
                        if resp.status_code == 200:
                            latencies.append(time.monotonic() - sent)
                            return
                        kind = f"HTTP {resp.status_code}"
                    except httpx.HTTPError as e:
                        kind = type(e).__name__
                    errors += 1
                    error_kinds[kind] = error_kinds.get(kind, 0) + 1

                async with anyio.create_task_group() as tg:
                    for i in range(len(reqs)):
                        tg.start_soon(one, i)
            t1 = time.monotonic()
            c1, v1, s1 = cpu_by_component(), varz(monitor), counter.snapshot()
            buckets1 = [decision_buckets(p) for p in router_ports]
        finally:
            await nc.close()
        dur = t1 - t0
        n = len(reqs)
        point.requests, point.ok, point.errors, point.duration_s = n, len(latencies), errors, dur
        point.error_kinds = error_kinds
        point.throughput = len(latencies) / dur
        point.latency_p50_ms = percentile(latencies, 0.5) * 1e3
        point.latency_p99_ms = percentile(latencies, 0.99) * 1e3
        done = max(1, len(latencies))
        point.cpu_ms_per_req = {k: (c1[k] - c0[k]) / done * 1e3 for k in COMPONENTS}
        point.cpu_ms_per_req_net = {k: max(0.0, c1[k] - c0[k] - idle_cpu[k] * dur) / done * 1e3 for k in COMPONENTS}
        point.cpu_util_load = {k: round((c1[k] - c0[k]) / dur, 4) for k in COMPONENTS}
        own = sum(s1[0].values()) - sum(s0[0].values())
        d_in = v1["in_msgs"] - v0["in_msgs"]
        d_out = v1["out_msgs"] - v0["out_msgs"] - own
        point.nats_msgs_per_req_raw = (d_in + d_out) / done
        point.nats_msgs_per_req = max(0.0, d_in + d_out - point.nats_idle_msgs_per_s * dur) / done
        point.nats_in_per_req, point.nats_out_per_req = d_in / done, d_out / done
        point.nats_bytes_per_req = ((v1["in_bytes"] - v0["in_bytes"]) + (v1["out_bytes"] - v0["out_bytes"])) / done
        point.subject_msgs_per_s = {g: (s1[0][g] - s0[0][g]) / dur for g in SUBJECT_GROUPS}
        point.subject_bytes_per_s = {g: (s1[1][g] - s0[1][g]) / dur for g in SUBJECT_GROUPS}
        merged = {le: sum(b1.get(le, 0) - b0.get(le, 0) for b0, b1 in zip(buckets0, buckets1, strict=True))
                  for le in buckets1[0]}
        point.router_decisions = int(merged.get(float("inf"), 0))
        point.router_decision_p99_us = histogram_quantile(0.99, merged) * 1e6
        point.worker_host_rss_mb = host.ps.memory_info().rss / 2**20
        point.load_avg = os.getloadavg()
        return point
    finally:
        for pr in reversed(procs):
            pr.stop()
        server.cleanup()


# --- summary -----------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "n/a"
    med = statistics.median(vals)
    return f"{fmt.format(med)} ({fmt.format(min(vals))}..{fmt.format(max(vals))})" if len(vals) > 1 else fmt.format(med)


def summarize(points: list[Point]) -> str:
    rows = ["| workers | rate (req/s) | done/s | errors | frontend ms/req | router ms/req | worker host ms/req "
            "| nats-server ms/req | NATS msgs/req | router p99 µs | idle NATS msgs/s | discovery msgs/s "
            "| KV events msgs/s (KB/s) | load reports msgs/s | busiest (cores) | startup s | host RSS MB | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(p.workers, p.rate, p.routers) for p in points})
    for w, r, k in keys:
        ps = [p for p in points if (p.workers, p.rate, p.routers) == (w, r, k)]

        def col(f, fmt: str = "{:.2f}", ps=ps) -> str:
            return spread([f(p) for p in ps], fmt)

        busiest = max(COMPONENTS[:4], key=lambda k: statistics.median(p.cpu_util_load[k] for p in ps))
        rows.append(
            f"| {w}{'' if k == 2 else f' ({k} routers)'} | {r:g} | {col(lambda p: p.throughput, '{:.1f}')} | {sum(p.errors for p in ps)} "
            f"| {col(lambda p: p.cpu_ms_per_req['frontend'])} | {col(lambda p: p.cpu_ms_per_req['router'])} "
            f"| {col(lambda p: p.cpu_ms_per_req['worker_host'])} | {col(lambda p: p.cpu_ms_per_req['nats_server'])} "
            f"| {col(lambda p: p.nats_msgs_per_req, '{:.1f}')} | {col(lambda p: p.router_decision_p99_us, '{:.0f}')} "
            f"| {col(lambda p: p.nats_idle_msgs_per_s, '{:.0f}')} "
            f"| {col(lambda p: p.subject_msgs_per_s['discovery'], '{:.1f}')} "
            f"| {col(lambda p: p.subject_msgs_per_s['kv_events'], '{:.0f}')} "
            f"({col(lambda p: p.subject_bytes_per_s['kv_events'] / 1024, '{:.0f}')}) "
            f"| {col(lambda p: p.subject_msgs_per_s['load_reports'], '{:.0f}')} "
            f"| {busiest} {col(lambda p, b=busiest: p.cpu_util_load[b])} "
            f"| {col(lambda p: p.startup_s, '{:.1f}')} | {col(lambda p: p.worker_host_rss_mb, '{:.0f}')} "
            f"| {spread([p.load_avg[0] for p in ps])} |")
    return "\n".join(rows)


# --- the scaling law ---------------------------------------------------------------------------

PLOTTED = ("frontend", "router", "nats_server", "worker_host")
LABELS = {"frontend": "frontends (2)", "router": "routers (2)", "nats_server": "nats-server",
          "worker_host": "worker host (simulated)"}


FIT_MAX_RATE = 100.0  # above it this box's CPUs, shared with other jobs, were the limit (see the table)


def fitted(points: list[Point]) -> list[Point]:
    return [p for p in points if p.routers == 2 and p.ok and not p.errors and p.rate <= FIT_MAX_RATE]


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def scaling_law(points: list[Point], fleet: int = 1000, rate: float = 10_000) -> str:
    """Per component: CPU per request = a + b*N (net of background), background cores = c*N; fitted on
    the two-router points below the box's saturation, then extrapolated to ``fleet`` workers at ``rate``."""
    pts = fitted(points)
    lines = [f"fit on {len(pts)} runs (2 routers, offered <= {FIT_MAX_RATE:g} req/s, no errors)",
             f"| component | CPU ms/request = a + b·N | background cores = c·N | at N={fleet}, {rate:g} req/s: cores |",
             "|---|---|---|---|"]
    for comp in PLOTTED[:3]:
        a, b = linear_fit([p.workers for p in pts], [p.cpu_ms_per_req_net[comp] for p in pts])
        _, c = linear_fit([p.workers for p in pts], [p.cpu_util_idle[comp] for p in pts])
        cores = (a + b * fleet) * rate / 1e3 + c * fleet
        lines.append(f"| {comp} | {a:.2f} + {b * 1e3:.2f}e-3·N | {c * 1e3:.3f}e-3·N | {cores:.0f} |")
    a, b = linear_fit([p.workers for p in pts], [p.nats_msgs_per_req for p in pts])
    _, c = linear_fit([p.workers for p in pts], [p.nats_idle_msgs_per_s for p in pts])
    lines.append(f"\nNATS messages/request = {a:.1f} + {b * 1e3:.2f}e-3·N; background messages/s = {c:.2f}·N; "
                 f"at N={fleet}, {rate:g} req/s: {(a + b * fleet) * rate + c * fleet:,.0f} messages/s")
    p99 = [p for p in pts if p.router_decision_p99_us == p.router_decision_p99_us]
    a, b = linear_fit([p.workers for p in p99], [p.router_decision_p99_us for p in p99])
    lines.append(f"router decision p99 = {a:.0f} + {b:.2f}·N µs; at N={fleet}: {a + b * fleet:.0f} µs")
    return "\n".join(lines)


def plot_svg(points: list[Point], width: int = 640, height: int = 400) -> str:
    """Workers (log axis) against CPU ms per request per component: median and min..max over the
    fitted runs (2 routers, every offered rate up to FIT_MAX_RATE). Written by hand: no plotting library in the project."""
    pts = fitted(points)
    ns = sorted({p.workers for p in pts})
    colours = {"frontend": "#1f77b4", "router": "#d62728", "nats_server": "#2ca02c", "worker_host": "#7f7f7f"}
    left, right, top, bottom = 60, 190, 30, 50
    series = {c: [(n, [p.cpu_ms_per_req[c] for p in pts if p.workers == n]) for n in ns] for c in PLOTTED}
    ymax = max(max(v) for s in series.values() for _, v in s if v) * 1.15
    import math

    def x(n: float) -> float:
        lo, hi = math.log(ns[0]), math.log(ns[-1])
        return left + (math.log(n) - lo) / ((hi - lo) or 1) * (width - left - right)

    def y(v: float) -> float:
        return height - bottom - v / ymax * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13">CPU per request by component vs simulated workers '
           '(median, min..max)</text>',
           f'<line x1="{left}" y1="{y(0)}" x2="{width - right}" y2="{y(0)}" stroke="black"/>',
           f'<line x1="{left}" y1="{y(0)}" x2="{left}" y2="{top}" stroke="black"/>',
           f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">workers (log scale)</text>',
           f'<text x="16" y="{(top + height - bottom) / 2}" transform="rotate(-90 16 {(top + height - bottom) / 2})" '
           'text-anchor="middle">CPU ms per request</text>']
    for n in ns:
        out.append(f'<text x="{x(n):.1f}" y="{y(0) + 16}" text-anchor="middle">{n}</text>')
    step = 0.5 if ymax < 4 else 1.0
    v = 0.0
    while v <= ymax:
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" stroke="#eee"/>')
        v += step
    for i, comp in enumerate(PLOTTED):
        colour = colours[comp]
        meds = [(n, statistics.median(vals)) for n, vals in series[comp] if vals]
        path = " ".join(f"{x(n):.1f},{y(m):.1f}" for n, m in meds)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for n, vals in series[comp]:
            if vals:
                out.append(f'<line x1="{x(n):.1f}" y1="{y(min(vals)):.1f}" x2="{x(n):.1f}" y2="{y(max(vals)):.1f}" '
                           f'stroke="{colour}"/>')
                out.append(f'<circle cx="{x(n):.1f}" cy="{y(statistics.median(vals)):.1f}" r="3" fill="{colour}"/>')
        ly = top + 20 + 20 * i
        out.append(f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" y2="{ly}" stroke="{colour}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{width - right + 38}" y="{ly + 4}">{LABELS[comp]}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--rates", type=float, nargs="+", default=[25, 50, 100])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=400, help="trace rows per point")
    ap.add_argument("--start", type=int, default=1000, help="first trace row")
    ap.add_argument("--output-cap", type=int, default=16)
    ap.add_argument("--speedup", type=float, default=10.0, help="mocker speedup (simulated step time / this)")
    ap.add_argument("--idle", type=float, default=4.0, help="seconds of the idle window")
    ap.add_argument("--discovery-ttl", type=float, default=10.0)
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--routers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report", type=Path, nargs="+", default=None,
                    help="no runs: summarize these --json files (table, fits, extrapolation)")
    ap.add_argument("--svg", type=Path, default=None, help="with --report: write the plot here")
    args = ap.parse_args()
    if args.report:
        points = [Point(**{**p, "load_avg": tuple(p["load_avg"])}) for f in args.report
                  for p in json.loads(f.read_text())["points"]]
        print(summarize(points))
        print()
        print(scaling_law(points))
        if args.svg:
            args.svg.write_text(plot_svg(points))
        return
    os.environ.setdefault("BATON_CACHE_DIR", str(Path(tempfile.gettempdir()) / "baton-fleet-bench-cache"))
    from shared.builtin_model import ensure_builtin

    ensure_builtin("baton-tiny")
    points: list[Point] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for repeat in range(args.repeats):
        for workers in args.workers:
            for rate in args.rates:
                with tempfile.TemporaryDirectory(prefix="fleet-bench-") as d:
                    p = anyio.run(measure, args, workers, rate, repeat, Path(d), backend_options={"use_uvloop": True})
                points.append(p)
                print(f"N={workers} rate={rate:g} #{repeat}: {p.ok}/{p.requests} ok, {p.errors} errors, "
                      f"{p.throughput:.1f}/s, cpu ms/req {({k: round(v, 2) for k, v in p.cpu_ms_per_req.items()})}, "
                      f"NATS msgs/req {p.nats_msgs_per_req:.1f}, router p99 {p.router_decision_p99_us:.0f} µs, "
                      f"util {p.cpu_util_load}, startup {p.startup_s:.1f}s, load avg {p.load_avg[0]:.2f}",
                      flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"started": started, "args": {k: str(v) for k, v in
                                                                                  vars(args).items()},
                                                     "points": [asdict(x) for x in points]}, indent=1))
    print(f"\nstarted {started}; {' '.join(sys.argv)}\n")
    print(summarize(points))


if __name__ == "__main__":
    main()
