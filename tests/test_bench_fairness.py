"""The fairness rules the benchmarks rely on: per-token ITL, user orders, cold disk reads, the open
loop's offered rate and lateness, the TTFT probe."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import mmap
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.disagg_bench import token_gaps
from bench.kv_tiers_bench import drop_disk_pages, visit_order
from bench.router_trace import MODES, spread


def test_token_gaps_divide_a_chunk_gap_among_its_tokens() -> None:
    chunks = [(1.0, 2), (1.3, 3), (1.4, 1)]  # (arrival, tokens)
    gaps = token_gaps(chunks, 0.0, 10.0)
    assert gaps == pytest.approx([0.0, 0.1, 0.1, 0.1, 0.1])
    assert len(gaps) == sum(k for _, k in chunks) - 1  # one gap per token after the first
    assert token_gaps(chunks, 1.2, 10.0) == pytest.approx([0.1])  # only gaps inside the window


@pytest.mark.parametrize("order", ["round-robin", "random"])
def test_visit_order_keeps_each_users_turns_in_sequence(order: str) -> None:
    visits = visit_order(5, 4, order, seed=3)
    assert sorted(visits) == [(u, t) for u in range(5) for t in range(4)]
    for u in range(5):
        assert [t for uu, t in visits if uu == u] == [0, 1, 2, 3]
    if order == "round-robin":
        assert [u for u, _ in visits[:5]] == [0, 1, 2, 3, 4]
    else:
        assert visits != visit_order(5, 4, "round-robin", seed=3)
        assert visits == visit_order(5, 4, order, seed=3)  # seeded: every config sees the same order


def test_drop_disk_pages_evicts_tier_files_from_the_page_cache(tmp_path: Path) -> None:
    f = tmp_path / "0000000000000001.kv"
    f.write_bytes(os.urandom(1 << 20))
    f.read_bytes()  # in the page cache now
    (tmp_path / "other.txt").write_text("not a tier file")
    assert _resident_pages(f) > 0
    assert drop_disk_pages(str(tmp_path)) == 1
    assert _resident_pages(f) == 0


def _resident_pages(path: Path) -> int:
    """Pages of a file in the page cache (mincore(2) on a mapping that touches none of them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        n = (len(m) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        view = ctypes.c_char.from_buffer(m)
        try:
            assert libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(len(m)), vec) == 0
        finally:
            del view  # release the buffer before the mapping closes
        return sum(v & 1 for v in vec)


def test_least_loaded_is_the_kv_router_without_its_cache_term() -> None:
    assert MODES["least-loaded"] == ("kv", ["--overlap-weight", "0"])
    assert MODES["kv"] == ("kv", [])


def test_spread_reports_median_and_range_and_keeps_missing_repeats() -> None:
    s = spread([3.0, None, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert s["values"] == [3.0, None, 1.0, 2.0]
    assert spread([None])["median"] is None


def test_overhead_profile_buckets_go_by_the_leafmost_known_frame(tmp_path: Path) -> None:
    from bench.overhead import bucket_profile, summarize_profile

    raw = tmp_path / "frontend.txt"
    raw.write_text(
        "Runner.run (asyncio/runners.py:118);OpenAIApp._stream (services/frontend/http_app.py:387);"
        "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:544) 6\n"
        "Runner.run (asyncio/runners.py:118);Client._flusher (nats/aio/client.py:2363);"
        "StreamWriter.writelines (asyncio/streams.py:346) 3\n"
        "Runner.run (asyncio/runners.py:118);mystery (x.py:1) 1\n")
    shares = bucket_profile(raw)
    assert shares["HTTP response writes (uvicorn send)"] == pytest.approx(0.6)  # not "frontend handling"
    assert shares["NATS socket writes (client flusher)"] == pytest.approx(0.3)
    assert shares["event loop itself (select, callbacks)"] == pytest.approx(0.1)  # its nearest known frame
    assert sum(shares.values()) == pytest.approx(1.0)
    assert "10 samples" in summarize_profile(raw)


# --- bench/overhead.py's open loop (bench/loadgen.py) ---------------------------------------------


def test_poisson_arrivals_are_seeded_and_hold_the_offered_rate() -> None:
    from bench.loadgen import arrival_times

    times = arrival_times(500, 20.0, "poisson", seed="0-True-500")
    assert times == arrival_times(500, 20.0, "poisson", seed="0-True-500")  # every side: the same schedule
    assert times != arrival_times(500, 20.0, "poisson", seed="1-True-500")
    assert len(times) == pytest.approx(10_000, rel=0.05)
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 20.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = sum(gaps) / len(gaps)
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert mean == pytest.approx(1 / 500, rel=0.05)
    assert sd / mean == pytest.approx(1.0, abs=0.1)  # exponential gaps: as spread as they are long


def test_uniform_arrivals_are_evenly_spaced() -> None:
    from bench.loadgen import arrival_times

    assert arrival_times(4, 1.0, "uniform") == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError):
        arrival_times(4, 1.0, "bursty")
    with pytest.raises(ValueError):
        arrival_times(0, 1.0)


async def read_request(reader: asyncio.StreamReader) -> None:
    """One request from bench/loadgen.py (its headers, then its Content-Length body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))


class _FakeServer:
    """A keep-alive HTTP/1.1 server that isolates the load generator: every request gets a chunked
    response, its first chunk after ``first`` seconds and the end ``rest`` seconds later. ``fail``
    maps a request's number (from 0) to what goes wrong: "500" (an error status, the connection
    kept) or "drop" (the connection closed without a response)."""

    def __init__(self, first: float, rest: float = 0.002, fail: Callable[[int], str] = lambda i: "") -> None:
        self.first, self.rest, self.fail = first, rest, fail
        self.connections = 0
        self.requests = 0
        self.in_flight = 0
        self.peak = 0
        self.handlers: set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                await read_request(reader)
                i = self.requests
                self.requests += 1
                failure = self.fail(i)
                if failure == "drop":
                    return
                if failure == "500":
                    body = b'{"error": {"message": "no"}}'
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                await asyncio.sleep(self.first)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n")
                await asyncio.sleep(self.rest)
                writer.write(b"5\r\ndone!\r\n0\r\n\r\n")
                self.in_flight -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def run(self, **load: Any) -> Any:
        from bench.loadgen import run_open_loop

        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            result = await run_open_loop("127.0.0.1", port, "/v1/completions", {"stream": True}, **load)
            # The load generator closed its connections: each handler ends on its client's EOF.
            await asyncio.wait_for(asyncio.gather(*self.handlers), 10)
            return result


def test_open_loop_offers_the_rate_on_pooled_keep_alive_connections() -> None:
    server = _FakeServer(first=0.010)
    r = asyncio.run(server.run(rate=300, duration=1.0, warmup=0.2, seed=1))
    s = r.summary()
    assert s["errors"] == 0 and s["requests"] == len(r.measured) > 200
    assert s["rps"] == pytest.approx(300, rel=0.2)
    assert r.completed == server.requests == len(r.samples)  # the warm-up's and the drain's responses too
    # Arrivals overlap (10 ms each at 300/s): more than one connection, but each one is reused.
    assert 2 <= server.peak <= s["connections"] == server.connections < server.requests / 4
    assert s["ttft_p50_ms"] >= 10.0 and s["p50_ms"] >= s["ttft_p50_ms"] + 2.0
    # The load generator keeps to its schedule: requests go out within asyncio's timer granularity
    # (how many are late beyond it depends on what else the box runs: here, the server too).
    assert s["lag_p50_ms"] < 5.0 and sum(1 for x in r.measured if abs(x.lag) < 0.001) > 0.25 * s["requests"]
    assert s["late"] == sum(1 for x in r.measured if x.lag > 0.001) < s["requests"] and s["held"] == 0
    lo, hi = r.window
    assert hi - lo == pytest.approx(1.0)


def test_open_loop_bounds_its_connections_and_reports_the_requests_it_holds_back() -> None:
    server = _FakeServer(first=0.020)
    r = asyncio.run(server.run(rate=100, duration=0.5, warmup=0.1, seed=2, max_connections=1))
    s = r.summary()
    assert server.connections == s["connections"] == 1 and server.peak == 1
    assert s["errors"] == 0 and r.completed == len(r.samples)
    assert s["rps"] < 60  # one connection, 22 ms a request: it cannot keep up with 100/s
    # The requests held back for the connection show as held (the server is behind), not as slow
    # responses, nor as the load generator's lateness.
    assert s["held"] > 0.5 * s["requests"] and s["lag_p50_ms"] > 20
    assert all(x.lag < 0.1 for x in r.measured if not x.held) and s["late"] < s["held"]


def test_open_loop_counts_errors_and_replaces_dropped_connections() -> None:
    server = _FakeServer(first=0.002, fail=lambda i: ("", "500", "drop")[i % 3])
    r = asyncio.run(server.run(rate=200, duration=0.5, warmup=0.1, seed=3))
    statuses = [x.status for x in r.samples]
    assert statuses.count(500) > 0 and statuses.count(0) > 0 and statuses.count(200) > 0
    s = r.summary()
    assert s["errors"] == sum(1 for x in r.measured if x.status != 200) > 0.5 * s["requests"]
    assert server.connections >= statuses.count(0)  # every dropped connection was replaced


def test_closed_loop_fails_on_a_response_that_never_comes() -> None:
    """A lost response (a server that reads a request and never answers) ends the closed loop with
    an error naming it, bounded in time, instead of hanging the bench."""
    from bench.loadgen import run_load

    answered = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        try:
            while True:
                await read_request(reader)
                if answered == 5:
                    await reader.read()  # the sixth request gets no response: wait for the client to go
                    return
                answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> float:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with server:
            with pytest.raises(TimeoutError, match=r"a response was still missing 0\.4 s after the run's end"):
                await run_load("127.0.0.1", port, "/v1/completions", {}, 1, 0.2, warmup=0.0, request_timeout=0.4)
        return loop.time() - start

    assert asyncio.run(main()) < 5.0
    assert answered == 5


def test_the_planner_bench_counts_a_request_never_answered_as_an_error() -> None:
    """bench/planner_bench.py's requests are bounded: a server that never answers costs the
    request its timeout and an error, not the bench its run."""
    from bench.planner_bench import Req, one_request

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # read the request, never answer; wait for the client to go
        writer.close()

    async def main() -> Any:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            return await one_request(server.sockets[0].getsockname()[1], Req(0.0, [1, 2, 3], 4), "m", timeout=0.3)

    res = asyncio.run(main())
    assert not res.ok and res.error == "no complete response within 0.3 s"


def test_closed_loop_stays_the_default_matrix() -> None:
    from bench.overhead import build_parser

    args = build_parser().parse_args([])
    assert (args.mode, args.concurrency, args.repeats) == ("closed", [1, 16, 64], 3)
    args = build_parser().parse_args(["--mode", "open"])
    assert (args.rates, args.arrivals) == ([200, 500, 1000, 1500, 2000], "poisson")


# --- the TTFT probe (shared/probe.py) and its summary (bench/ttft_breakdown.py) --------------------


def test_ttft_breakdown_joins_each_requests_hops_across_processes(tmp_path: Path) -> None:
    from bench.ttft_breakdown import TOTAL, summarize

    (tmp_path / "probe-1.tsv").write_text(  # a frontend
        "# python -m services.frontend\n"
        "app_start\ta\t10.000\njob_published\ta\t10.001\nfirst_reply\ta\t10.005\nfirst_write\ta\t10.0055\n"
        "app_start\tb\t11.000\njob_published\tb\t11.002\nfirst_reply\tb\t11.010\nfirst_write\tb\t11.011\n"
        "job_published\tb\t11.020\n"  # b migrated: its first pass counts
        "app_start\tlate\t99.0\nfirst_write\tlate\t99.1\n")
    (tmp_path / "probe-2.tsv").write_text(  # a decode worker
        "job_received\ta\t10.002\nfirst_token\ta\t10.003\njob_received\tb\t11.004\nfirst_token\tb\t11.006\n")
    steps = summarize(tmp_path, since=9.0, until=12.0)
    assert list(steps) == ["app_start -> job_published", "job_published -> job_received",
                           "job_received -> first_token", "first_token -> first_reply",
                           "first_reply -> first_write", TOTAL]  # path order; the request outside left out
    assert steps["job_published -> job_received"]["n"] == 2
    assert steps["job_published -> job_received"]["p50_ms"] == pytest.approx(2.0)  # a: 1 ms, b: 2 ms
    assert steps["job_received -> first_token"]["p90_ms"] == pytest.approx(2.0)
    assert steps[TOTAL]["p50_ms"] == pytest.approx(11.0) and steps[TOTAL]["n"] == 2
    assert summarize(tmp_path)[TOTAL]["n"] == 3


def test_the_probe_records_only_when_asked_and_writes_on_exit(tmp_path: Path) -> None:
    code = ("from shared import probe\n"
            "print(probe.on)\n"
            "if probe.on:\n"
            "    probe.app_start('r1', {probe.HEADERS_KEY: 1.5})\n"
            "    probe.flushing({'inbox': [TokenChunk(request_id='r1', index=0, token_ids=[7]),\n"
            "                              TokenChunk(request_id='r1', index=1, token_ids=[8])]})\n")
    code = "from shared.messages import TokenChunk\n" + code
    env = {k: v for k, v in os.environ.items() if k != "BATON_TTFT_PROBE"}
    root = str(Path(__file__).resolve().parent.parent)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": root}, capture_output=True,
                         text=True, timeout=60, check=True)
    assert off.stdout.strip() == "False"
    on = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": root,
                                                            "BATON_TTFT_PROBE": str(tmp_path / "p")},
                        capture_output=True, text=True, timeout=60, check=True)
    assert on.stdout.strip() == "True"
    (written,) = (tmp_path / "p").glob("probe-*.tsv")
    rows = [line.split("\t") for line in written.read_text().splitlines() if not line.startswith("#")]
    assert [(hop, rid) for hop, rid, _ in rows] == [("http_headers", "r1"), ("app_start", "r1"),
                                                    ("worker_flush", "r1")]  # only the first tokens' flush
    assert float(rows[0][2]) == 1.5


def test_the_transport_floor_relays_real_requests_over_a_real_nats_server() -> None:
    """bench/nats_floor.py (``--sides floor``) answers the bench's requests through nats-server,
    streamed in two chunks and not streamed in one, and its processes are measured by role."""
    from bench.overhead import run_cell, start_floor

    side = start_floor()
    try:
        payload = {"model": "baton-tiny", "prompt": "hello", "max_tokens": 16, "ignore_eos": True}
        whole = run_cell(side, {**payload, "stream": False}, 2, 0.3)
        streamed = run_cell(side, {**payload, "stream": True}, 2, 0.3)
        roles = {role for _, role in side.processes().values()}
    finally:
        side.stop()
    for cell in (whole, streamed):
        assert cell["errors"] == 0 and cell["requests"] > 10, cell
    assert streamed["ttft_p50_ms"] < streamed["p50_ms"]  # the first chunk comes before the rest
    assert roles == {"frontend", "decode", "nats"}


def test_the_floor_front_opens_its_port_only_once_a_worker_listens(tmp_path: Path) -> None:
    """The floor's front waits for its worker's subscription before it takes requests: a job
    published to nobody would be dropped by nats-server and its request never answered. With no
    worker at all, the front gives up with one clear line and never opens its port."""
    from baton.nats_server import wait_for_port
    from bench.overhead import find_nats_server, free_port

    nats_port = free_port()
    server = subprocess.Popen([find_nats_server(), "-a", "127.0.0.1", "-p", str(nats_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", nats_port, 30)
        front = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "bench" / "nats_floor.py"),
                                "front", "--nats", f"nats://127.0.0.1:{nats_port}", "--port", str(free_port()),
                                "--ready-timeout", "1"], capture_output=True, text=True, timeout=60)
    finally:
        server.terminate()
        server.wait(10)
    assert front.returncode != 0
    assert "no floor worker answered on floor.ready in 1 s" in front.stderr
    assert "floor front ready" not in front.stdout


def _nagle_run(quick_ack: bool) -> Any:
    """bench/loadgen.py's closed loop (c = 1) against a server that leaves Nagle's algorithm on and
    writes each streamed response in two small pieces 2 ms apart, as Dynamo 1.6.1's frontend does."""
    import socket

    from bench.loadgen import run_load

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        try:
            while True:
                await read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n")
                await asyncio.sleep(0.002)  # the first piece is on the wire, not yet acknowledged
                writer.write(b"5\r\ndone!\r\n0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> Any:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            return await run_load("127.0.0.1", server.sockets[0].getsockname()[1], "/v1/completions",
                                  {"stream": True}, 1, 0.6, warmup=0.1, quick_ack=quick_ack)

    return asyncio.run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_QUICKACK is Linux's")
def test_the_load_generator_acknowledges_at_once_so_a_nagle_server_does_not_stall() -> None:
    """With delayed ACKs a Nagle server's second piece waits for the client's ACK (Linux: ~40 ms);
    the load generator's quick ACKs (the default) take that stall, an artefact of the client, out
    of every side's figures."""
    delayed = _nagle_run(quick_ack=False).summary()
    if delayed["p50_ms"] < 20:
        pytest.skip(f"this kernel does not delay ACKs here (p50 {delayed['p50_ms']} ms): nothing to show")
    quick = _nagle_run(quick_ack=True).summary()
    assert quick["errors"] == delayed["errors"] == 0
    assert quick["p50_ms"] < 20 < delayed["p50_ms"]
    assert quick["requests"] > 2 * delayed["requests"]
