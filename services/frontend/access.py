"""Access control for the HTTP API: optional API keys and per-key rate limits."""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from pathlib import Path

from services.frontend.openai_api import ApiError


def load_api_keys(keys_file: str | None, env_var: str = "BATON_API_KEYS") -> frozenset[str]:
    """Keys from a file (one per line, '#' comments) and/or a comma-separated environment variable."""
    keys: set[str] = set()
    if keys_file:
        for line in Path(keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    keys.update(k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip())
    return frozenset(keys)


class RateLimiter:
    """A token bucket per caller: ``rpm`` requests a minute, bursts up to ``burst``.

    Buckets live in an LRU of bounded size, so a flood of distinct callers cannot grow memory.
    """

    def __init__(self, rpm: float, burst: int | None = None, max_callers: int = 100_000) -> None:
        self.rate = rpm / 60.0
        self.capacity = float(burst if burst else max(1, math.ceil(rpm / 6)))
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, at)

    def check(self, caller: str, now: float | None = None) -> None:
        """Take one token for ``caller`` or raise 429 saying when to come back."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(caller, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate) if self.rate > 0 else 60
            err = ApiError(429, f"rate limit exceeded; retry in {wait}s", type="rate_limit_error",
                           code="rate_limit_exceeded")
            err.headers = [(b"retry-after", str(wait).encode())]
            raise err
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)


class AccessControl:
    def __init__(self, api_keys: frozenset[str], limiter: RateLimiter | None) -> None:
        self.api_keys = api_keys
        self.limiter = limiter

    def admit(self, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None) -> str:
        """Check the API key (if keys are configured) and the rate limit; return the caller's identity."""
        caller = client[0] if client else "unknown"
        if self.api_keys:
            auth = next((v for k, v in headers if k == b"authorization"), b"").decode(errors="replace")
            scheme, _, key = auth.partition(" ")
            if not auth:
                raise ApiError(401, "You didn't provide an API key. Send 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
            if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
                raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
            caller = "key:" + key.strip()
        if self.limiter is not None:
            self.limiter.check(caller)
        return caller
