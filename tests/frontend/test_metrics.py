"""The frontend's lock-free histogram gives exactly prometheus_client's samples."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from services.frontend.metrics import _LATENCY, _TOKENS, LoopHistogram


def _samples(registry: CollectorRegistry, name: str) -> list[str]:
    return [line.replace(name, "h") for line in generate_latest(registry).decode().splitlines()
            if line.startswith(name) and "_created" not in line]


def test_loop_histogram_matches_prometheus_histogram() -> None:
    for buckets in (_LATENCY, _TOKENS):
        registry = CollectorRegistry()
        upstream = Histogram("upstream", "x", buckets=buckets, registry=registry)
        ours = LoopHistogram("ours", "x", buckets=buckets, registry=registry)
        rng = random.Random(7)
        amounts = [0.0, -1.0, 1e-9, float("inf"), float("nan"), *buckets]  # every bound exactly, and the edges
        amounts += [rng.expovariate(1 / rng.choice([0.001, 0.1, 5.0, 100.0, 5000.0])) for _ in range(5000)]
        for amount in amounts:
            upstream.observe(amount)
            ours.observe(amount)
        assert _samples(registry, "ours") == _samples(registry, "upstream")
        assert any(s.startswith('h_bucket{le="+Inf"}') and not s.endswith(" 0.0") for s in _samples(registry, "ours"))
