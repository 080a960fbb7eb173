"""Routing policies: given a request and the live workers, ``choose_worker``.

Round-robin and random live here; the KV-aware policies (``kv``, ``kv-approx``) are in
:mod:`shared.routing.kv_policy` and plug into the same interface.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Protocol

from shared.messages import RouteRequest, WorkerInfo

if TYPE_CHECKING:
    from shared.routing.kv_policy import KvRouterConfig

ROUTER_MODES = ("kv", "kv-approx", "round-robin", "random")


class RoutingPolicy(Protocol):
    name: str

    def choose_worker(self, request: RouteRequest, workers: list[WorkerInfo]) -> tuple[WorkerInfo, int]:
        """Pick one of ``workers`` (never empty); return it and the predicted cached blocks."""
        ...


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose_worker(self, request: RouteRequest, workers: list[WorkerInfo]) -> tuple[WorkerInfo, int]:
        # Sort so every replica walks the same order whatever order discovery reported.
        ordered = sorted(workers, key=lambda w: w.worker_id)
        w = ordered[self._next % len(ordered)]
        self._next += 1
        return w, 0

    def choose_many(self, workers: list[WorkerInfo], count: int) -> list[WorkerInfo]:
        """The next ``count`` choices (a route lease), as ``count`` calls would make them."""
        ordered = sorted(workers, key=lambda w: w.worker_id)
        start, self._next = self._next, self._next + count
        return [ordered[i % len(ordered)] for i in range(start, start + count)]


class RandomChoice:
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def choose_worker(self, request: RouteRequest, workers: list[WorkerInfo]) -> tuple[WorkerInfo, int]:
        return self._rng.choice(workers), 0

    def choose_many(self, workers: list[WorkerInfo], count: int) -> list[WorkerInfo]:
        """``count`` choices at once (a route lease)."""
        return self._rng.choices(workers, k=count)


def make_policy(mode: str, seed: int | None = None, kv_config: KvRouterConfig | None = None) -> RoutingPolicy:
    if mode == "round-robin":
        return RoundRobin()
    if mode == "random":
        return RandomChoice(seed)
    if mode in ("kv", "kv-approx"):
        from dataclasses import replace

        from shared.routing.kv_policy import KvRouter, KvRouterConfig

        config = replace(kv_config or KvRouterConfig(), use_kv_events=mode == "kv")
        if seed is not None:
            config.seed = seed
        return KvRouter(config)
    raise ValueError(f"unknown router mode {mode!r}; choose one of {', '.join(ROUTER_MODES)}")
