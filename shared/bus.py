"""The NATS bus: connect with reconnect, request with timeout, streamed replies, JetStream setup.

A thin layer over nats-py. Messages are msgspec Structs encoded as msgpack
(:func:`shared.messages.encode`); decoders are chosen by the caller, who knows the subject.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.protocol.command import pub_cmd

from shared import nats_auth, probe, redact
from shared.messages import GenerateError, ReplyBatch, TokenChunk, encode, generate_reply_decoder

log = logging.getLogger("baton.bus")

NO_RESPONDERS = "503"


class BusError(Exception):
    """The bus could not carry a message: not connected, timed out, or nobody listening."""


class BusAuthError(BusError):
    """NATS refused our credentials: retrying cannot help, so services exit at once."""


@dataclass(frozen=True)
class NatsSecurity:
    """Credentials and TLS for the NATS connection, from ``BATON_NATS_*`` variables.

    Credentials may also ride in the URL (``nats://user:pass@host:4222``, ``nats://token@host``).
    """

    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None  # a Baton credentials file (shared/nats_auth.py) or a NATS .creds (JWT)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls) -> NatsSecurity:
        env = os.environ.get
        return cls(user=env("BATON_NATS_USER"), password=env("BATON_NATS_PASSWORD"), token=env("BATON_NATS_TOKEN"),
                   creds_file=env("BATON_NATS_CREDS"), tls_ca=env("BATON_NATS_TLS_CA"),
                   tls_cert=env("BATON_NATS_TLS_CERT"), tls_key=env("BATON_NATS_TLS_KEY"))

    def connect_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token:
            opts["token"] = self.token
        if self.creds_file:
            opts.update(_creds_file_options(self.creds_file))
        if self.tls_ca or self.tls_cert:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            opts["tls"] = ctx
        return opts


# How long a request made while the client is reconnecting waits for the new connection before
# failing: a failover to another server of a cluster, or a restarted embedded server, takes well
# under a second; a bus that stays away still fails the request fast.
RECONNECT_GRACE_S = 1.5

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds a service waits for NATS at start (BATON_NATS_CONNECT_TIMEOUT)
ATTEMPT_BUDGET = 3.0  # seconds one connection attempt may take within that


def connect_timeout_from_env() -> float:
    try:
        return float(os.environ.get("BATON_NATS_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT))
    except ValueError:
        return DEFAULT_CONNECT_TIMEOUT


def parse_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """Several NATS servers, comma-separated (``nats://a:4222,nats://b:4222``) or a list of such
    strings: the servers of one cluster, tried in turn and on every reconnect."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u.strip() for item in items for u in item.split(",") if u.strip()]
    if not out:
        raise ValueError("no NATS URL given (--nats-url / BATON_NATS_URL)")
    return out


DEFAULT_JS_REPLICAS = 1


def js_replicas_from_env() -> int:
    """``BATON_JS_REPLICAS``: replicas of every stream and bucket this process creates (1..5)."""
    raw = os.environ.get("BATON_JS_REPLICAS", "")
    try:
        n = int(raw) if raw.strip() else DEFAULT_JS_REPLICAS
    except ValueError:
        raise ValueError(f"BATON_JS_REPLICAS must be a whole number 1..5, not {raw!r}") from None
    if not 1 <= n <= 5:
        raise ValueError(f"BATON_JS_REPLICAS must be 1..5 (JetStream's range), not {n}")
    return n


def _reason(error: BaseException | None) -> str:
    """An error as an operator reads it: 'Connection refused', not 'None' or a repr."""
    if error is None:
        return "no answer"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error) or type(error).__name__
    return text.removeprefix("nats: ")


def _creds_file_options(path: str) -> dict[str, Any]:
    """Connect options from a credentials file: a Baton one (user, password, own inbox prefix) or a
    NATS decentralised-auth ``.creds`` (JWT + nkey seed). The file's content never reaches a log."""
    try:
        text = open(path).read()
    except OSError as e:
        raise BusAuthError(f"cannot read NATS credentials file {path}: {e.strerror}") from None
    if nats_auth.too_open(path):
        log.warning("NATS credentials file %s is readable by group/others; chmod 600 it", path)
    if nats_auth.is_nats_jwt_creds(text):
        return {"user_credentials": path}
    try:
        creds = nats_auth.parse_credentials(text, path)
    except nats_auth.CredentialsError as e:
        raise BusAuthError(str(e)) from None
    return creds.connect_options()


async def _connect_once(
    urls: list[str], name: str, budget: float, secure: dict[str, Any], **callbacks: Any
) -> tuple[NatsClient | None, BaseException | None, list[BaseException]]:
    """One bounded connection attempt: (client or None, the error, auth failures seen)."""
    auth_failed: list[BaseException] = []
    refused = anyio.Event()
    nc: NatsClient | None = None
    error: BaseException | None = None

    async def first_error_cb(e: Exception) -> None:
        nonlocal error
        error = e  # nats-py retries inside connect(); keep why, or the reason is lost at the deadline
        if _is_auth_failure(e):
            auth_failed.append(e)
            refused.set()

    async with anyio.create_task_group() as tg:

        async def attempt() -> None:
            nonlocal nc, error
            try:
                # Reconnects forever, to any server of the list (and those the cluster gossips), each
                # attempt bounded at 1 s (an attempt that hangs, e.g. on a server still starting,
                # must not hold a failover past RECONNECT_GRACE_S). Pings every 2 s, 2 missed: a server that died
                # without closing its sockets (a lost host) is given up within ~4-6 s.
                nc = await nats.connect(
                    servers=urls, name=name, connect_timeout=1, allow_reconnect=True, max_reconnect_attempts=-1,
                    reconnect_time_wait=0.2, ping_interval=2, max_outstanding_pings=2,
                    pending_size=64 * 1024 * 1024, error_cb=first_error_cb, **callbacks, **secure,
                )
            except Exception as e:  # nats-py raises several unrelated types here
                error = e
            else:
                error = None
            tg.cancel_scope.cancel()

        async def watch_refusal() -> None:
            # nats-py keeps retrying a refused login inside connect(): stop it at once.
            await refused.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(attempt)
        tg.start_soon(watch_refusal)
        with anyio.move_on_after(budget):
            await anyio.sleep_forever()
        tg.cancel_scope.cancel()
    return nc, error, auth_failed


def _is_auth_failure(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, nats.errors.AuthorizationError) or "authorization" in text or "authentication" in text


class BusTimeout(BusError):
    pass


class NoResponders(BusError):
    """Nobody subscribes to the subject (the worker is gone)."""


class SlowConsumer(BusError):
    """Replies arrived faster than the caller took them, past the stream's bound."""


# Marks put into a ReplyStream instead of a message.
_LOST = object()
_OVERFLOW = object()


def _payload(msg: msgspec.Struct | bytes) -> bytes:
    return msg if isinstance(msg, bytes | bytearray | memoryview) else encode(msg)


def is_no_responders(msg: Msg) -> bool:
    return not msg.data and bool(msg.headers) and msg.headers.get("Status") == NO_RESPONDERS


def _is_reply(item: Any) -> bool:
    """A reply to hand to the caller, not a marker (lost connection, overflow, no responders)."""
    if isinstance(item, msgspec.Struct):
        return True
    return item is not _LOST and item is not _OVERFLOW and not is_no_responders(item)


Reply = Msg | msgspec.Struct  # a raw message, or a reply the inbox already decoded out of a batch


def decoded(replies: Any, decoder: msgspec.msgpack.Decoder) -> list[Any]:
    """Replies as Structs: raw messages decoded with ``decoder``, batched ones already are."""
    return [r if isinstance(r, msgspec.Struct) else decoder.decode(r.data) for r in replies]


class ReplyStream:
    """Replies to one request, in order: raw messages, or Structs taken out of a ReplyBatch.

    A deque and one future rather than an asyncio.Queue with wait_for: this is on the per-token
    path, and wait_for costs a task per call. Bounded: a caller that stops taking replies (a
    slow HTTP client) gets SlowConsumer instead of letting this process's memory grow.
    """

    __slots__ = ("_deadline", "_items", "_max", "_timer", "_timer_at", "_waiter", "subject")

    def __init__(self, subject: str, max_pending: int) -> None:
        self.subject = subject
        self._items: deque[Any] = deque()
        self._max = max_pending
        self._waiter: asyncio.Future[None] | None = None
        # One timer per stream, moved only when it fires early: a streamed request waits several
        # times, and a timer made and cancelled per wait was a measurable share of the frontend.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _deliver(self, item: Any) -> None:
        if len(self._items) >= self._max and item is not _LOST:
            if self._items and self._items[-1] is _OVERFLOW:
                return  # already overflowed; next() reports it
            item = _OVERFLOW
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self, timeout: float) -> Reply:
        """The next reply. Raises BusTimeout after ``timeout`` s, NoResponders if none listen,
        BusError if the NATS connection was lost, SlowConsumer past the bound."""
        if not self._items:
            loop = asyncio.get_running_loop()
            self._waiter = fut = loop.create_future()
            self._deadline = deadline = loop.time() + timeout
            if self._timer is None or self._timer_at > deadline:
                self._arm(loop, deadline)
            try:
                await fut
            finally:
                self._waiter = None
            if not self._items:
                raise BusTimeout(f"no reply on {self.subject} within {timeout:.1f}s")
        return self._check(self._items.popleft())

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done():
            return  # nobody waits: the next wait arms a timer again
        if loop.time() >= self._deadline:
            w.set_result(None)  # timed out: next() finds no item
        else:  # armed for an earlier wait: on to this one's deadline
            self._arm(loop, self._deadline)

    def close(self) -> None:
        """No more waits: drop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self, item: Any) -> Reply:
        if item is _LOST:
            raise BusError("connection to NATS lost")
        if item is _OVERFLOW:
            raise SlowConsumer(f"more than {self._max} replies pending on {self.subject}")
        if not isinstance(item, msgspec.Struct) and is_no_responders(item):
            raise NoResponders(self.subject)
        return item

    def ready(self) -> list[Reply]:
        """Replies already here, without waiting: lets a caller coalesce a burst of chunks.
        Stops before any marker, so errors still surface through next()."""
        out: list[Reply] = []
        items = self._items
        while items and _is_reply(items[0]):
            out.append(items.popleft())
        return out


class _HandOver:
    """Stands in for a nats-py subscription's pending queue: the client's read loop hands each
    message to ``handler`` as it parses it. A queue and a task per subscription would cost one
    more event-loop turn per message, and a turn on a busy process is where latency goes.
    ``handler`` must be quick and must not block; what it raises is logged, never fatal."""

    def __init__(self, sub: Any, handler: Callable[[Msg], None]) -> None:
        self._sub = sub
        self._handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)  # never pending: counted in, counted out
        try:
            self._handler(msg)
        except Exception:
            log.exception("handler of %s failed", msg.subject)

    async def get(self) -> Msg:
        await asyncio.get_running_loop().create_future()  # nothing ever waits here
        raise AssertionError("unreachable")

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        return None


async def subscribe_direct(nc: NatsClient, subject: str, handler: Callable[[Msg], None], queue: str = "") -> Any:
    """Subscribe with a plain function called from the client's read loop (see :class:`_HandOver`),
    for the per-request hot paths: reply inboxes, a worker's job subject."""
    sub = await nc.subscribe(subject, queue=queue)
    sub._pending_queue = _HandOver(sub, handler)
    return sub


