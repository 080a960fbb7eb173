"""The stack's own overhead: Baton (router service, embedded router) and NVIDIA Dynamo, near-free engines.

Sides, all up at once and driven in turn (interleaved cell by cell, the order rotating each repeat,
so noise from other jobs lands on every side alike):

- ``service``: ``baton up --engine mocker --mocker-speedup 1e9 --prefill-workers 0`` (embedded
  nats-server, frontend, router service, one decode worker, planner);
- ``embedded``: the same with ``--router embedded`` (the router runs in the frontend; no router process);
- ``dynamo`` (with ``--dynamo-venv``): Dynamo's frontend and mocker (``--speedup-ratio 1e9``; in 1.6.1
  ``0`` still simulates ~7 ms a token) from a
  throwaway venv, with file discovery, the TCP request plane and the ZMQ event plane (no etcd, no
  NATS), round-robin routing like Baton's default. Same tokenizer files (the baton-tiny model dir).
- ``floor`` (only when named in ``--sides``): the transport floor of Baton's shape,
  ``bench/nats_floor.py``: a plain nats-server, an HTTP front and a worker that only relay (no
  validation, tokenizer, routing, engine or detokenizer), so the gap between it and Baton is
  Baton's own work per request.

Each cell: /v1/completions, 16-token completions (``ignore_eos``), non-streamed and streamed, from
one lean keep-alive client (bench/loadgen.py) on this machine, which acknowledges every segment at
once (``TCP_QUICKACK``; ``--delayed-ack`` for the delayed ACKs of most clients, against which a
server that leaves Nagle on, as Dynamo 1.6.1's frontend does, stalls each streamed response ~40
ms), in one of two modes:

- closed loop (the default): concurrency 1, 16 and 64, each connection sending back to back, so
  every stack runs at saturation;
- open loop (``--mode open``): requests offered at fixed rates (``--rates``; Poisson arrivals, the
  same seeded schedule for every side, or ``--arrivals uniform``), each on a free keep-alive
  connection from a pool that grows as needed (up to ``--max-connections``), so latency is seen
  below saturation as well as at it.

Per cell: req/s (achieved), latency and time to the first body chunk (TTFT) p50 (and p90 in the
open loop), errors, and CPU per request of every process of the side (psutil user+system time over
the cell divided by the responses in it), by role and summed, and the load generator's own CPU per
request (open loop: with the requests it sent more than 1 ms behind schedule), and the share of the
machine's CPU time the hypervisor stole during the cell (``steal_pct``). Median and min-max
over the repeats.

    python bench/overhead.py                                # Baton only, both router placements
    python bench/overhead.py --dynamo-venv /tmp/dynvenv     # and Dynamo (see docs/benchmarks.md)
    python bench/overhead.py --mode open --rates 200 500 1000 1500 2000   # the open-loop sweep
    python bench/overhead.py --profile-dir /tmp/prof --py-spy /tmp/dynvenv/bin/py-spy  # + py-spy profiles
    python bench/overhead.py --ttft-probe /tmp/probe        # + where each Baton side's TTFT goes, per cell

Installing the Dynamo baseline (never a dependency of Baton)::

    python -m venv /tmp/dynvenv && /tmp/dynvenv/bin/pip install ai-dynamo-runtime==1.6.1 \\
        && /tmp/dynvenv/bin/pip install ai-dynamo==1.6.1 --no-deps \\
        && /tmp/dynvenv/bin/pip install pyyaml msgspec tqdm zstandard uvloop packaging
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from baton.nats_server import find_nats_server, free_port, wait_for_port
from bench import ttft_breakdown
from bench.loadgen import ARRIVALS, QUICK_ACK_SUPPORTED, run_load, run_open_loop
from shared import probe
from shared.models import resolve_model

ROLES = {  # a cmdline fragment -> the role it is reported under
    "services.frontend": "frontend", "services.router": "router", "services.decode": "decode",
    "services.planner": "planner", "nats-server": "nats", "dynamo.frontend": "frontend",
    "dynamo.mocker": "decode", "baton up": "supervisor", "nats_floor.py front": "frontend",
    "nats_floor.py worker": "decode",
}
ROLE_ORDER = ("frontend", "router", "decode", "nats", "planner", "supervisor", "other")


def role_of(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    cmd = cmd.replace("-m baton up", "baton up")
    return next((role for frag, role in ROLES.items() if frag in cmd), "other")


@dataclass
class Side:
    name: str
    port: int
    roots: list[subprocess.Popen]
    logdir: Path
    _procs: dict[int, tuple[psutil.Process, str]] = field(default_factory=dict)

    def processes(self) -> dict[int, tuple[psutil.Process, str]]:
        """Every process of this side (the launched ones and their descendants), with its role."""
        for root in self.roots:
            try:
                top = psutil.Process(root.pid)
                for p in [top, *top.children(recursive=True)]:
                    if p.pid not in self._procs:
                        self._procs[p.pid] = (p, role_of(p))
            except psutil.Error:
                pass
        return self._procs

    def cpu(self) -> dict[int, float]:
        out = {}
        for pid, (p, _) in self.processes().items():
            try:
                t = p.cpu_times()
                out[pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def cpu_by_role(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        roles: dict[str, float] = {}
        for pid, t in after.items():
            role = self._procs[pid][1]
            roles[role] = roles.get(role, 0.0) + t - before.get(pid, 0.0)
        return roles

    def pids(self, role: str) -> list[int]:
        return [pid for pid, (p, r) in self.processes().items() if r == role and p.is_running()]

    def stop(self) -> None:
        for root in self.roots:
            try:
                os.killpg(root.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for root in self.roots:
            try:
                root.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(root.pid, signal.SIGKILL)


def http_ok(port: int, path: str, want: str = "") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status == 200 and want in r.read().decode()
    except OSError:
        return False


def start_baton(name: str, extra: list[str], tree: str = "", probe_dir: str = "") -> Side:
    """``baton up`` from this checkout, or (``tree``) from another one: its code first on PYTHONPATH;
    with ``probe_dir``, every process records the TTFT probe's hops there (shared/probe.py)."""
    logdir = Path(tempfile.mkdtemp(prefix=f"overhead-{name.replace('@', '-')}-"))
    env = {**os.environ, **({"PYTHONPATH": tree} if tree else {}), **({probe.ENV: probe_dir} if probe_dir else {})}
    port = free_port()
    log = open(logdir / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "up", "--engine", "mocker", "--mocker-speedup", "1e9", "--host", "127.0.0.1",
         "--port", str(port), "--nats-port", str(free_port()), "--prefill-workers", "0", "--log-dir", str(logdir),
         "--log-level", "warning", *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=tree or None,
    )
    side = Side(name, port, [proc], logdir)
    deadline = time.monotonic() + 180
    while "Baton is ready" not in (logdir / "up.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            side.stop()
            raise RuntimeError((logdir / "up.log").read_text())
        time.sleep(0.2)
    return side


def start_dynamo(venv: Path, model_dir: Path) -> Side:
    """Dynamo's frontend + mocker, discovery through files, no etcd or NATS."""
    logdir = Path(tempfile.mkdtemp(prefix="overhead-dynamo-"))
    port = free_port()
    env = {**os.environ, "DYN_FILE_KV": str(logdir / "kv"), "DYN_LOG": "warn", "PYTHONPATH": ""}
    plane = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    py = str(venv / "bin" / "python")
    mocker = subprocess.Popen(
        [py, "-m", "dynamo.mocker", "--model-path", str(model_dir), "--model-name", "baton-tiny",
         "--speedup-ratio", "1e9", *plane],
        stdout=open(logdir / "mocker.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    frontend = subprocess.Popen(
        [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port), "--router-mode",
         "round-robin", *plane],
        stdout=open(logdir / "frontend.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    side = Side("dynamo", port, [frontend, mocker], logdir)
    deadline = time.monotonic() + 180
    while not http_ok(port, "/v1/models", "baton-tiny"):
        if any(p.poll() is not None for p in side.roots) or time.monotonic() > deadline:
            side.stop()
            raise RuntimeError((logdir / "frontend.log").read_text()[-3000:] + (logdir / "mocker.log").read_text()[-3000:])
        time.sleep(0.2)
    return side


def start_floor() -> Side:
    """The transport floor (bench/nats_floor.py): an HTTP front and a worker relaying over a plain
    nats-server, no work done; what Baton's shape costs before any of Baton's work."""
    logdir = Path(tempfile.mkdtemp(prefix="overhead-floor-"))
    port, nats_port = free_port(), free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    here = Path(__file__).resolve().parent
    server = subprocess.Popen([find_nats_server(), "-a", "127.0.0.1", "-p", str(nats_port)],
                              stdout=open(logdir / "nats.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    side = Side("floor", port, [server], logdir)
    try:
        wait_for_port("127.0.0.1", nats_port, 30)
        for role in ("worker", "front"):
            side.roots.append(subprocess.Popen(
                [sys.executable, str(here / "nats_floor.py"), role, "--nats", url, "--port", str(port)],
                stdout=open(logdir / f"{role}.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_for_port("127.0.0.1", port, 30)
    except TimeoutError as e:
        side.stop()
        raise RuntimeError("".join(f.read_text()[-3000:] for f in sorted(logdir.glob("*.log")))) from e
    return side


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    ok = [v for v in values if v == v]
    if not ok:
        return "-"
    return f"{fmt.format(statistics.median(ok))} ({fmt.format(min(ok))}-{fmt.format(max(ok))})"


def median_of(runs: list[dict], side: str, key: str) -> float:
    return statistics.median(r[key] for r in runs if r["side"] == side)


def run_cell(side: Side, payload: dict, c: int, duration: float, quick_ack: bool = True) -> dict:
    """One closed-loop cell: ``c`` connections sending back to back."""
    return _measured(side, lambda: run_load("127.0.0.1", side.port, "/v1/completions", payload, c, duration,
                                            quick_ack=quick_ack))


def run_open_cell(side: Side, payload: dict, rate: float, duration: float, arrivals: str = "poisson",
                  seed: object = 0, max_connections: int = 512, quick_ack: bool = True) -> dict:
    """One open-loop cell: requests offered at ``rate`` a second (bench/loadgen.py's run_open_loop)."""
    return _measured(side, lambda: run_open_loop("127.0.0.1", side.port, "/v1/completions", payload, rate,
                                                 duration, arrivals=arrivals, seed=seed,
                                                 max_connections=max_connections, quick_ack=quick_ack))


def cpu_jiffies() -> tuple[int, int]:
    """(all, stolen) CPU time of the machine so far, in clock ticks (/proc/stat; (0, 0) elsewhere).
    Stolen time is what the hypervisor gave other guests while this one had work: a cell measured
    under much of it ran on a slower machine than its neighbours."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def _measured(side: Side, load: Any) -> dict:
    """Run ``load()`` (a load generator coroutine) and charge every process's CPU (the side's and
    the load generator's own, this process) to the responses it got."""
    before, own, jiffies = side.cpu(), time.process_time(), cpu_jiffies()
    r = asyncio.run(load())
    own, after = time.process_time() - own, side.cpu()
    total, stolen = (b - a for a, b in zip(jiffies, cpu_jiffies(), strict=True))
    n = max(r.completed, 1)
    cpu = {role: round(t / n * 1e3, 4) for role, t in side.cpu_by_role(before, after).items()}
    return {**r.summary(), "side": side.name, "completed": r.completed, "cpu_ms": cpu,
            "cpu_stack_ms": round(sum(cpu.values()), 4), "loadgen_cpu_ms": round(own / n * 1e3, 4),
            "window": r.window, "load1": os.getloadavg()[0], "steal_pct": round(100 * stolen / max(total, 1), 1)}


# Where a sample's time goes: the first of these found walking its stack from the leaf up.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("NATS socket writes (client flusher)", ("StreamWriter.writelines", "TcpTransport.writelines")),
    ("HTTP response writes (uvicorn send)", ("RequestResponseCycle.send", "_TurnWriter._flush")),
    ("tokenizer encode", ("Tokenizer.encode",)),
    ("detokenize", ("Tokenizer.decode", "detokenizer", "Detokenizer")),
    ("NATS publish (build the message)", ("Client.publish", "Client._send_publish", "pub_cmd", "Bus.publish",
                                          "_payload", "ReplyBatcher")),
    ("NATS receive (parse, dispatch, inbox)", ("nats/protocol/parser.py", "Client._process_msg",
                                               "Client._read_loop", "Subscription", "ReplyInbox", "ReplyStream",
                                               "Client._process_headers", "Client._build_message")),
    ("routing (route call, router core)", ("shared/routing/", "Generation._route", "Generation._ask_router",
                                           "services/router/")),
    ("engine step (scheduler, KV cache, mocker)", ("shared/engines/",)),
    ("HTTP parse and ASGI plumbing (uvicorn)", ("uvicorn/",)),
    ("anyio task groups, cancel scopes, events", ("anyio/",)),
    ("asyncio queues, locks, tasks", ("asyncio/queues.py", "asyncio/locks.py", "asyncio/tasks.py",
                                      "asyncio/mixins.py")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("frontend request handling (validation, SSE framing, generation loop)", ("services/frontend/",)),
    ("decode worker serving (stream, serve)", ("services/decode/",)),
    ("event loop itself (select, callbacks)", ("Runner.run", "asyncio/base_events.py", "asyncio/events.py",
                                               "selectors.py")),
]


def bucket_profile(path: Path) -> dict[str, float]:
    """Shares of a py-spy raw profile's samples by :data:`BUCKETS` (and "other")."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        bucket = "other"
        for frame in reversed(stack.split(";")):
            hit = next((name for name, keys in BUCKETS if any(k in frame for k in keys)), None)
            if hit is not None:
                bucket = hit
                break
        counts[bucket] = counts.get(bucket, 0) + int(count)
    return {b: n / total for b, n in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}


def summarize_profile(path: Path, top: int = 25) -> str:
    """A py-spy raw profile (collapsed stacks) as the functions with the most samples: self (leaf)
    and inclusive shares of all the process's samples while it was busy (py-spy skips idle threads)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples", "  share  where (bucketed, leaf first)"]
    lines += [f"  {100 * share:5.1f}  {bucket}" for bucket, share in bucket_profile(path).items()]
    lines.append("  self%  incl%  function")
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    lines.append("  -- inclusive --")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * own.get(f, 0) / total:5.1f}  {100 * n / total:5.1f}  {f}")
    return "\n".join(lines)


def profile(side: Side, py_spy: str, outdir: Path, payload: dict, c: int, duration: float,
            rate: int = 199, quick_ack: bool = True) -> None:
    """py-spy record (raw collapsed stacks) of every Python process of ``side`` under one cell's load."""
    outdir.mkdir(parents=True, exist_ok=True)
    spies = []
    for role in ("frontend", "router", "decode"):
        for pid in side.pids(role):
            out = outdir / f"{side.name}-{role}-{pid}.txt"
            spies.append(subprocess.Popen([py_spy, "record", "-p", str(pid), "-d", str(int(duration + 2)), "-r", str(rate),
                                           "--nonblocking", "-f", "raw", "-o", str(out)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # py-spy attaches
    cell = run_cell(side, payload, c, duration, quick_ack)
    for s in spies:
        s.wait(60)
    (outdir / f"{side.name}-cell.json").write_text(json.dumps(cell, indent=2))
    for path in sorted(outdir.glob(f"{side.name}-*-*.txt")):
        if not path.name.endswith("-summary.txt"):
            summary = summarize_profile(path)
            path.with_name(path.stem + "-summary.txt").write_text(summary + "\n")
    print(f"profiled {side.name} stream={payload['stream']} c={c}: {cell['rps']:.0f} req/s, "
          f"stack CPU {cell['cpu_stack_ms']:.3f} ms/request (py-spy itself perturbs this)", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    ap.add_argument("--mode", choices=("closed", "open"), default="closed",
                    help="closed: --concurrency connections back to back (the default matrix); "
                         "open: requests offered at each of --rates")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rates", type=float, nargs="+", default=[200, 500, 1000, 1500, 2000],
                    help="open loop: offered requests a second, one cell each")
    ap.add_argument("--arrivals", choices=ARRIVALS, default="poisson",
                    help="open loop: Poisson arrivals (seeded: every side gets the same schedule) or evenly spaced")
    ap.add_argument("--max-connections", type=int, default=512,
                    help="open loop: the most keep-alive connections the load generator opens")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--delayed-ack", action="store_true",
                    help="the load generator delays its ACKs as most HTTP clients do, instead of acknowledging "
                         "every segment at once (TCP_QUICKACK, the default: a server that leaves Nagle on, as "
                         "Dynamo 1.6.1's does, then stalls each streamed response ~40 ms on the client's account)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", nargs="+", default=["service", "embedded", "dynamo"],
                    help="service, embedded, dynamo (dynamo needs --dynamo-venv), floor (bench/nats_floor.py)")
    ap.add_argument("--dynamo-venv", type=str, default="", help="a venv with ai-dynamo 1.6.1 (see above)")
    ap.add_argument("--json", type=str, default="", help="also write every run here")
    ap.add_argument("--profile-dir", type=str, default="", help="after the matrix, py-spy each Baton side here")
    ap.add_argument("--profile-concurrency", type=int, default=64)
    ap.add_argument("--profile-non-streamed", action="store_true",
                    help="profile non-streamed requests (the default profiles streamed ones)")
    ap.add_argument("--profile-rate", type=int, default=199, help="py-spy samples a second")
    ap.add_argument("--py-spy", type=str, default="py-spy")
    ap.add_argument("--ttft-probe", type=str, default="",
                    help="a directory: every Baton side runs with BATON_TTFT_PROBE (shared/probe.py) and "
                         "the report adds where each cell's time to first token went, hop by hop")
    ap.add_argument("--baseline-tree", type=str, default="",
                    help="another Baton checkout (e.g. main): its service/embedded sides run too, as service@base "
                         "and embedded@base, interleaved with these (before/after in one run)")
    ap.add_argument("--baseline-sides", nargs="+", default=None,
                    help="which sides the baseline tree runs (default: as --sides; a tree from before the "
                         "embedded router has only service)")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    names = [s for s in args.sides if s != "dynamo" or args.dynamo_venv]
    if args.baseline_tree:
        names += [f"{s}@base" for s in (args.baseline_sides or args.sides) if s in ("service", "embedded")]
    if "dynamo" in args.sides and not args.dynamo_venv:
        print("no --dynamo-venv: Dynamo left out", file=sys.stderr)
    open_loop = args.mode == "open"
    quick_ack = not args.delayed_ack and QUICK_ACK_SUPPORTED
    load_key = "rate" if open_loop else "concurrency"
    loads = args.rates if open_loop else args.concurrency

    sides: list[Side] = []
    runs: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    payload = {"model": "baton-tiny", "prompt": "Measure the overhead of every hop in the stack.",
               "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    probe_dirs: dict[str, Path] = {}
    try:
        for name in names:
            kind, _, base = name.partition("@")
            tree = str(Path(args.baseline_tree).resolve()) if base else ""
            if args.ttft_probe and kind in ("service", "embedded"):
                probe_dirs[name] = Path(args.ttft_probe).resolve() / name.replace("@", "-at-")
            probe_dir = str(probe_dirs.get(name, ""))
            if kind == "service":
                sides.append(start_baton(name, [], tree, probe_dir))
            elif kind == "embedded":
                sides.append(start_baton(name, ["--router", "embedded"], tree, probe_dir))
            elif name == "floor":
                sides.append(start_floor())
            elif name == "dynamo":
                sides.append(start_dynamo(Path(args.dynamo_venv), resolve_model("baton-tiny", None).path))
            else:
                raise SystemExit(f"unknown side {name!r}")
        for side in sides:  # warm every path once (connections, caches, first-request setup)
            asyncio.run(run_load("127.0.0.1", side.port, "/v1/completions", {**payload, "stream": True}, 4, 1.0, 0.2))
        for repeat in range(args.repeats):
            order = sides[repeat % len(sides):] + sides[:repeat % len(sides)]
            for stream in (False, True):
                for load in loads:
                    for side in order:
                        cell_payload = {**payload, "stream": stream}
                        if open_loop:  # every side of this repeat gets the same arrival schedule
                            s = run_open_cell(side, cell_payload, load, args.duration, args.arrivals,
                                              f"{repeat}-{stream}-{load}", args.max_connections, quick_ack)
                        else:
                            s = run_cell(side, cell_payload, load, args.duration, quick_ack)
                        s["repeat"] = repeat
                        runs.append(s)
                        print(progress_line(s, open_loop), flush=True)
        if args.profile_dir:
            for side in sides:
                if side.name in ("service", "embedded"):
                    profile(side, args.py_spy, Path(args.profile_dir),
                            {**payload, "stream": not args.profile_non_streamed},
                            args.profile_concurrency, args.duration, args.profile_rate, quick_ack)
    finally:
        for side in sides:
            side.stop()  # each process writes the probe records it still holds as it exits
    if not runs:
        return
    probed = {name: ttft_breakdown.Requests(ttft_breakdown.load(d)) for name, d in probe_dirs.items()}
    for r in runs:
        if r["side"] in probed:
            r["ttft_breakdown"] = ttft_breakdown.summarize(probed[r["side"]], *r["window"])
    loadavg = [r["load1"] for r in runs]
    steal = sorted(r["steal_pct"] for r in runs)
    print(f"\n{started}, {args.mode} loop, {args.repeats} repeats of {args.duration:g} s per cell, load average "
          f"{min(loadavg):.2f}-{max(loadavg):.2f}, CPU time stolen by the hypervisor per cell {steal[0]:.1f}-"
          f"{steal[-1]:.1f}% (median {steal[len(steal) // 2]:.1f}%), {os.cpu_count()} CPUs; client ACKs "
          f"{'at once (TCP_QUICKACK)' if quick_ack else 'delayed'}; median (min-max) over the repeats\n")
    if open_loop:
        print(f"Open loop: {args.arrivals} arrivals at each offered rate, on up to {args.max_connections} keep-alive "
              "connections; latency and TTFT from when a request is written; late: requests the load generator "
              "wrote more than 1 ms after they were due; held: requests that waited for a connection (all "
              "busy: the side fell behind the offered rate)\n")
        print(open_table(runs, names, loads))
    else:
        print(closed_table(runs, names, loads))
    if "dynamo" in names:
        print("\nRatios to Dynamo (medians): req/s >1 is better, TTFT/latency/CPU <1 is better\n")
        print(ratio_table(runs, names, loads, load_key, open_loop))
    if probe_dirs:
        print(breakdown_tables(runs, [n for n in names if n in probe_dirs], loads, load_key))
    if args.json:
        Path(args.json).write_text(json.dumps({"started": started, "args": vars(args), "runs": runs}, indent=2))


def progress_line(s: dict, open_loop: bool) -> str:
    if open_loop:
        return (f"#{s['repeat']} {s['side']:8} stream={s['stream']!s:5} rate={s['rate']:6g} {s['rps']:8.1f} req/s "
                f"p50 {s['p50_ms']:7.2f} ms ttft p50 {s['ttft_p50_ms']:7.2f} p90 {s['ttft_p90_ms']:7.2f} ms "
                f"cpu {s['cpu_stack_ms']:.3f} ms/req {s['cpu_ms']} loadgen {s['loadgen_cpu_ms']:.3f} "
                f"late {s['late']} held {s['held']} conns {s['connections']} errors {s['errors']} load {s['load1']:.2f} "
                f"steal {s['steal_pct']:.1f}%")
    return (f"#{s['repeat']} {s['side']:8} stream={s['stream']!s:5} c={s['concurrency']:3} {s['rps']:8.1f} req/s "
            f"p50 {s['p50_ms']:7.2f} ms ttft p50 {s['ttft_p50_ms']:7.2f} ms "
            f"cpu {s['cpu_stack_ms']:.3f} ms/req {s['cpu_ms']} errors {s['errors']} "
            f"load {s['load1']:.2f} steal {s['steal_pct']:.1f}%")


def _mode(stream: bool) -> str:
    return "streamed" if stream else "non-streamed"


def _by_role(cell: list[dict]) -> str:
    roles = sorted({k for r in cell for k in r["cpu_ms"]}, key=ROLE_ORDER.index)
    return ", ".join(f"{k} {statistics.median(r['cpu_ms'].get(k, 0.0) for r in cell):.3f}" for k in roles)


def closed_table(runs: list[dict], names: list[str], loads: list) -> str:
    lines = ["| mode | c | side | req/s | p50 ms | TTFT p50 ms | stack CPU ms/req | by process (median ms/req) "
             "| errors / requests |", "|---|---:|---|---:|---:|---:|---:|---|---:|"]
    for stream in (False, True):
        for c in loads:
            for name in names:
                cell = [r for r in runs if r["stream"] == stream and r["concurrency"] == c and r["side"] == name]
                lines.append(
                    f"| {_mode(stream)} | {c} | {name} | "
                    f"{spread([r['rps'] for r in cell], '{:.0f}')} | {spread([r['p50_ms'] for r in cell], '{:.2f}')} | "
                    f"{spread([r['ttft_p50_ms'] for r in cell], '{:.2f}')} | "
                    f"{spread([r['cpu_stack_ms'] for r in cell], '{:.3f}')} | {_by_role(cell)} | "
                    f"{sum(r['errors'] for r in cell)} / {sum(r['requests'] for r in cell)} |")
    return "\n".join(lines)


def open_table(runs: list[dict], names: list[str], loads: list) -> str:
    lines = ["| mode | offered req/s | side | achieved req/s | TTFT p50 ms | TTFT p90 ms | p50 ms | p90 ms "
             "| stack CPU ms/req | by process (median ms/req) | loadgen CPU ms/req | late / held / requests "
             "| errors / requests |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for stream in (False, True):
        for rate in loads:
            for name in names:
                cell = [r for r in runs if r["stream"] == stream and r["rate"] == rate and r["side"] == name]
                n = sum(r["requests"] for r in cell)
                lines.append(
                    f"| {_mode(stream)} | {rate:g} | {name} | {spread([r['rps'] for r in cell], '{:.0f}')} | "
                    f"{spread([r['ttft_p50_ms'] for r in cell], '{:.2f}')} | "
                    f"{spread([r['ttft_p90_ms'] for r in cell], '{:.2f}')} | "
                    f"{spread([r['p50_ms'] for r in cell], '{:.2f}')} | {spread([r['p90_ms'] for r in cell], '{:.2f}')} | "
                    f"{spread([r['cpu_stack_ms'] for r in cell], '{:.3f}')} | {_by_role(cell)} | "
                    f"{spread([r['loadgen_cpu_ms'] for r in cell], '{:.3f}')} | "
                    f"{sum(r['late'] for r in cell)} / {sum(r['held'] for r in cell)} / {n} | "
                    f"{sum(r['errors'] for r in cell)} / {n} |")
    return "\n".join(lines)


def ratio_table(runs: list[dict], names: list[str], loads: list, load_key: str, open_loop: bool) -> str:
    keys = [("req/s", "rps"), ("TTFT p50", "ttft_p50_ms")]
    if open_loop:
        keys += [("TTFT p90", "ttft_p90_ms"), ("latency p50", "p50_ms")]
    keys.append(("stack CPU", "cpu_stack_ms"))
    head = "offered req/s" if open_loop else "c"
    lines = [f"| mode | {head} | side | " + " | ".join(k for k, _ in keys) + " |",
             "|---|---:|---|" + "---:|" * len(keys)]
    for stream in (False, True):
        for load in loads:
            cell = [r for r in runs if r["stream"] == stream and r[load_key] == load]
            for name in (n for n in names if n != "dynamo"):
                ratios = " | ".join(f"{median_of(cell, name, k) / median_of(cell, 'dynamo', k):.2f}" for _, k in keys)
                lines.append(f"| {_mode(stream)} | {load:g} | {name} | {ratios} |")
    return "\n".join(lines)


def breakdown_tables(runs: list[dict], names: list[str], loads: list, load_key: str) -> str:
    """Per Baton side and mode: each hop's p50 / p90 (ms, medians over the repeats) at each load."""
    out = []
    for name in names:
        for stream in (False, True):
            cells = {load: [r.get("ttft_breakdown") or {} for r in runs
                            if r["side"] == name and r["stream"] == stream and r[load_key] == load] for load in loads}
            steps = list(dict.fromkeys(s for bds in cells.values() for bd in bds for s in bd))
            if not steps:
                out.append(f"\nTTFT probe, {name}, {_mode(stream)}: no records (a tree without shared/probe.py?)")
                continue
            head = "offered req/s" if load_key == "rate" else "c"
            out.append(f"\nWhere the time to first token goes: {name}, {_mode(stream)} (TTFT probe; p50 / p90 ms "
                       f"per {head}, medians over the repeats)\n")
            out.append("| step | " + " | ".join(f"{head} {load:g}" for load in loads) + " |")
            out.append("|---|" + "---:|" * len(loads))
            for step in steps:
                row = []
                for load in loads:
                    got = [bd[step] for bd in cells[load] if step in bd]
                    row.append(f"{statistics.median(g['p50_ms'] for g in got):.2f} / "
                               f"{statistics.median(g['p90_ms'] for g in got):.2f}" if got else "-")
                out.append(f"| {step} | " + " | ".join(row) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
