"""Workers' JSON log lines carry the id (and trace id) of the request they are handling.

Real processes: nats-server, router, frontend, a decode and a prefill worker (mocker engine) with
``--log-format json``; one chat request long enough to be prefilled remotely. The decode and the
prefill worker each log lines about it, and those lines carry the frontend's request id and the
caller's trace id, read from the contextvars the handlers bind.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.procs import Stack, wait_until

pytestmark = pytest.mark.timeout(120)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))  # every line that looks like JSON must be JSON
    return out


def test_worker_json_logs_carry_the_request_id(tmp_path) -> None:
    stack = Stack(tmp_path, "mocker", decode_workers=1, prefill_workers=1,
                  extra_decode_args=["--remote-prefill-min-tokens", "16", "--prefill-timeout", "20"],
                  env={"BATON_LOG_FORMAT": "json", "BATON_LOG_LEVEL": "debug",
                       "BATON_TRACE_FILE": str(tmp_path / "spans.jsonl")})
    try:
        stack.start(ready_timeout=60)
        # The stack waits for decode workers only: a prefill worker that registers after the
        # request arrives leaves it prefilled locally, and the prefill worker with nothing to log.
        wait_until(lambda: stack.health().get("prefill_workers") == 1, 60, 0.1, "prefill worker registered")
        prompt = " ".join(f"word{i}" for i in range(120))
        r = httpx.post(f"{stack.url}/v1/chat/completions", json={
            "model": "baton-tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4},
            headers={"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"}, timeout=60)
        assert r.status_code == 200, r.text
        request_id = r.json()["id"]
        decode, prefill = stack.decoders[0], stack.prefillers[0]

        def about(proc) -> list[dict]:
            return [ln for ln in json_lines(proc.log()) if ln.get("request_id") == request_id]

        wait_until(lambda: any(ln["message"].startswith("generate finished") for ln in about(decode)),
                   10, 0.1, "decode's log line about the request")
        wait_until(lambda: any(ln["message"].startswith("prefill job done") for ln in about(prefill)),
                   10, 0.1, "prefill's log line about the request")
        for proc, service in ((decode, "decode"), (prefill, "prefill")):
            lines = about(proc)
            assert all(ln["trace_id"] == TRACE_ID and ln["service"] == service for ln in lines), lines
            assert all(ln["pid"] == proc.pid for ln in lines)
        # Lines not about a request (startup, registration) carry no request id.
        startup = [ln for ln in json_lines(decode.log()) if "serving" in ln["message"]]
        assert startup and all("request_id" not in ln for ln in startup)
    finally:
        stack.stop()