class ReplyInbox:
    """Two subscriptions that demultiplex streamed replies to many requests.

    - ``<prefix>.<token>``: one reply per message, to the request that opened ``token``;
    - ``<prefix>`` itself (:attr:`batch_subject`): a worker's replies to several of this process's
      requests in one message (a :class:`~shared.messages.ReplyBatch` per engine step, or a single
      reply), handed out by request id. A request whose worker batches gets every reply this way,
      so its replies keep their order (one subscription delivers in order; two need not).

    Subscribing once per process (not per request) keeps the hot path to a dict lookup per reply.
    """

    def __init__(self, nc: NatsClient, max_pending: int = 4096) -> None:
        self._nc = nc
        self._max_pending = max_pending
        self._prefix = nc.new_inbox()
        self.batch_subject = self._prefix
        self._streams: dict[str, ReplyStream] = {}
        self._subs: list[Any] = []

    async def start(self) -> None:
        self._subs = [await subscribe_direct(self._nc, f"{self._prefix}.*", self._on_msg),
                      await subscribe_direct(self._nc, self.batch_subject, self._on_batch)]

    def _on_msg(self, msg: Msg) -> None:
        stream = self._streams.get(msg.subject[len(self._prefix) + 1 :])
        if stream is not None:
            stream._deliver(msg)

    def _on_batch(self, msg: Msg) -> None:
        try:
            reply = generate_reply_decoder.decode(msg.data)
        except msgspec.DecodeError as e:  # a bug or a stranger on our inbox: the request's probes notice
            log.warning("undecodable batched reply on %s: %s", msg.subject, e)
            return
        if probe.on:  # the TTFT probe
            probe.delivered(reply)
        streams = self._streams
        for r in reply.replies if isinstance(reply, ReplyBatch) else (reply,):
            stream = streams.get(r.request_id)
            if stream is not None:
                stream._deliver(r)

    def fail_all(self) -> None:
        """The connection dropped: replies in flight are lost, so wake every waiter now."""
        for stream in self._streams.values():
            stream._deliver(_LOST)

    def open(self, token: str) -> ReplyStream:
        stream = ReplyStream(f"{self._prefix}.{token}", self._max_pending)
        self._streams[token] = stream
        return stream

    def close(self, token: str) -> None:
        stream = self._streams.pop(token, None)
        if stream is not None:
            stream.close()

    def __len__(self) -> int:
        return len(self._streams)


