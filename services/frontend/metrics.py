"""Frontend metrics, named like vLLM's and Dynamo's so existing dashboards chart them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

REQUESTS = Counter("baton_frontend_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"])
INFLIGHT = Gauge("baton_frontend_inflight_requests", "Requests being served")
DURATION = Histogram("baton_frontend_request_duration_seconds", "Request duration", buckets=_LATENCY)
TTFT = Histogram("baton_frontend_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY)
ITL = Histogram("baton_frontend_inter_token_latency_seconds", "Time between streamed chunks", buckets=_LATENCY)
INPUT_TOKENS = Histogram("baton_frontend_input_sequence_tokens", "Prompt length", buckets=_TOKENS)
OUTPUT_TOKENS = Histogram("baton_frontend_output_sequence_tokens", "Completion length", buckets=_TOKENS)
NATS_API_REQUESTS = Counter("baton_frontend_nats_api_requests_total", "NATS API requests by outcome", ["status"])
