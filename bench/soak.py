"""Soak: mixed traffic for a long time with a fault injected at a fixed interval.

Starts ``baton up`` (torch engine, baton-tiny, 2 decode workers, 2 routers, 1 prefill worker)
and runs a bounded number of concurrent clients sending a mix of chat and completion requests,
streamed and not, short and long. Every ``--fault-every`` seconds it injects the next fault in
turn: SIGKILL a decode worker, SIGKILL a router, SIGTERM (drain) a decode worker, SIGKILL the
prefill worker. ``baton up`` restarts what died. It samples every service's resident memory and
reports totals, failures, migrations and memory over time.

A request succeeds only if it is whole: status 200; a streamed one ends with ``data: [DONE]`` and
carries no in-band error; it produced exactly ``max_tokens`` tokens (every request sets
``ignore_eos``, so anything shorter is a failure, per the usage the server reports) and finished
with ``length``. Greedy requests (temperature 0) that migrated mid-stream to another worker (the
frontend logs each migration with the request id) are re-run after the soak, one at a time with
no faults, and their text must equal that undisturbed run; a sample of greedy requests that did
not migrate is re-run the same way as a control (it shows whether any difference comes from the
migration or from batching alone).

    python bench/soak.py --minutes 10 --fault-every 30 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from baton.nats_server import free_port


def descendants(pid: int) -> dict[int, str]:
    """pid -> service name, for every descendant of ``pid`` (read from /proc)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out: dict[int, str] = {}
    for p in parent:
        q = p
        while q in parent and q != pid:
            q = parent[q]
        if q == pid and p != pid:
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            m = re.search(r"services\.(\w+)", cmd)
            out[p] = m.group(1) if m else ("nats-server" if "nats-server" in cmd else "other")
    return out