class ReplyBatcher:
    """A worker's replies to batching frontends, one message per destination per flush.

    An engine step wakes every running request in the same loop turn; each hands its chunk to
    :meth:`send`, and :meth:`run` (woken once) publishes what was gathered: one ReplyBatch per
    frontend instead of one message per request. Replies of one request keep their order.

    ``interval`` (seconds) spaces the flushes of middle tokens: when steps come faster than that
    (a tiny model, a CPU-bound mocker), a request's middle tokens of several steps leave as one
    chunk, so every hop downstream (nats-server, the frontend's text stream, the client's SSE
    reads) handles fewer, fuller deliveries. A request's first chunk, its last and any error go
    at once (with whatever that request had pending before them), so neither the time to first
    token nor the end of a request waits. Steps slower than the interval (a GPU decode step is
    several ms) are never held. ``run`` belongs in the worker's task group.
    """

    def __init__(self, bus: Bus, interval: float = 0.0) -> None:
        self._bus = bus
        self.interval = interval
        self._pending: dict[str, list[TokenChunk | GenerateError]] = {}
        self._urgent: set[str] = set()  # requests with a first or last chunk (or an error) pending
        self._wake = asyncio.Event()  # something is pending
        self._due = asyncio.Event()  # the interval is up, or an urgent reply came
        # True when the engine calls flush_urgent_now once a step's outputs are delivered: urgent
        # replies sent during a delivery (send(in_step=True)) then do not wake run().
        self.flushed_by_caller = False

    def send(self, subject: str, reply: TokenChunk | GenerateError, in_step: bool = False) -> None:
        """Queue one reply. ``in_step``: sent while an engine step delivers its outputs, so (with
        :attr:`flushed_by_caller`) an urgent one leaves with :meth:`flush_urgent_now` as the
        delivery ends, without waking :meth:`run`."""
        urgent = isinstance(reply, GenerateError) or reply.index == 0 or reply.finish_reason is not None
        by_caller = urgent and in_step and self.flushed_by_caller
        if urgent:
            self._urgent.add(reply.request_id)
            if not by_caller:
                self._due.set()
        batch = self._pending.get(subject)
        if batch is None:
            self._pending[subject] = [reply]
            if not by_caller:
                self._wake.set()
        else:
            batch.append(reply)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0  # the last full flush
        try:
            while True:
                await self._wake.wait()
                wait = last + self.interval - loop.time()
                if wait > 0:
                    if not self._urgent:
                        self._due.clear()
                        timer = loop.call_later(wait, self._due.set)
                        try:
                            await self._due.wait()
                        finally:
                            timer.cancel()
                    if self._urgent and loop.time() < last + self.interval:
                        await self._flush_urgent()
                        if not self._pending:
                            self._wake.clear()
                        continue
                self._wake.clear()
                self._due.clear()
                self._urgent.clear()
                last = loop.time()
                await self.flush()
        finally:  # stopping (drain): what the last requests handed over still goes out
            with anyio.move_on_after(1, shield=True):
                await self.flush()

    def flush_urgent_now(self) -> None:
        """The urgent replies (first and last chunks, errors) to the socket now, from the caller's
        turn: the engine calls this once its step, or its burst of near-free steps, has delivered
        (``Engine.on_delivered``), so a first or last token does not wait for this batcher's task
        and then the NATS client's flusher, two more event-loop turns. Middle tokens still wait
        for the interval. Not connected: left to :meth:`run`, which publishes through the
        client's reconnect buffer."""
        if not self._urgent:
            return
        if not self._bus.connected:
            self._due.set()  # run() publishes them, through the client's reconnect buffer
            self._wake.set()
            return
        self._publish_now(self._take_urgent())
        if self._pending:
            self._wake.set()  # the middle tokens sent alongside wait for the interval
        else:
            self._wake.clear()

    def _take_urgent(self) -> dict[str, list[TokenChunk | GenerateError]]:
        """Remove and return the urgent requests' replies; the others stay for the interval."""
        urgent, self._urgent = self._urgent, set()
        self._due.clear()
        now: dict[str, list[TokenChunk | GenerateError]] = {}
        for subject, replies in list(self._pending.items()):
            going = [r for r in replies if r.request_id in urgent]
            if not going:
                continue
            now[subject] = going
            staying = [r for r in replies if r.request_id not in urgent]
            if staying:
                self._pending[subject] = staying
            else:
                del self._pending[subject]
        return now

    async def _flush_urgent(self) -> None:
        """Publish the urgent requests' replies now; every other request's wait for the interval."""
        await self._publish(self._take_urgent())

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        await self._publish(pending)

    async def _publish(self, batches: dict[str, list[TokenChunk | GenerateError]]) -> None:
        if self._bus.connected:
            self._publish_now(batches)
            return
        if probe.on:  # the TTFT probe
            probe.flushing(batches)
        for subject, replies in batches.items():  # reconnecting: into the client's reconnect buffer
            try:
                await self._bus.publish(subject, _one_message(replies))
            except Exception as e:  # the bus is away: these requests' frontends probe and migrate them
                log.warning("batched replies to %s lost: %r", subject, e)

    def _publish_now(self, batches: dict[str, list[TokenChunk | GenerateError]]) -> None:
        """One message per destination, written to the socket before returning (no await, so no
        other flush can come between two of them)."""
        if probe.on:  # the TTFT probe
            probe.flushing(batches)
        bus = self._bus
        for subject, replies in batches.items():
            try:
                if not bus.publish_nowait(subject, _one_message(replies)):
                    log.warning("batched replies to %s lost: the bus went away", subject)
            except Exception as e:  # e.g. too large for the server: these requests' frontends time out and probe
                log.warning("batched replies to %s lost: %r", subject, e)
        bus.write_now()


