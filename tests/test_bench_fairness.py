"""The fairness rules the benchmarks rely on: per-token ITL, user orders, cold disk reads."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

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
