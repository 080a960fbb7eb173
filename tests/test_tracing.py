"""One request through ``baton up`` yields one trace with spans from frontend, router and decode,
joined through W3C traceparent headers on NATS; the trace id comes back in a response header."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from tests.procs import wait_until
from tests.test_baton_up import start_up, wait_ready_line

pytestmark = pytest.mark.timeout(180)


def spans(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_one_trace_across_services(tmp_path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    proc, http_port, _ = start_up(tmp_path, ["--prefill-workers", "0"], env={"BATON_TRACE_FILE": str(trace_file)})
    try:
        wait_ready_line(tmp_path, proc)
        r = httpx.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", json={
            "model": "baton-tiny", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 4},
            headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, timeout=60)
        assert r.status_code == 200
        trace_id = r.headers["x-trace-id"]
        assert trace_id == "0af7651916cd43dd8448eb211c80319c"  # the caller's trace is continued

        def mine() -> list[dict]:
            return [s for s in spans(trace_file) if s["trace_id"] == trace_id]

        # The root (HTTP) span ends after the response went out, so it may be written last.
        wait_until(lambda: {"baton-frontend", "baton-router", "baton-decode"} <= {s["service"] for s in mine()}
                   and any(s["name"] == "POST /v1/chat/completions" for s in mine()),
                   20, 0.1, "spans from frontend (the root too), router and decode")
        by_id = {s["span_id"]: s for s in mine()}
        names = {(s["service"], s["name"]) for s in mine()}
        assert ("baton-frontend", "POST /v1/chat/completions") in names
        root = next(s for s in mine() if s["name"] == "POST /v1/chat/completions")
        assert root["parent_id"] == "b7ad6b7169203331"
        assert root["attributes"]["gen_ai.request.model"] == "baton-tiny"
        # The router's span hangs under the frontend's route span, the decode span under generate.
        router = next(s for s in mine() if s["service"] == "baton-router")
        assert by_id[router["parent_id"]]["name"] == "route"
        decode = next(s for s in mine() if s["service"] == "baton-decode")
        assert by_id[decode["parent_id"]]["name"] == "generate"
        assert by_id[by_id[decode["parent_id"]]["parent_id"]]["span_id"] == root["span_id"]
        assert decode["attributes"]["gen_ai.usage.output_tokens"] >= 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