def _one_message(replies: list[TokenChunk | GenerateError]) -> TokenChunk | GenerateError | ReplyBatch:
    if len(replies) > 1:
        replies = merge_chunks(replies)
    return replies[0] if len(replies) == 1 else ReplyBatch(replies=replies)


def merge_chunks(replies: list[TokenChunk | GenerateError]) -> list[TokenChunk | GenerateError]:
    """Consecutive chunks of one request's choice as one chunk (several steps' tokens gathered by
    an interval), each request's replies still in order."""
    out: list[TokenChunk | GenerateError] = []
    latest: dict[str, int] = {}  # request id -> position in out of its latest reply
    for r in replies:
        pos = latest.get(r.request_id)
        if pos is not None and isinstance(r, TokenChunk) and not r.prompt_logprobs:
            prev = out[pos]
            if (isinstance(prev, TokenChunk) and prev.choice == r.choice and prev.finish_reason is None
                    and prev.usage is None and r.index == prev.index + len(prev.token_ids)
                    and bool(prev.logprobs) == bool(r.logprobs)):
                out[pos] = TokenChunk(request_id=r.request_id, index=prev.index, token_ids=prev.token_ids + r.token_ids,
                                      finish_reason=r.finish_reason, usage=r.usage, choice=r.choice,
                                      logprobs=prev.logprobs + r.logprobs, prompt_logprobs=prev.prompt_logprobs)
                continue
        latest[r.request_id] = len(out)
        out.append(r)
    return out


