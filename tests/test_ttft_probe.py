"""The TTFT probe end to end: real nats-server, router, decode worker and frontend processes with
BATON_TTFT_PROBE set; every hop of a request's first-token path is recorded, in order."""

from __future__ import annotations

from pathlib import Path

import httpx

from bench.ttft_breakdown import TOTAL, load, summarize
from shared.probe import ENV, HOPS
from tests.procs import Stack


def test_every_hop_of_the_first_token_path_is_recorded(tmp_path: Path) -> None:
    probe_dir = tmp_path / "probe"
    # The mocker: the hooks sit in the frontend, the worker and the bus, not in any engine.
    s = Stack(tmp_path, "mocker", env={ENV: str(probe_dir)})
    rids = []
    try:
        s.start()
        for stream in (True, False):
            r = httpx.post(f"{s.url}/v1/completions", timeout=30, json={
                "model": "baton-tiny", "prompt": "where does the time go", "max_tokens": 4, "stream": stream})
            assert r.status_code == 200, r.text
            rids.append(r.headers["x-request-id"])
    finally:
        s.stop()  # each process writes what it holds as it exits
    assert len(list(probe_dir.glob("probe-*.tsv"))) >= 2  # the frontend's and the worker's
    for rid in rids:
        hops = load(probe_dir)[rid]
        assert set(hops) == set(HOPS), rid
        t = [hops[h] for h in HOPS]
        frontend_in, worker, frontend_out = t[:4], t[4:9], t[9:]
        assert frontend_in == sorted(frontend_in) and worker == sorted(worker) and frontend_out == sorted(frontend_out)
        assert hops["routed"] <= hops["job_received"] and hops["worker_flush"] <= hops["reply_delivered"]
    summary = summarize(probe_dir)
    assert summary[TOTAL]["n"] == 2
    assert summary["http_headers -> app_start"]["n"] == 2
