"""G4: KV blocks moved between decode workers' lower tiers (host memory, disk).

Both sides live here. A worker with tiers answers ``kv.fetch.<its id>``: how many of the asked
blocks it holds, then (asked again with ``send``) the bytes, over the KV transport. A worker given
a request with ``kv_source`` (the router saw the prompt's blocks there) pulls them into its own
host tier before admission, so its prefix lookup onboards them. Best effort both ways: a failed
or stale fetch costs a recompute, never a request.
"""

from __future__ import annotations

import logging

import anyio
from nats.aio.msg import Msg
from prometheus_client import Counter

from shared import subjects
from shared.bus import Bus
from shared.engines import Engine
from shared.kv_hash import block_hashes
from shared.kv_transport import KvTransport
from shared.messages import (
    GenerateRequest,
    KvFetchReply,
    KvFetchRequest,
    kv_fetch_reply_decoder,
    kv_fetch_request_decoder,
)

log = logging.getLogger("baton.decode.g4")

REMOTE_TIER_BLOCKS = Counter("baton_kv_remote_tier_blocks_total",
                             "G4: KV blocks pulled from peers' lower tiers, and served to peers", ["direction"])

PROBE_TIMEOUT_S = 1.0  # how many blocks a peer holds: a quick answer or none
SEND_TIMEOUT_S = 10.0  # the peer's send of the bytes
ARRIVE_TIMEOUT_S = 5.0


class PeerBlocks:
    """Serve our tier blocks to peers and pull a request's blocks from its ``kv_source``."""

    def __init__(self, bus: Bus, engine: Engine, transport: KvTransport, worker_id: str) -> None:
        self.bus = bus
        self.engine = engine
        self.transport = transport
        self.worker_id = worker_id

    async def serve(self, msg: Msg) -> None:
        """A peer pulls blocks from our host/disk tiers: first how many we hold, then the bytes."""
        tiers = self.engine.kv_tiers
        assert tiers is not None
        try:
            req = kv_fetch_request_decoder.decode(msg.data)
            if req.kv_layout != self.engine.kv_layout():
                raise ValueError(f"KV layout mismatch: {req.kv_layout!r} vs {self.engine.kv_layout()!r}")
            if not req.send:
                await self.bus.respond(msg, KvFetchReply(available=tiers.leading_available(req.block_hashes)))
                return
            # Disk reads and checksums happen off the event loop.
            found = await anyio.to_thread.run_sync(lambda: [tiers.lookup(h) for h in req.block_hashes])
            if any(f is None for f in found):
                raise ValueError("blocks left our tiers meanwhile")
            blocks = [memoryview(f[1]) for f in found]  # type: ignore[index]
            await self.transport.send(req.endpoint, req.transfer_id, blocks, timeout=SEND_TIMEOUT_S, token=req.token)
            REMOTE_TIER_BLOCKS.labels("served").inc(len(blocks))
            await self.bus.respond(msg, KvFetchReply(sent=len(blocks)))
        except Exception as e:  # a bad or stale fetch costs the peer a recompute, nothing more
            await self.bus.respond(msg, KvFetchReply(error=str(e)))

    def wants_pull(self, req: GenerateRequest) -> bool:
        return bool(req.kv_source) and req.kv_source != self.worker_id

    async def pull(self, req: GenerateRequest) -> int:
        """Before admission: copy the prompt's blocks that ``req.kv_source`` holds in its lower tiers
        (and we hold nowhere) into our host tier. Returns how many arrived; any failure: 0."""
        tiers = self.engine.kv_tiers
        assert tiers is not None
        bs = self.engine.block_size
        full = (len(req.token_ids) - 1) // bs
        ours = self.engine.cached_prefix_tokens(req.token_ids) // bs
        want = block_hashes(req.token_ids[: full * bs], bs)[ours : min(full, req.kv_source_blocks)]
        if not want:
            return 0
        layout = self.engine.kv_layout()
        subject = subjects.kv_fetch(req.kv_source)
        try:
            probe = kv_fetch_reply_decoder.decode((await self.bus.request(
                subject, KvFetchRequest(transfer_id="", block_hashes=want, kv_layout=layout),
                timeout=PROBE_TIMEOUT_S)).data)
            n = probe.available
            if probe.error or n == 0:
                return 0
            block_bytes = sum(len(v) for v in self.engine.kv_views([0]))
            bufs = [bytearray(block_bytes) for _ in range(n)]
            tid = f"g4-{req.request_id}"
            token = self.transport.expect(tid, [memoryview(b) for b in bufs]).token
            try:
                reply = kv_fetch_reply_decoder.decode((await self.bus.request(subject, KvFetchRequest(
                    transfer_id=tid, block_hashes=want[:n], kv_layout=layout, endpoint=self.transport.endpoint,
                    token=token, send=True), timeout=SEND_TIMEOUT_S)).data)
                if reply.error or reply.sent != n:
                    raise RuntimeError(reply.error or f"peer sent {reply.sent} of {n} blocks")
                await self.transport.wait(tid, timeout=ARRIVE_TIMEOUT_S)
            finally:
                self.transport.forget(tid)
        except Exception as e:
            log.info("pulling %d blocks from %s failed (%r); computing them", len(want), req.kv_source, e)
            return 0
        # Storing may demote blocks to disk: off the event loop.
        pairs = list(zip(want[:n], map(bytes, bufs), strict=True))
        await anyio.to_thread.run_sync(tiers.import_blocks, pairs)
        REMOTE_TIER_BLOCKS.labels("pulled").inc(n)
        return n
