"""The transport floor of Baton's design: an HTTP front and a worker that only relay over NATS.

``bench/overhead.py --sides floor`` runs this next to Baton and Dynamo. It is what any stack of
Baton's shape pays before doing any work: the client's HTTP request parsed, one job published to
a worker's subject through nats-server, the worker's reply published back to the front's inbox,
and the HTTP response written. No validation, tokenization, routing, engine or detokenization;
the replies are fixed token ids and the text a fixed string per id. Both processes are Python on
uvloop with nats-py, as Baton's are, and use the same tricks as Baton's hot path: handlers called
from the client's read loop, and one socket write per event-loop turn per process.

The worker answers a non-streamed job with one message (every token); a streamed job with two (the
first token at once, then the rest with the end), which is fewer than Baton sends at c = 64 (about
3.5 chunks a request with its 1 ms stream interval), so the floor is a lower bound.

    python bench/nats_floor.py worker --nats nats://127.0.0.1:4222
    python bench/nats_floor.py front --nats nats://127.0.0.1:4222 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import uvloop
from nats.protocol import command as prot_command

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared.bus import subscribe_direct

JOB_SUBJECT = "floor.job"
READY_SUBJECT = "floor.ready"  # the worker answers here once it listens for jobs
READY_TIMEOUT_S = 30.0
TOKENS = 16
WORDS = [f" w{i}" for i in range(TOKENS)]


class Job(msgspec.Struct, array_like=True):
    stream: bool
    max_tokens: int


class Reply(msgspec.Struct, array_like=True):
    token: str
    index: int
    token_ids: list[int]
    last: bool


class Publisher:
    """Publishes without a coroutine per message: protocol bytes into the client's buffer, one
    socket write per event-loop turn (what ``Bus.write_now`` does for Baton's worker)."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.nc._pending.append(prot_command.pub_cmd(subject, reply, payload))
        self.nc._pending_data_size += len(payload)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._scheduled = False
        nc = self.nc
        if nc._pending and nc._transport is not None:
            nc._transport.writelines(nc._pending[:])
            nc._pending = []
            nc._pending_data_size = 0


async def run_worker(url: str) -> None:
    nc = await nats.connect(url)
    pub = Publisher(nc)
    enc = msgspec.msgpack.Encoder()
    job_dec = msgspec.msgpack.Decoder(Job)
    ids = list(range(100, 100 + TOKENS))

    def on_job(msg: Any) -> None:
        job = job_dec.decode(msg.data)
        n = max(1, min(job.max_tokens, TOKENS))
        token = msg.reply.rpartition(".")[2]
        if job.stream:
            pub.publish(msg.reply, enc.encode(Reply(token, 0, ids[:1], n == 1)))
            if n > 1:
                pub.publish(msg.reply, enc.encode(Reply(token, 1, ids[1:n], True)))
        else:
            pub.publish(msg.reply, enc.encode(Reply(token, 0, ids[:n], True)))

    await subscribe_direct(nc, JOB_SUBJECT, on_job)

    async def on_ready(msg: Any) -> None:
        await msg.respond(b"")

    await nc.subscribe(READY_SUBJECT, cb=on_ready)
    await asyncio.Event().wait()


async def wait_for_worker(nc: Any, timeout: float = READY_TIMEOUT_S) -> None:
    """Return once a worker answers on :data:`READY_SUBJECT`: its job subscription is in place, so
    no job the front publishes after this is lost (nats-server drops a message nobody listens for)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await nc.request(READY_SUBJECT, b"", timeout=0.5)
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if loop.time() > deadline:
                raise TimeoutError(f"no floor worker answered on {READY_SUBJECT} in {timeout:.0f} s") from None
            await asyncio.sleep(0.05)


class Front:
    """A minimal HTTP/1.1 keep-alive server that relays each POST to the worker."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.pub = Publisher(nc)
        self.prefix = nc.new_inbox()
        self.waiting: dict[str, tuple[asyncio.Transport, bool]] = {}
        self.ids = itertools.count()
        self.enc = msgspec.msgpack.Encoder()
        self.reply_dec = msgspec.msgpack.Decoder(Reply)
        self.body_dec = msgspec.json.Decoder()

    async def start(self) -> None:
        await subscribe_direct(self.nc, f"{self.prefix}.*", self.on_reply)

    def submit(self, transport: asyncio.Transport, body: bytes) -> None:
        req = self.body_dec.decode(body)
        stream = bool(req.get("stream"))
        token = str(next(self.ids))
        self.waiting[token] = (transport, stream)
        self.pub.publish(JOB_SUBJECT, self.enc.encode(Job(stream, int(req.get("max_tokens", TOKENS)))),
                         reply=f"{self.prefix}.{token}")

    def on_reply(self, msg: Any) -> None:
        r = self.reply_dec.decode(msg.data)
        entry = self.waiting.get(r.token)
        if entry is None:
            return
        transport, stream = entry
        text = "".join(WORDS[i % TOKENS] for i in r.token_ids)
        if not stream:
            del self.waiting[r.token]
            body = msgspec.json.encode({"object": "text_completion", "choices": [
                {"index": 0, "text": text, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(r.token_ids)}})
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                            % (len(body), body))
            return
        event = b"data: " + msgspec.json.encode({"object": "text_completion", "choices": [
            {"index": 0, "text": text, "finish_reason": "length" if r.last else None}]}) + b"\n\n"
        if r.last:
            event += b"data: [DONE]\n\n"
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        if r.index == 0:
            chunk = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + chunk
        if r.last:
            del self.waiting[r.token]
            chunk += b"0\r\n\r\n"
        transport.write(chunk)


class Connection(asyncio.Protocol):
    def __init__(self, front: Front) -> None:
        self.front = front
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            assert self.transport is not None
            self.front.submit(self.transport, body)


async def run_front(url: str, port: int, ready_timeout: float = READY_TIMEOUT_S) -> None:
    nc = await nats.connect(url)
    await wait_for_worker(nc, ready_timeout)  # the front's port opens only when jobs have somewhere to go
    front = Front(nc)
    await front.start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(front), "127.0.0.1", port, backlog=1024)
    print(f"floor front ready on {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=("worker", "front"))
    ap.add_argument("--nats", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                    help="front: seconds to wait for a worker before giving up")
    args = ap.parse_args()
    uvloop.run(run_worker(args.nats) if args.role == "worker"
               else run_front(args.nats, args.port, args.ready_timeout))


if __name__ == "__main__":
    main()
