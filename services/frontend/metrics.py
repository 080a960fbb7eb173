"""Frontend metrics, named like vLLM's and Dynamo's so existing dashboards chart them."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, values

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class _LoopValue:
    """A sample's value written and read on the event loop's thread only: no lock to take."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: Any = None) -> None:
        self._value = value

    def get(self) -> float:
        return self._value

    def set_exemplar(self, exemplar: Any) -> None:  # the frontend records none
        pass

    def get_exemplar(self) -> None:
        return None


class LoopHistogram(Histogram):
    """A Histogram observed on the event loop's thread only (the frontend's per-request and
    per-delta latencies): the same samples, without a lock per bucket and sum, and the bucket
    found by bisection. Multiprocess mode, labels and exemplars get prometheus_client's own."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._loop_values = values.ValueClass is values.MutexValue
        if self._loop_values:
            self._sum = _LoopValue()  # type: ignore[assignment]
            self._buckets = [_LoopValue() for _ in self._upper_bounds]  # type: ignore[misc]

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or not getattr(self, "_loop_values", False) or amount != amount:  # NaN: no bucket, as upstream
            super().observe(amount, exemplar)
            return
        self._sum._value += amount  # type: ignore[attr-defined]
        # the first bucket whose upper bound is >= amount (the last bound is +Inf)
        self._buckets[bisect_left(self._upper_bounds, amount)]._value += 1  # type: ignore[attr-defined]


REQUESTS = Counter("baton_frontend_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
INFLIGHT = Gauge("baton_frontend_inflight_requests", "Requests being served")
DURATION = LoopHistogram("baton_frontend_request_duration_seconds", "Request duration", buckets=_LATENCY)
TTFT = LoopHistogram("baton_frontend_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY)
ITL = LoopHistogram("baton_frontend_inter_token_latency_seconds", "Time between streamed chunks", buckets=_LATENCY)
INPUT_TOKENS = LoopHistogram("baton_frontend_input_sequence_tokens", "Prompt length", buckets=_TOKENS)
OUTPUT_TOKENS = LoopHistogram("baton_frontend_output_sequence_tokens", "Completion length", buckets=_TOKENS)
NATS_API_REQUESTS = Counter("baton_frontend_nats_api_requests_total", "NATS API requests by outcome", ["status"])
