"""Paged KV block accounting with prefix caching, shared by the torch engine and the mocker.

The pool is a fixed set of block ids; what a block id *holds* (tensors, or nothing at all for the
mocker) is the engine's business. Blocks are reference-counted so requests with a common prefix
share them. A full, computed block is cached under its chained hash (:mod:`shared.kv_hash`); when
its last user lets go it stays in the cache, free but reusable, until allocation needs it back
(least recently freed first). KV events are recorded exactly when a block enters the cache and
when a cached block is evicted, so the router's index mirrors this pool.

No torch here: the mocker must run the same accounting without it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from shared.kv_hash import ROOT_HASH, extend_hashes

if TYPE_CHECKING:
    from shared.engines.base import KvEventBuffer
    from shared.engines.kv_tiers import TieredKvStore


class SequenceBlocks(Protocol):
    """What the cache manager needs from a request (the scheduler's ``Request`` has these)."""

    token_ids: list[int]
    num_computed_tokens: int
    blocks: list[int]
    block_hashes: list[int]
    num_cached_blocks: int
    hash_root: int  # the chain's root: ROOT_HASH, or the request's LoRA adapter's (kv_hash.adapter_root)


class BlockIO(Protocol):
    """Reads and writes one block's bytes in an engine's pool (every layer, K then V)."""

    def read(self, block: int) -> bytes: ...

    def write(self, block: int, data: bytes) -> None: ...


class BlockPool:
    """A fixed pool of block ids: reference counts, the hash -> block cache and eviction."""

    def __init__(self, num_blocks: int, events: KvEventBuffer | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.events = events
        # Called with (block id, hash) just before a cached block is evicted and reused, so its
        # content can be offloaded to a lower tier (host, disk) first.
        self.on_evict: Callable[[int, int], None] | None = None
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks holding nothing worth keeping: handed out first, so cached content lives longest.
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields 0, 1, ...
        # Free blocks still holding cached content; iteration order is eviction order (oldest first).
        self._free_cached: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free(self) -> int:
        """Blocks that allocation can hand out (evicting cached content if it must)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        out: list[int] = []
        evicted: list[int] = []
        for _ in range(n):
            if self._free_plain:
                block = self._free_plain.pop()
            else:
                block, _ = self._free_cached.popitem(last=False)
                h = self.block_hash[block]
                assert h is not None
                if self.on_evict is not None:
                    self.on_evict(block, h)
                del self.cached[h]
                self.block_hash[block] = None
                evicted.append(h)
            self.ref_counts[block] = 1
            out.append(block)
        if evicted and self.events is not None:
            self.events.record_removed(evicted)
        return out

    def take(self, blocks: list[int]) -> None:
        """Add a reference to cached blocks (a prefix hit); free ones leave the free list."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free_cached[block]
            self.ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block of a sequence.

        The tail is released first so that, among one sequence's blocks, the tail is evicted
        before the head: a shared prefix (system prompt) is the part most worth keeping.
        """
        for block in reversed(blocks):
            rc = self.ref_counts[block] - 1
            self.ref_counts[block] = rc
            if rc == 0:
                if self.block_hash[block] is None:
                    self._free_plain.append(block)
                else:
                    self._free_cached[block] = None
            elif rc < 0:
                raise RuntimeError(f"KV block {block} freed twice")

    def cache(self, blocks: list[int], hashes: list[int], start: int, end: int) -> None:
        """Put ``blocks[start:end]`` (full and computed) into the cache under ``hashes[start:end]``.

        A hash already cached under another block (two sequences computed the same prefix at
        once) keeps its first block; this copy stays private and is never announced.
        """
        run: list[int] = []  # consecutive newly cached blocks, announced as one KvStored
        run_parent: int | None = hashes[start - 1] if start > 0 else None
        for i in range(start, end):
            block, h = blocks[i], hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
                run.append(h)
                continue
            if run and self.events is not None:
                self.events.record_stored(run, run_parent)
            run = []
            run_parent = h
        if run and self.events is not None:
            self.events.record_stored(run, run_parent)

    def lookup(self, hashes: list[int], max_blocks: int) -> list[int]:
        """Cached blocks for the longest prefix of ``hashes`` (at most ``max_blocks``)."""
        out: list[int] = []
        for h in hashes[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        return out


class KvCacheManager:
    """Per-request block tables on top of a :class:`BlockPool`, with prefix caching."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        events: KvEventBuffer | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Without prefix caching nothing is ever cached, so there is nothing to announce.
        self.pool = BlockPool(num_blocks, events if enable_prefix_caching else None)
        self.prefix_hit_tokens = 0  # cumulative, over first admissions
        self.tiers: TieredKvStore | None = None
        self.block_io: BlockIO | None = None
        self.onboarded_blocks = 0

    def attach_tiers(self, tiers: TieredKvStore, block_io: BlockIO) -> None:
        """Spill evicted cached blocks to ``tiers`` and bring prefix hits there back (onboard)."""
        if not self.enable_prefix_caching:
            return
        self.tiers, self.block_io = tiers, block_io
        self.pool.on_evict = lambda block, h: tiers.offload(h, block_io.read(block))

    def _onboard(self, hashes: list[int], hit: list[int]) -> int:
        """Copy blocks found in a lower tier into free blocks and cache them, in prefix order.

        The G1 hits and each onboarded block are referenced while this runs, so making room for
        the next block can never evict the prefix being assembled.
        """
        assert self.tiers is not None and self.block_io is not None
        pool = self.pool
        held = list(hit)
        pool.take(held)
        n = 0
        try:
            for h in hashes:
                if pool.num_free == 0:
                    break
                found = self.tiers.lookup(h)
                if found is None:
                    break  # a corrupt disk block also ends here: it is recomputed
                [block] = pool.allocate(1)
                held.append(block)
                self.block_io.write(block, found[1])
                pool.cache([block], [h], 0, 1)
                n += 1
        finally:
            pool.free(held)
        self.onboarded_blocks += n
        return n

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, seq: SequenceBlocks) -> list[int]:
        """Cached blocks covering the longest cached prefix of a sequence not yet computed.

        At least one token is always left to compute: its logits give the next token.
        """
        if not self.enable_prefix_caching:
            return []
        extend_hashes(seq.block_hashes, seq.token_ids, self.block_size, seq.hash_root)
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        hit = self.pool.lookup(seq.block_hashes, max_blocks)
        if self.tiers is not None and len(hit) < max_blocks:
            if self._onboard(seq.block_hashes[len(hit) : max_blocks], hit):
                hit = self.pool.lookup(seq.block_hashes, max_blocks)
        return hit

    def cached_prefix_tokens(self, token_ids: list[int], root: int = ROOT_HASH) -> int:
        """Prompt tokens a new request would be served from the cache now (full blocks, one token left)."""
        if not self.enable_prefix_caching or len(token_ids) <= self.block_size:
            return 0
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = extend_hashes([], token_ids[: max_blocks * self.block_size], self.block_size, root)
        n = len(self.pool.lookup(hashes, max_blocks))
        if self.tiers is not None:  # blocks a lower tier can bring back count as cached too
            while n < max_blocks and self.tiers.contains(hashes[n]):
                n += 1
        return n * self.block_size

    def allocate_slots(
        self, seq: SequenceBlocks, num_new_tokens: int, prefix_blocks: list[int] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``seq``; False (and no change) if the pool cannot.

        ``prefix_blocks`` (from :meth:`lookup_prefix`, only on admission) become the head of the
        sequence's block table and count as computed.
        """
        num_hit = len(prefix_blocks) if prefix_blocks else 0
        computed = seq.num_computed_tokens + num_hit * self.block_size
        need = -(-(computed + num_new_tokens) // self.block_size) - len(seq.blocks) - num_hit
        if need > 0 or num_hit:
            free = self.pool.num_free
            if num_hit:
                # Hit blocks sitting on the free list stop being allocatable once taken.
                ref_counts = self.pool.ref_counts
                free -= sum(1 for b in prefix_blocks if ref_counts[b] == 0)  # type: ignore[union-attr]
            if need > free:
                return False
        if num_hit:
            assert prefix_blocks is not None
            self.pool.take(prefix_blocks)
            seq.blocks.extend(prefix_blocks)
            seq.num_computed_tokens = computed
            seq.num_cached_blocks = num_hit
        if need > 0:
            seq.blocks.extend(self.pool.allocate(need))
        return True

    def cache_computed(self, seq: SequenceBlocks) -> None:
        """Cache the sequence's blocks that are now full and computed (call after each step)."""
        num_full = seq.num_computed_tokens // self.block_size
        if num_full > seq.num_cached_blocks and self.enable_prefix_caching:
            extend_hashes(seq.block_hashes, seq.token_ids, self.block_size, seq.hash_root)
            self.pool.cache(seq.blocks, seq.block_hashes, seq.num_cached_blocks, num_full)
            seq.num_cached_blocks = num_full

    def free(self, seq: SequenceBlocks) -> None:
        if seq.blocks:
            self.pool.free(seq.blocks)
            seq.blocks = []
        seq.num_cached_blocks = 0


def default_num_blocks(max_num_seqs: int, block_size: int, max_model_len: int | None = None) -> int:
    """Pool size when none is configured: every running sequence can hold 2048 tokens (or the model's max)."""
    per_seq = min(2048, max_model_len) if max_model_len else 2048
    return max(1, -(-max_num_seqs * per_seq // block_size))
