"""NATS credentials and TLS on every service's connection; wrong credentials fail fast and clearly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import msgspec
import nats
import pytest

from baton.nats_server import EmbeddedNats, free_port
from shared import nats_auth, subjects
from tests.conftest import e2e_engine
from tests.procs import ServiceProcess, Stack, running, service_env, wait_until
from tests.test_baton_up import children_of

pytestmark = pytest.mark.timeout(180)


def test_wrong_credentials_exit_fast_with_a_clear_message(tmp_path) -> None:
    with EmbeddedNats(data_dir=tmp_path / "nats", extra_args=["--user", "baton", "--pass", "s3cret"]) as server:
        p = ServiceProcess("router", ["--nats-url", server.url], tmp_path / "router.log",
                           env={"BATON_NATS_USER": "baton", "BATON_NATS_PASSWORD": "wrong"}).start()
        t0 = time.monotonic()
        try:
            assert p.proc.wait(15) == 2
        finally:
            p.kill()  # never leave it behind, whatever happened
        assert time.monotonic() - t0 < 10
        assert "refused our credentials" in p.log()
        assert "Traceback" not in p.log()


def test_stack_over_password_auth(tmp_path) -> None:
    """One shared user/password (a NATS server configured elsewhere) still works."""
    s = Stack(tmp_path, e2e_engine(), env={"BATON_NATS_USER": "baton", "BATON_NATS_PASSWORD": "s3cret"}, auth=False)
    s.nats.extra_args = ["--user", "baton", "--pass", "s3cret"]
    try:
        s.start()
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": "auth", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200
    finally:
        s.stop()


def make_certs(d) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    ca_key, ca, key, csr, cert = (str(d / n) for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
        "-subj", "/CN=baton-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
        "-days", "1", "-extfile", str(ext))
    return ca, cert, key


def test_stack_over_tls(tmp_path) -> None:
    ca, cert, key = make_certs(tmp_path)
    s = Stack(tmp_path, e2e_engine(), env={"BATON_NATS_TLS_CA": ca})
    s.nats.extra_args += ["--tls", "--tlscert", cert, "--tlskey", key]  # with the per-role identities
    s.nats.scheme = "tls"
    try:
        s.start()
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": "tls", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200
    finally:
        s.stop()


# --- per-role identities (shared/nats_auth.py): what an outsider or a low role cannot do ------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A stack with NATS authentication on (the default) and disaggregated prefill."""
    with running(Stack(tmp_path_factory.mktemp("secured"), e2e_engine(), prefill_workers=1)) as s:
        yield s


def test_services_are_refused_nothing(secured: Stack) -> None:
    """Generate, disaggregated prefill, KV events, discovery and the planner's reads all ran under
    per-role permissions: the server logged no violation at all."""
    assert completion_ok(secured)
    assert httpx.get(f"{secured.url}/health", timeout=5).status_code == 200
    assert secured.nats.violations() == []


def completion_ok(s: Stack) -> bool:
    r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": "still here", "max_tokens": 2},
                   timeout=30)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


async def _connect(url: str, **opts) -> tuple[nats.NATS, list[str]]:
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e).lower())

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=3, **opts)
    return nc, errors


def test_no_credentials_no_connection(secured: Stack) -> None:
    async def main() -> None:
        for opts in ({}, {"user": "client", "password": "guessed"}, {"user": "admin", "password": ""}):
            with anyio.fail_after(20):
                with pytest.raises(Exception) as refused:  # nats-py raises its own types here
                    nc, _ = await _connect(secured.nats.service_url, max_reconnect_attempts=0, **opts)
                    await nc.close()
            assert "authoriz" in f"{type(refused.value).__name__} {refused.value}".lower() or \
                isinstance(refused.value, nats.errors.NoServersError)

    anyio.run(main)
    assert completion_ok(secured)


@pytest.mark.parametrize("role", ["frontend", "client"])
def test_low_roles_cannot_read_prompts_impersonate_workers_or_take_jobs(secured: Stack, role: str) -> None:
    """With the frontend's or an API client's identity: no generate traffic, no KV fetch, no fake load
    report, no prefill stream. Watched by an admin connection, while real requests keep flowing."""
    from shared.messages import KvFetchRequest, LoadReport, encode

    before = len(secured.nats.violations())

    async def main() -> None:
        admin = await nats.connect(secured.nats.url)
        spy, errors = await _connect(secured.nats.service_url, **secured.nats.connect_options(role))
        try:
            seen_loads: list[bytes] = []
            seen_fetches: list[bytes] = []
            await admin.subscribe(subjects.LOAD_ALL, cb=collector(seen_loads))
            await admin.subscribe(subjects.kv_fetch("*"), cb=collector(seen_fetches))
            await admin.flush()

            # 1. Reading prompts: a subscription on every worker's generate subject is refused.
            stolen: list[bytes] = []
            await spy.subscribe(subjects.generate("*"), cb=collector(stolen))
            await spy.subscribe(subjects.PREFILL_JOBS, cb=collector(stolen))
            # 2. A KV fetch (would make a worker send blocks to our endpoint) and a fake load report.
            fetch = KvFetchRequest(transfer_id="evil", block_hashes=[1, 2, 3], endpoint="tcp://127.0.0.1:9", send=True)
            await spy.publish(subjects.kv_fetch("decode-x"), encode(fetch))
            fake = LoadReport(worker_id="decode-fake", role="decode", timestamp=time.time(), kv_blocks_total=1 << 20)
            await spy.publish(subjects.load("decode-fake"), encode(fake))
            await spy.flush()

            # Real traffic meanwhile: a prompt through HTTP (it rides generate.* and the prefill stream).
            assert await anyio.to_thread.run_sync(completion_ok, secured)

            # 3. The prefill stream: neither its info, a consumer on it, nor a pull.
            js = spy.jetstream(timeout=2)
            for attempt in (js.stream_info(subjects.PREFILL_STREAM),
                            js.pull_subscribe(subjects.PREFILL_JOBS, durable=subjects.PREFILL_CONSUMER,
                                              stream=subjects.PREFILL_STREAM),
                            js.add_consumer(subjects.PREFILL_STREAM)):
                with pytest.raises(Exception):  # noqa: B017 - refused: nats-py times out on a dropped request
                    await attempt
            await spy.flush()
            await admin.flush()

            def refused(what: str, subject: str) -> bool:
                return any(f"permissions violation for {what} to \"{subject.lower()}" in e for e in errors)

            assert refused("subscription", subjects.generate("*")), errors
            assert refused("subscription", subjects.PREFILL_JOBS), errors
            assert refused("publish", subjects.kv_fetch("decode-x")), errors
            assert refused("publish", subjects.load("decode-fake")), errors
            assert refused("publish", f"$JS.API.STREAM.INFO.{subjects.PREFILL_STREAM}"), errors
            assert stolen == []
            assert seen_fetches == []
            assert not any(b"decode-fake" in d for d in seen_loads)
        finally:
            await spy.close()
            await admin.close()

    anyio.run(main)
    assert completion_ok(secured)
    assert [p.log_path.name for p in secured.procs if not p.alive()] == []
    # Every violation since is the spy's, none a service's.
    assert all(f'"$G/user:{role}"' in v for v in secured.nats.violations()[before:])


