"""What the scheduler needs from a worker's LoRA adapters, without torch.

:class:`AdapterSlots` is the scheduler's view: a request ``acquire``s its adapter when it is
admitted (pinning it resident until ``release``). The torch engine's
:class:`~shared.engines.lora.LoraRegistry` implements it with real weights;
:class:`SimulatedAdapters` (the mocker) with the same LRU bookkeeping and a simulated load time, so
routing by adapter can be exercised and benchmarked without a model.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol


class UnknownAdapterError(LookupError):
    """No adapter by that name is loaded on this worker (a 404)."""

    def __str__(self) -> str:  # LookupError's str() would quote the message like a dict key
        return str(self.args[0]) if self.args else "unknown adapter"


class AdapterBusyError(RuntimeError):
    """Every resident adapter slot is pinned by running requests, or the adapter is being unloaded."""


class AdapterSlots(Protocol):
    def acquire(self, name: str) -> int:
        """Pin ``name`` resident for a request; its slot. UnknownAdapterError / AdapterBusyError."""
        ...

    def release(self, name: str) -> None: ...


def unpin(pins: dict[str, int], name: str) -> bool:
    """Drop one use of ``name`` from ``pins``; True when that was its last (it may be evicted now)."""
    left = pins.get(name, 0) - 1
    if left < 0:
        raise ValueError(f"adapter {name!r} released more often than acquired")
    if left:
        pins[name] = left
        return False
    pins.pop(name, None)
    return True


def lora_modules(spec: str) -> list[tuple[str, str]]:
    """``--lora-modules`` ("name=path,name=path") as (name, path) pairs; ValueError if malformed."""
    pairs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--lora-modules entries are name=path; got {item!r}")
        pairs.append((name.strip(), path.strip()))
    return pairs


class SimulatedAdapters:
    """The mocker's adapters: names and paths, at most ``max_loras`` resident (LRU, pinned ones
    stay), and ``load_s`` simulated seconds each time one is made resident. No weights."""

    def __init__(self, max_loras: int, load_s: float) -> None:
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.max_loras, self.load_s = max_loras, load_s
        self._paths: dict[str, str] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._pins: dict[str, int] = {}
        self.loads = 0
        self.evictions = 0
        self.owed_s = 0.0  # simulated load time not yet paid by a step

    def names(self) -> list[str]:
        return sorted(self._paths)

    def resident(self) -> list[str]:
        return list(self._resident)

    def add(self, name: str, path: str) -> str:
        """Make ``name`` known (resident on first use); its digest (of name and path: no files read)."""
        if name in self._paths and self._paths[name] != path:
            raise ValueError(f"adapter {name!r} is already loaded from {self._paths[name]}; unload it first")
        self._paths[name] = path
        return self.digest(name)

    def digest(self, name: str) -> str:
        if name not in self._paths:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        return hashlib.sha256(f"{name}\0{self._paths[name]}".encode()).hexdigest()[:16]

    def remove(self, name: str) -> None:
        if self._paths.pop(name, None) is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        if not self._pins.get(name):
            self._resident.pop(name, None)

    def acquire(self, name: str) -> int:
        if name not in self._paths:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        if name not in self._resident:
            used = set(self._resident.values())
            free = [s for s in range(self.max_loras) if s not in used]
            if not free:
                victim = next((n for n in self._resident if not self._pins.get(n)), None)
                if victim is None:
                    raise AdapterBusyError(f"all {self.max_loras} resident LoRA slots are in use; retry later")
                free = [self._resident.pop(victim)]
                self.evictions += 1
            self._resident[name] = free[0]
            self.loads += 1
            self.owed_s += self.load_s
        self._resident.move_to_end(name)
        self._pins[name] = self._pins.get(name, 0) + 1
        return self._resident[name]

    def release(self, name: str) -> None:
        if not unpin(self._pins, name):
            return
        if name not in self._paths:  # unloaded while in use
            self._resident.pop(name, None)
