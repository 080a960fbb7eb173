"""Access control for both APIs (HTTP and the NATS request API): optional API keys, per-key rate
limits, and per-address brakes applied before any key is looked at."""

from __future__ import annotations

import hmac
import math
import os
import time
from collections import OrderedDict
from pathlib import Path

from services.frontend.openai_api import RequestError

# Failed key checks an address may make: a burst, then one every two seconds. Checked before the
# key is, so guessing keys is slow even from many connections.
AUTH_FAILURES_PER_MINUTE = 30
AUTH_FAILURE_BURST = 10


class ConfigError(ValueError):
    """A configuration the service must not start with; its message is one line for the operator."""


def load_api_keys(keys_file: str | None, env_var: str = "BATON_API_KEYS") -> frozenset[str]:
    """Keys from a file (one per line, '#' comments) and/or a comma-separated environment variable.

    A keys file that holds no key is an error: starting without authentication because a file
    was emptied by mistake is worse than not starting.
    """
    keys: set[str] = set()
    if keys_file:
        try:
            text = Path(keys_file).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the API keys file {keys_file}: {e.strerror or e}") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
        if not keys:
            raise ConfigError(f"the API keys file {keys_file} holds no key (only blank or comment lines); "
                              "add keys or drop --api-keys-file")
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

    def _refill(self, caller: str, now: float) -> float:
        tokens, at = self._buckets.pop(caller, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate)

    def _store(self, caller: str, tokens: float, now: float) -> None:
        self._buckets[caller] = (tokens, now)
        if len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)

    def _refuse(self, tokens: float, message: str) -> RequestError:
        wait = math.ceil((1.0 - tokens) / self.rate) if self.rate > 0 else 60
        err = RequestError(429, f"{message}; retry in {wait}s", type="rate_limit_error", code="rate_limit_exceeded")
        err.headers = [(b"retry-after", str(wait).encode())]
        return err

    def check(self, caller: str, now: float | None = None, message: str = "rate limit exceeded") -> None:
        """Take one token for ``caller`` or raise 429 saying when to come back."""
        now = time.monotonic() if now is None else now
        tokens = self._refill(caller, now)
        if tokens < 1.0:
            self._store(caller, tokens, now)
            raise self._refuse(tokens, message)
        self._store(caller, tokens - 1.0, now)

    def ensure_left(self, caller: str, message: str, now: float | None = None) -> None:
        """Raise 429 if ``caller`` has no token left, without taking one."""
        now = time.monotonic() if now is None else now
        tokens = self._refill(caller, now)
        self._store(caller, tokens, now)
        if tokens < 1.0:
            raise self._refuse(tokens, message)

    def take(self, caller: str, now: float | None = None) -> None:
        """Take a token if one is left (never raises)."""
        now = time.monotonic() if now is None else now
        self._store(caller, max(0.0, self._refill(caller, now) - 1.0), now)


class AccessControl:
    """The same rules for every API: an address brake, then the key, then the caller's rate limit."""

    def __init__(self, api_keys: frozenset[str], limiter: RateLimiter | None,
                 address_limiter: RateLimiter | None = None) -> None:
        self.api_keys = tuple(k.encode() for k in sorted(api_keys))
        self.limiter = limiter
        self.address_limiter = address_limiter  # every request from an address, before authentication
        self.auth_failures = RateLimiter(AUTH_FAILURES_PER_MINUTE, AUTH_FAILURE_BURST)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.limiter or self.address_limiter)

    def _key_matches(self, key: bytes) -> bool:
        # Every configured key is compared, each in constant time: neither the position of a
        # match nor the length of a common prefix shows in the timing.
        found = False
        for k in self.api_keys:
            found |= hmac.compare_digest(key, k)
        return found

    def admit(self, authorization: str | None, address: str) -> str:
        """Check the address's brakes, the API key (if keys are configured) and the rate limit;
        return the caller's identity. ``authorization`` is the 'Bearer <key>' header's value."""
        if self.address_limiter is not None:
            self.address_limiter.check(address, message=f"too many requests from {address}")
        caller = address
        if self.api_keys:
            self.auth_failures.ensure_left(address, "too many failed API key checks from this address")
            if not authorization:
                self.auth_failures.take(address)
                raise RequestError(401, "You didn't provide an API key. Send 'Authorization: Bearer <key>'.",
                               code="invalid_api_key")
            scheme, _, key = authorization.partition(" ")
            key_bytes = key.strip().encode(errors="replace")
            if scheme.lower() != "bearer" or not self._key_matches(key_bytes):
                self.auth_failures.take(address)
                raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
            caller = "key:" + key.strip()
        if self.limiter is not None:
            self.limiter.check(caller)
        return caller

    def admit_http(self, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None) -> str:
        auth = next((v for k, v in headers if k == b"authorization"), None)
        return self.admit(auth.decode("latin-1") if auth is not None else None, client[0] if client else "unknown")
