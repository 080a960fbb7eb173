"""Helpers for the bus chaos tests: a clustered NATS for tests.procs.Stack, an HTTP load that records
every outcome, a prefill-job publisher that remembers what JetStream acknowledged, and who is
connected to which server (each server's /connz)."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import nats

from baton.nats_server import EmbeddedCluster, EmbeddedNats
from shared import nats_auth, subjects
from shared.messages import PrefillJob, encode, prefill_job_decoder


class ClusterNats(EmbeddedCluster):
    """Three (``size``) clustered nats-servers with Baton's per-role identities: the interface of
    tests.procs.StackNats, so a Stack runs on it (``stack.nats = ClusterNats(...)``)."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        super().__init__(size, data_dir=workdir / "nats-cluster", log_dir=workdir / "logs")
        self.identities = nats_auth.generate(workdir / "nats-auth")
        self.set_extra_args(["-c", str(self.identities.server_config)])

    @property
    def service_url(self) -> str:
        return self.url

    def admin_options(self) -> dict[str, str]:
        """``nats.connect`` options of the operator identity (not in the URLs: a server the cluster
        gossips has a URL without them)."""
        return self.identities.credentials("admin").connect_options()

    def role_env(self, role: str) -> dict[str, str]:
        return nats_auth.service_env(self.identities, role)

    @property
    def log_file(self) -> str:
        return ", ".join(str(s.log_file) for s in self.servers)

    def violations(self) -> list[str]:
        out = []
        for s in self.servers:
            try:
                text = Path(s.log_file).read_text(errors="replace") if s.log_file else ""
            except FileNotFoundError:
                continue
            out += [line for line in text.splitlines() if "Violation" in line]
        return out

    def clients_of(self, server: EmbeddedNats) -> set[str]:
        """Names of the clients connected to ``server`` now (its monitoring endpoint)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/connz?limit=4096", timeout=2) as r:
            return {c.get("name", "") for c in json.load(r).get("connections", [])}

    def server_of(self, client_name: str) -> EmbeddedNats | None:
        for s in self.servers:
            if s.alive() and client_name in self.clients_of(s):
                return s
        return None


@dataclass
class Outcome:
    start: float
    end: float
    status: int  # 0: no HTTP answer at all
    error_type: str = ""
    message: str = ""

    @property
    def clean(self) -> bool:
        """Served, or refused the way a client retries (OpenAI's error object with 429/503)."""
        return self.status == 200 or (self.status in (429, 503) and bool(self.error_type))


PROMPT = " ".join(f"word{k}" for k in range(80))


@dataclass
class Load:
    """``clients`` threads posting small completions back to back until stopped."""

    url: str
    clients: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=15) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    # A shared prefix of several KV blocks, so a KV-aware router's index has entries, and
                    # a tail of its own, so every request stores new blocks (KV events keep flowing).
                    tail = " ".join(f"c{i}r{n}w{k}" for k in range(24))
                    r = http.post(f"{self.url}/v1/completions",
                                  json={"model": "baton-tiny", "prompt": f"{PROMPT} {tail}", "max_tokens": 4})
                    kind = message = ""
                    if r.status_code != 200:
                        try:
                            kind, message = r.json()["error"]["type"], r.json()["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            message = r.text[:200]
                    self.outcomes.append(Outcome(t0, time.monotonic(), r.status_code, kind, message))
                except httpx.HTTPError as e:
                    self.outcomes.append(Outcome(t0, time.monotonic(), 0, type(e).__name__))

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def served_since(self, t: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.start >= t and o.status == 200)

    def resumed_after(self, t_kill: float) -> float:
        """Seconds from the kill until serving resumed: the later of the last refusal's end and the
        end of the first request that both started after the kill and was served."""
        first = min((o.end for o in list(self.outcomes) if o.start >= t_kill and o.status == 200), default=None)
        if first is None:
            return float("inf")
        return max(first - t_kill, self.recovery_after(t_kill))

    def recovery_after(self, t_kill: float) -> float:
        """Seconds from the kill to the end of the last request that was not served (0: none failed)."""
        failed = [o.end for o in list(self.outcomes) if o.end >= t_kill and o.status != 200]
        return max(failed) - t_kill if failed else 0.0

    def longest_gap_after(self, t_kill: float, window: float = 5.0) -> float:
        """The longest time, from the kill on, without any request completing successfully: the
        outage as a client sees it (it counts a request stalled by the failover, which never fails)."""
        ends = sorted(o.end for o in list(self.outcomes) if o.status == 200 and t_kill <= o.end <= t_kill + window)
        edges = [t_kill, *ends]
        return max((b - a for a, b in itertools.pairwise(edges)), default=window)

    def refusals(self) -> dict[str, int]:
        """Why requests were refused: status and the message's first words, counted."""
        out: dict[str, int] = {}
        for o in self.failed():
            key = f"{o.status} {' '.join(o.message.split()[:4])}"
            out[key] = out.get(key, 0) + 1
        return out

    def unclean(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if not o.clean]

    def failed(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.status != 200]


class JobPublisher:
    """Publishes prefill jobs through whatever happens to the servers; remembers each one JetStream
    acknowledged, by stream sequence, so a test can check that every one is still there."""

    def __init__(self, urls: list[str], **connect_options: str) -> None:
        self.urls = urls
        self.options = connect_options  # credentials as options: they then apply to every server
        self.acked: dict[int, str] = {}  # stream seq -> request id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: anyio.run(self._main), daemon=True)

    async def _main(self) -> None:
        nc = await nats.connect(servers=self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
                                connect_timeout=2, **self.options)
        js = nc.jetstream()
        try:
            while not self._stop.is_set():
                job = PrefillJob(request_id=uuid.uuid4().hex, token_ids=[1, 2, 3, 4])
                try:
                    ack = await js.publish(subjects.PREFILL_JOBS, encode(job), timeout=1)
                    self.acked[ack.seq] = job.request_id
                except Exception:
                    await anyio.sleep(0.05)  # not acknowledged: no promise was made about it
                await anyio.sleep(0.01)
        finally:
            await nc.close()

    def __enter__(self) -> JobPublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def missing(self) -> list[int]:
        """Acknowledged jobs no longer in the prefill stream (nothing consumes it in these tests)."""

        async def main() -> list[int]:
            nc = await nats.connect(servers=self.urls, connect_timeout=2, **self.options)
            js = nc.jetstream()
            lost = []
            try:
                with anyio.fail_after(60):
                    for seq, rid in sorted(self.acked.items()):
                        try:
                            msg = await js.get_msg(subjects.PREFILL_STREAM, seq)
                            if prefill_job_decoder.decode(msg.data).request_id != rid:
                                lost.append(seq)
                        except nats.js.errors.NotFoundError:
                            lost.append(seq)
            finally:
                await nc.close()
            return lost

        return anyio.run(main)