def collector(out: list[bytes]):
    async def cb(msg) -> None:
        out.append(msg.data)

    return cb


def test_client_identity_may_use_the_request_api(secured: Stack) -> None:
    from shared.messages import ApiChunk, ApiError, ApiGenerateRequest, api_reply_msgpack_decoder

    async def main() -> None:
        nc, errors = await _connect(secured.nats.service_url, **secured.nats.connect_options("client"))
        try:
            req = ApiGenerateRequest(prompt="hello", max_tokens=3, stream=False)
            msg = await nc.request(subjects.API_GENERATE, msgspec.msgpack.encode(req), timeout=30)
            reply = api_reply_msgpack_decoder.decode(msg.data)
            assert isinstance(reply, ApiChunk) and not isinstance(reply, ApiError)
            assert reply.usage.completion_tokens >= 1
            assert errors == []
        finally:
            await nc.close()

    anyio.run(main)


def test_baton_up_keeps_secrets_off_command_lines_and_out_of_logs(tmp_path) -> None:
    """`baton up` hands every child its credentials as a file *path*: no generated password (nor its
    hash) is on any child's command line or in its environment, in baton up's output, or in any log."""
    store, logs = tmp_path / "store", tmp_path / "logs"
    http_port = free_port()
    out = tmp_path / "up.log"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "baton", "up", "--engine", "mocker", "--port", str(http_port), "--host",
             "127.0.0.1", "--nats-port", str(free_port()), "--data-dir", str(store), "--log-dir", str(logs),
             "--discovery-ttl", "3"],
            stdout=sink, stderr=subprocess.STDOUT, env=service_env(), start_new_session=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, out.read_text()
            return "Baton is ready" in out.read_text()

        wait_until(ready, 120, 0.1, "baton up ready")
        base = f"http://127.0.0.1:{http_port}"
        r = httpx.post(f"{base}/v1/completions", json={"model": "baton-tiny", "prompt": "hi", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 200, r.text
        # Every service is up and connected (with its identity) before we look.
        wait_until(lambda: httpx.get(f"{base}/health", timeout=5).json().get("prefill_workers") == 1, 60, 0.1,
                   "prefill worker registered")
        creds = sorted((store / "auth").glob("*.creds"))
        assert {p.stem for p in creds} == set(nats_auth.ROLES)
        secrets = {p.stem: nats_auth.read_credentials(p).password for p in creds}
        conf = (store / "auth" / "nats-auth.conf").read_text()
        hashes = re.findall(r'"password": "([^"]+)"', conf)
        assert len(hashes) == len(nats_auth.ROLES) and all(h.startswith("$2") for h in hashes)
        assert all(len(s) >= 32 for s in secrets.values())
        needles = [s.encode() for s in (*secrets.values(), *hashes)]

        kids = children_of(proc.pid)
        seen: dict[str, bytes] = {}
        for pid in kids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue  # exited meanwhile (e.g. a short-lived helper)
            seen[cmdline.replace(b"\0", b" ").decode(errors="replace")] = environ
            for needle in needles:
                assert needle not in cmdline, f"a secret on the command line of {cmdline!r}"
                assert needle not in environ, f"a secret in the environment of {cmdline!r}"
        names = " ".join(seen)
        assert "nats-server" in names and "auth/nats-auth.conf" in names, names
        for service in ("frontend", "router", "decode", "prefill", "planner"):
            assert f"services.{service}" in names, (service, names)
        # Each service got its own role's file (a path) and the planner nobody's password either.
        for cmdline, environ in seen.items():
            role = next((r for r in nats_auth.SERVICE_ROLES if f"services.{r}" in cmdline), None)
            if role:
                assert f"BATON_NATS_CREDS={store / 'auth' / role}.creds".encode() in environ, cmdline

        # Logs: baton up's own output and every file under --log-dir (nats-server's included).
        files = [out, *(p for p in logs.rglob("*") if p.is_file())]
        assert any(p.name == "nats.log" for p in files) and len(files) >= 7, files
        for path in files:
            text = path.read_bytes()
            for needle in needles:
                assert needle not in text, f"a secret in {path}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
