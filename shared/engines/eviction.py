"""Eviction policies for KV block tiers: LRU, and S3-FIFO (Yang et al., SOSP'23).

S3-FIFO keeps a small FIFO (10% of capacity) for new entries and a main FIFO for entries seen
again, plus a ghost queue of recently evicted keys. One-hit wonders (a prompt seen once) leave
through the small queue without pushing out blocks that are reused, such as a shared system
prompt; that is the access pattern of multi-turn chat and agents.

Both policies track keys only; the tiers hold the data.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Protocol


class EvictionPolicy(Protocol):
    capacity: int

    def __contains__(self, key: Hashable) -> bool: ...

    def __len__(self) -> int: ...

    def touch(self, key: Hashable) -> bool:
        """Record a hit on ``key``; False if it is not held."""
        ...

    def insert(self, key: Hashable) -> list[Hashable]:
        """Hold ``key`` (already held: a touch); returns the keys evicted to make room."""
        ...

    def remove(self, key: Hashable) -> None: ...


class LruPolicy:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def touch(self, key: Hashable) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False

    def insert(self, key: Hashable) -> list[Hashable]:
        if self.touch(key):
            return []
        self._keys[key] = None
        evicted = []
        while len(self._keys) > self.capacity:
            evicted.append(self._keys.popitem(last=False)[0])
        return evicted

    def remove(self, key: Hashable) -> None:
        self._keys.pop(key, None)


class S3FifoPolicy:
    def __init__(self, capacity: int, small_ratio: float = 0.1, max_freq: int = 3) -> None:
        self.capacity = capacity
        self.small_cap = max(1, int(capacity * small_ratio))
        self.max_freq = max_freq
        self._small: deque[Hashable] = deque()
        self._main: deque[Hashable] = deque()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._where: dict[Hashable, str] = {}  # key -> "s" | "m"

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def touch(self, key: Hashable) -> bool:
        if key in self._where:
            self._freq[key] = min(self._freq[key] + 1, self.max_freq)
            return True
        return False

    def insert(self, key: Hashable) -> list[Hashable]:
        if self.touch(key):
            return []
        evicted: list[Hashable] = []
        while len(self._where) >= self.capacity:
            evicted.extend(self._evict())
        self._freq[key] = 0
        if key in self._ghost:  # seen recently: straight into main
            del self._ghost[key]
            self._main.append(key)
            self._where[key] = "m"
        else:
            self._small.append(key)
            self._where[key] = "s"
        return evicted

    def _evict(self) -> list[Hashable]:
        if len(self._small) >= self.small_cap or not self._main:
            return self._evict_small()
        return self._evict_main()

    def _evict_small(self) -> list[Hashable]:
        while self._small:
            key = self._small.popleft()
            if self._where.get(key) != "s":
                continue  # removed meanwhile
            if self._freq[key] > 0:  # reused while new: promote
                self._freq[key] = 0
                self._main.append(key)
                self._where[key] = "m"
                if len(self._main) > self.capacity - self.small_cap:
                    return self._evict_main()
                continue
            self._drop(key)
            self._ghost[key] = None
            while len(self._ghost) > self.capacity:
                self._ghost.popitem(last=False)
            return [key]
        return self._evict_main()

    def _evict_main(self) -> list[Hashable]:
        while self._main:
            key = self._main.popleft()
            if self._where.get(key) != "m":
                continue
            if self._freq[key] > 0:  # second chance, one frequency unit at a time
                self._freq[key] -= 1
                self._main.append(key)
                continue
            self._drop(key)
            return [key]
        return []

    def _drop(self, key: Hashable) -> None:
        self._where.pop(key, None)
        self._freq.pop(key, None)

    def remove(self, key: Hashable) -> None:
        self._drop(key)  # its queue entry is skipped lazily


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    if name == "lru":
        return LruPolicy(capacity)
    if name in ("s3fifo", "s3-fifo"):
        return S3FifoPolicy(capacity)
    raise ValueError(f"unknown eviction policy {name!r}; choose lru or s3fifo")