def rss_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def send(http: httpx.AsyncClient, url: str, path: str, body: dict) -> tuple[str, str, str]:
    """One request, checked whole: (request id, text, "" or what was wrong with it)."""
    chat = path.endswith("chat/completions")
    n = body["max_tokens"]
    if not body["stream"]:
        r = await http.post(url + path, json=body)
        if r.status_code != 200:
            return "", "", f"http_{r.status_code}"
        obj = r.json()
        choice = obj["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        got = (obj.get("usage") or {}).get("completion_tokens")
        if got != n:
            return obj["id"], text, "wrong_token_count"
        if choice["finish_reason"] != "length":
            return obj["id"], text, f"finish_{choice['finish_reason']}"
        return obj["id"], text, ""
    body = {**body, "stream_options": {"include_usage": True}}
    async with http.stream("POST", url + path, json=body) as r:
        rid = r.headers.get("x-request-id", "")
        if r.status_code != 200:
            return rid, "", f"http_{r.status_code}"
        parts: list[str] = []
        done = False
        got = finish = None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            obj = json.loads(data)
            if "error" in obj:
                return rid, "".join(parts), "in_band_error"
            if obj.get("usage"):
                got = obj["usage"]["completion_tokens"]
            for c in obj.get("choices") or []:
                parts.append((c.get("delta") or {}).get("content") or "" if chat else c.get("text") or "")
                finish = c.get("finish_reason") or finish
    text = "".join(parts)
    if not done:
        return rid, text, "no_done"
    if got != n:
        return rid, text, "wrong_token_count"
    if finish != "length":
        return rid, text, f"finish_{finish}"
    return rid, text, ""


async def client(url: str, stop_at: float, stats: Counter, rng: random.Random, greedy: dict) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < stop_at:
            chat = rng.random() < 0.5
            stream = rng.random() < 0.5
            n = rng.choice([4, 16, 64, 256])
            body: dict = {"model": "baton-tiny", "max_tokens": n, "stream": stream, "ignore_eos": True,
                          "temperature": rng.choice([0, 0.8])}
            if chat:
                body["messages"] = [{"role": "user", "content": "soak " * rng.randint(1, 200)}]
                path = "/v1/chat/completions"
            else:
                body["prompt"] = "soak " * rng.randint(1, 200)
                path = "/v1/completions"
            try:
                rid, text, failure = await send(http, url, path, body)
                stats[failure or "ok"] += 1
                if not failure and body["temperature"] == 0 and rid:
                    greedy[rid] = (path, body, text)
            except (httpx.HTTPError, ValueError, KeyError) as e:
                stats[f"exc_{type(e).__name__}"] += 1
                await asyncio.sleep(0.2)
            stats["total"] += 1


def migrated_request_ids(logdir: Path) -> set[str]:
    """Request ids the frontend logged as migrated ("request X: ... migrating")."""
    ids: set[str] = set()
    for f in logdir.glob("*.log"):
        ids.update(re.findall(r"request (\S+): .*; migrating", f.read_text(errors="replace")))
    return ids


async def check_greedy(url: str, greedy: dict, ids: list[str]) -> tuple[int, int, list[str]]:
    """Re-run each request alone; (equal, differing, failed re-runs as ids)."""
    equal = differ = 0
    failed = []
    async with httpx.AsyncClient(timeout=120) as http:
        for rid in ids:
            path, body, text = greedy[rid]
            for _ in range(3):  # the stack may still be replacing the last fault's victim
                try:
                    _, ref, failure = await send(http, url, path, body)
                except httpx.HTTPError:
                    failure = "exc"
                if not failure:
                    break
                await asyncio.sleep(1)
            if failure:
                failed.append(rid)
            elif ref == text:
                equal += 1
            else:
                differ += 1
    return equal, differ, failed


async def main_async(args: argparse.Namespace) -> dict:
    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="baton-soak-"))
    up = subprocess.Popen(
        [sys.executable, "-m", "baton", "up", "--engine", "torch", "--decode-workers", "2", "--routers", "2",
         "--prefill-workers", "1", "--host", "127.0.0.1", "--port", str(port), "--nats-port", str(free_port()),
         "--log-dir", str(logdir), "--discovery-ttl", "3", "--log-level", "warning"],
        stdout=open(logdir / "up.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while "Baton is ready" not in (logdir / "up.log").read_text():
        if up.poll() is not None:
            raise RuntimeError((logdir / "up.log").read_text())
        await asyncio.sleep(0.2)
    stats: Counter = Counter()
    rng = random.Random(7)
    t0 = time.monotonic()
    stop_at = t0 + args.minutes * 60
    faults = ["kill decode", "kill router", "drain decode", "kill prefill"]
    fault_log: list[tuple[float, str]] = []
    memory: list[dict] = []
    greedy: dict[str, tuple[str, dict, str]] = {}
    clients = [asyncio.create_task(client(url, stop_at, stats, random.Random(rng.random()), greedy))
               for _ in range(args.concurrency)]
    next_fault, next_sample, k = t0 + args.fault_every, t0, 0
    while time.monotonic() < stop_at:
        now = time.monotonic()
        if now >= next_sample:
            procs = descendants(up.pid)
            sample: dict = {"t": round(now - t0, 1)}
            for pid, name in procs.items():
                sample[name] = round(sample.get(name, 0) + rss_mib(pid), 1)
            memory.append(sample)
            next_sample += args.sample_every
        if now >= next_fault:
            kind = faults[k % len(faults)]
            k += 1
            role = kind.split()[1]
            victims = [p for p, n in descendants(up.pid).items() if n == role]
            if victims:
                os.kill(rng.choice(victims), signal.SIGTERM if kind.startswith("drain") else signal.SIGKILL)
                fault_log.append((round(now - t0, 1), kind))
            next_fault += args.fault_every
        await asyncio.sleep(0.5)
    await asyncio.gather(*clients)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    migrated = sum(float(m) for m in re.findall(r'^baton_frontend_migrations_total\{[^}]*\} ([0-9.e+]+)$', metrics, re.M))
    moved = migrated_request_ids(logdir)
    greedy_moved = [rid for rid in greedy if rid in moved]
    control = [rid for rid in greedy if rid not in moved][: args.control]
    try:
        m_equal, m_differ, m_failed = await check_greedy(url, greedy, greedy_moved)
        c_equal, c_differ, c_failed = await check_greedy(url, greedy, control)
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(60)
    return {"minutes": args.minutes, "concurrency": args.concurrency, "stats": dict(stats),
            "migrated": migrated, "migrated_ids_logged": len(moved), "faults": fault_log, "memory_mib": memory,
            "greedy_ok": len(greedy),
            "greedy_migrated": {"checked": len(greedy_moved), "equal": m_equal, "differ": m_differ,
                                "rerun_failed": len(m_failed)},
            "greedy_control": {"checked": len(control), "equal": c_equal, "differ": c_differ,
                               "rerun_failed": len(c_failed)},
            "logs": str(logdir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--fault-every", type=float, default=30)
    ap.add_argument("--sample-every", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--control", type=int, default=20, help="greedy requests that did not migrate to re-run")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    s = res["stats"]
    print(f"requests {s.get('total', 0)}, ok {s.get('ok', 0)}, failed {s.get('total', 0) - s.get('ok', 0)}, "
          f"migrated {res['migrated']:.0f}, faults {len(res['faults'])}")
    print("failures by kind:", {k: v for k, v in s.items() if k not in ("total", "ok")})
    print(f"migrations counted by the frontend {res['migrated']:.0f}, request ids logged {res['migrated_ids_logged']}; "
          f"greedy requests ok {res['greedy_ok']}: migrated {res['greedy_migrated']}, control {res['greedy_control']}")
    names = sorted({k for m in res["memory_mib"] for k in m if k != "t"})
    print("t(s)   " + "  ".join(f"{n:>10}" for n in names) + "   (RSS MiB)")
    for m in res["memory_mib"]:
        print(f"{m['t']:6}" + "  ".join(f"{m.get(n, 0):10.1f}" for n in names))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
