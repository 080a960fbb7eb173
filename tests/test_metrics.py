"""Every service's /metrics after traffic: the key series exist and moved."""

from __future__ import annotations

import re
import uuid

import anyio
import httpx
import nats
import pytest

from shared import subjects
from shared.messages import PrefillJob, encode
from tests.conftest import e2e_engine
from tests.procs import Stack, wait_until

pytestmark = pytest.mark.timeout(180)


def value(text: str, name: str, **labels: str) -> float:
    """Sum of a series' samples whose labels include ``labels``."""
    total, found = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
            found = True
    assert found, f"no series {name}{labels}"
    return total


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def test_metrics_move_after_traffic(tmp_path) -> None:
    s = Stack(tmp_path, e2e_engine(), prefill_workers=1, planner=True, metrics=True)
    try:
        s.start()
        for i in range(5):
            r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": f"m{i}", "max_tokens": 4,
                                                             "ignore_eos": True}, timeout=30)
            assert r.status_code == 200
        with httpx.stream("POST", f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": "s",
                                                                    "max_tokens": 4, "stream": True}, timeout=30) as r:
            list(r.iter_lines())

        async def one_prefill_job() -> None:
            nc = await nats.connect(s.nats.url)
            try:
                await nc.jetstream().publish(subjects.PREFILL_JOBS, encode(
                    PrefillJob(request_id=uuid.uuid4().hex, token_ids=list(range(1, 33)))), timeout=5)
            finally:
                await nc.close()

        anyio.run(one_prefill_job)

        # A stream's request is counted as its handler returns, just after the client has read it all.
        wait_until(lambda: value(scrape(s.port), "baton_frontend_requests_total", endpoint="/v1/completions",
                                 status="200") >= 6, 10, 0.05, "frontend request counter")
        fe = scrape(s.port)
        assert value(fe, "baton_frontend_time_to_first_token_seconds_count") >= 6
        assert value(fe, "baton_frontend_output_sequence_tokens_sum") >= 20
        assert value(fe, "baton_frontend_inter_token_latency_seconds_count") >= 1

        wait_until(lambda: value(scrape(s.metrics_ports["decode-0"]), "baton_worker_requests_total",
                                 role="decode", outcome="length") >= 5, 10, 0.1, "decode counters")
        # Engine gauges refresh with each load report (every second).
        wait_until(lambda: value(scrape(s.metrics_ports["decode-0"]), "baton_worker_prompt_tokens", role="decode") > 0,
                   10, 0.1, "engine gauges")
        dec = scrape(s.metrics_ports["decode-0"])
        assert value(dec, "baton_worker_kv_blocks_total", role="decode") > 0

        router = scrape(s.metrics_ports["router-0"])
        assert re.search(r"^baton_router_\w+ [1-9]", router, re.M) or re.search(
            r"^baton_router_\w+\{[^}]*\} [1-9]", router, re.M)

        wait_until(lambda: value(scrape(s.metrics_ports["prefill-0"]), "baton_prefill_jobs_total", outcome="done") >= 1,
                   30, 0.1, "prefill job counted")
        wait_until(lambda: value(scrape(s.metrics_ports["planner"]), "baton_planner_workers", role="decode") == 1,
                   15, 0.1, "planner sees the decode worker")
    finally:
        s.stop()