class Bus:
    """A connected NATS client plus JetStream context and a shared reply inbox."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, inbox: ReplyInbox, js_replicas: int = 1) -> None:
        self.nc = nc
        self.js = js
        self.inbox = inbox
        self.reconnects = 0  # bumped on every reconnect
        self.js_replicas = js_replicas  # replicas of the streams and buckets this process creates
        self._up = anyio.Event()  # set while connected; replaced by an unset one on a disconnect
        self._up.set()
        self._ask_ids = itertools.count()  # tokens of ask()'s replies in the inbox
        self._write_soon = False  # publish_soon: a write is due at the end of this loop turn

    def _went_down(self) -> None:
        if self._up.is_set():
            self._up = anyio.Event()

    def _came_back(self) -> None:
        self.reconnects += 1  # JetStream consumers (KV watches) must be re-created
        self._up.set()

    async def wait_connected(self, timeout: float = RECONNECT_GRACE_S) -> bool:
        """True once connected (at once if we are), False if not within ``timeout``: lets a caller
        ride out a failover instead of failing the request it holds."""
        if self.nc.is_connected:
            return True
        if self.nc.is_closed:
            return False
        if self._up.is_set():
            # Down, but nats-py has not called disconnected_cb yet (it first waits for the old
            # socket to close): wait for the reconnected_cb from here.
            self._up = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._up.wait()
        return self.nc.is_connected

    @classmethod
    async def connect(
        cls,
        url: str | list[str],
        name: str,
        *,
        connect_timeout: float | None = None,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
        security: NatsSecurity | None = None,
        js_replicas: int | None = None,
    ) -> Bus:
        """Connect to one of the servers in ``url`` (comma-separated, or a list), retrying with backoff until ``connect_timeout`` (default: BATON_NATS_CONNECT_TIMEOUT,
        else 10 s): services may start a little before NATS.

        Once connected, the client reconnects forever (to another server of the list when its own
        dies); the reply inbox and every subscription are re-made on the new connection by nats-py;
        requests made while no server is reachable fail fast instead of hanging.
        ``js_replicas`` (default ``BATON_JS_REPLICAS``, else 1): see :mod:`shared.streams`.
        """
        urls = parse_urls(url)
        shown = redact.redact(",".join(urls))
        replicas = js_replicas_from_env() if js_replicas is None else js_replicas

        async def error_cb(e: Exception) -> None:
            if "permissions violation" in str(e).lower():
                # A subject this role's identity may not use (shared/nats_auth.py): a bug or a misconfig.
                log.warning("NATS refused: %s", e)
            else:
                log.debug("nats error: %r", e)

        inbox_ref: list[ReplyInbox] = []
        bus_ref: list[Bus] = []

        async def disconnected_cb() -> None:
            log.warning("disconnected from NATS")
            for bus in bus_ref:
                bus._went_down()
            for inbox in inbox_ref:
                inbox.fail_all()  # fail fast rather than wait out every timeout
            if on_disconnect:
                await on_disconnect()

        async def reconnected_cb() -> None:
            where = bus_ref[0].server_address if bus_ref else ""
            log.info("reconnected to NATS %s", where)
            for bus in bus_ref:
                bus._came_back()
            if on_reconnect:
                await on_reconnect()

        if connect_timeout is None:
            connect_timeout = connect_timeout_from_env()
        deadline = time.monotonic() + connect_timeout
        delay = 0.1
        secure = (security or NatsSecurity.from_env()).connect_options()
        anonymous = not ({"user", "token", "user_credentials"} & secure.keys()) and not any("@" in u for u in urls)
        while True:
            # Each attempt gets a slice of the budget, so the budget spans several attempts (a
            # server that comes up late is found) and the last attempt's reason is reported.
            nc, error, auth_failed = await _connect_once(
                urls, name, max(0.5, min(ATTEMPT_BUDGET, deadline - time.monotonic())), secure,
                disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
            )
            if nc is not None and nc.is_connected and not auth_failed:
                nc._error_cb = error_cb  # after the first connect, errors are only logged
                break
            if nc is not None:
                await nc.close()
            if auth_failed or (error is not None and _is_auth_failure(error)):
                what = "needs credentials: pass --nats-creds / BATON_NATS_CREDS" if anonymous else (
                    "refused our credentials; check --nats-creds / BATON_NATS_CREDS or the URL's user/password")
                raise BusAuthError(f"NATS at {shown} {what} "
                                   f"({redact.redact(repr((auth_failed or [error])[0]))})")
            if time.monotonic() + delay > deadline:
                raise BusError(f"cannot connect to NATS at {shown} within {connect_timeout:g}s "
                               f"({_reason(error)}); start nats-server there or fix --nats-url / BATON_NATS_URL "
                               f"(BATON_NATS_CONNECT_TIMEOUT sets the wait)")
            log.debug("NATS at %s not reachable yet (%s); retrying", shown, _reason(error))
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if anonymous:
            log.warning("connected to NATS at %s without credentials: this server has authentication off "
                        "(development only; see docs/operations.md, Security)", shown)
        inbox = ReplyInbox(nc)
        inbox_ref.append(inbox)
        await inbox.start()
        bus = cls(nc, nc.jetstream(timeout=5.0), inbox, replicas)
        bus_ref.append(bus)
        return bus

    async def close(self) -> None:
        """Flush what we published, then close. Not drain(): the service has already drained its
        own work, and draining a JetStream pull subscription can wait on messages never fetched."""
        with anyio.move_on_after(3, shield=True):
            try:
                if self.nc.is_connected:
                    await self.nc.flush(timeout=1)
            except Exception:  # the server is gone: nothing left to flush
                pass
            try:
                await self.nc.close()
            except Exception:
                pass

    @property
    def server_address(self) -> str:
        """host:port of the server this client is connected to now (no credentials)."""
        url = self.nc.connected_url
        return f"{url.hostname}:{url.port}" if url is not None else ""

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def publish(
        self, subject: str, msg: msgspec.Struct | bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        await self.nc.publish(subject, _payload(msg), reply=reply, headers=headers)

    async def request(
        self, subject: str, msg: msgspec.Struct | bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg:
        """One request, one reply. Raises BusTimeout or NoResponders; BusError if the client is
        not connected and does not reconnect within RECONNECT_GRACE_S."""
        if not self.nc.is_connected and not await self.wait_connected():
            raise BusError("not connected to NATS")
        try:
            return await self.nc.request(subject, _payload(msg), timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise NoResponders(subject) from None
        except nats.errors.TimeoutError:
            raise BusTimeout(f"no reply on {subject} within {timeout:.1f}s") from None

    async def ask(
        self, subject: str, msg: msgspec.Struct | bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Msg:
        """One request, one reply, like :meth:`request`, but the reply comes through this process's
        reply inbox (:class:`ReplyInbox`, already subscribed) instead of nats-py's request(): no
        wait_for and no second future per call, about a quarter less CPU per round trip on the
        frontend's route hop. Raises BusTimeout, NoResponders, or BusError (not connected, or
        the connection dropped while waiting)."""
        if not self.nc.is_connected and not await self.wait_connected():
            raise BusError("not connected to NATS")
        token = f"ask-{next(self._ask_ids)}"  # cannot collide with a request id (cmpl-/chatcmpl-/nats- + hex)
        stream = self.inbox.open(token)
        try:
            await self.nc.publish(subject, _payload(msg), reply=stream.subject, headers=headers)
            try:
                reply = await stream.next(timeout)
            except NoResponders:
                raise NoResponders(subject) from None
            except BusTimeout:
                raise BusTimeout(f"no reply on {subject} within {timeout:.1f}s") from None
            assert isinstance(reply, Msg)  # one reply per message on the token's own subject
            return reply
        finally:
            self.inbox.close(token)

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]], queue: str = "") -> Any:
        return await self.nc.subscribe(subject, queue=queue, cb=cb, pending_msgs_limit=65536)

    def publish_nowait(self, subject: str, msg: msgspec.Struct | bytes, reply: str = "") -> bool:
        """Queue a message for the socket without a coroutine, as :meth:`publish` would (no
        headers); it leaves with the next :meth:`write_now` or the client's flusher. False
        (nothing queued) while the client is not connected, closed or draining: then use
        :meth:`publish`, which buffers across a reconnect."""
        nc = self.nc
        if not nc.is_connected or nc.is_draining_pubs:
            return False
        payload = _payload(msg)
        if len(payload) > nc._max_payload:
            raise nats.errors.MaxPayloadError
        cmd = pub_cmd(subject, reply, payload)
        nc.stats["out_msgs"] += 1
        nc.stats["out_bytes"] += len(payload)
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        return True

    def publish_soon(self, subject: str, msg: msgspec.Struct | bytes, reply: str = "") -> bool:
        """Queue a message, as :meth:`publish_nowait`, to leave with this event-loop turn's other
        messages in one socket write as the turn ends: what nats-py's flusher does for
        :meth:`publish`, without its future, queue and task wake-up per message (a frontend's jobs).
        False (nothing queued): use :meth:`publish`."""
        if not self.publish_nowait(subject, msg, reply):
            return False
        if not self._write_soon:
            self._write_soon = True
            asyncio.get_running_loop().call_soon(self._write_turn)
        return True

    def _write_turn(self) -> None:
        self._write_soon = False
        self.write_now()

    def write_now(self) -> None:
        """Hand what the client has buffered to the socket now, not on its flusher task's next
        event-loop turn: for a burst that is complete (a worker's flush of one step's tokens)."""
        nc = self.nc
        transport = getattr(nc, "_transport", None)
        if not nc._pending or transport is None or not nc.is_connected:
            return  # nothing to write, or reconnecting: the flusher sends it once connected
        try:
            transport.writelines(nc._pending[:])
        except Exception:  # the flusher reports and handles a broken connection
            return
        nc._pending = []
        nc._pending_data_size = 0

    async def subscribe_direct(self, subject: str, handler: Callable[[Msg], None], queue: str = "") -> Any:
        """``handler`` runs in the client's read loop, one event-loop turn sooner than a callback."""
        return await subscribe_direct(self.nc, subject, handler, queue)

    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create a JetStream stream, or update it to ``config`` if it exists: idempotent."""
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            try:
                await self.js.update_stream(config)
            except BadRequestError as e:
                # Some fields (e.g. retention) cannot change; keep the existing stream.
                log.warning("stream %s exists with a different config: %s", config.name, e)
        except NotFoundError:
            raise

    async def respond(self, msg: Msg, reply: msgspec.Struct | bytes) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, _payload(reply))
