"""NATS credentials and TLS on every service's connection; wrong credentials fail fast and clearly."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from baton.nats_server import EmbeddedNats
from tests.conftest import e2e_engine
from tests.procs import ServiceProcess, Stack

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
    s = Stack(tmp_path, e2e_engine(), env={"BATON_NATS_USER": "baton", "BATON_NATS_PASSWORD": "s3cret"})
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
    s.nats.extra_args = ["--tls", "--tlscert", cert, "--tlskey", key]
    s.nats.scheme = "tls"
    try:
        s.start()
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "baton-tiny", "prompt": "tls", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200
    finally:
        s.stop()
