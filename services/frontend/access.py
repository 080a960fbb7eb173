"""Access control for both APIs (HTTP and the NATS request API): optional API keys, per-key rate
limits (requests and tokens a minute), and per-address brakes applied before any key is looked at.

The keys file holds one key a line, optionally followed by ``name=value`` settings for that key
(the tenant): ``weight=`` its share under fair queuing (services/frontend/admission.py), ``rpm=``
and ``tpm=`` its own requests/tokens a minute (instead of --rate-limit-rpm / --tenant-tpm), and
``name=`` the tenant's name (keys sharing one are one tenant; the key itself is never a name)::

    sk-paid-1  weight=4 tpm=200000 name=paid
    sk-free-1  weight=1 tpm=20000 rpm=30
"""

from __future__ import annotations

import hmac
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from services.frontend.openai_api import RequestError

# Failed key checks an address may make: a burst, then one every two seconds. Checked before the
# key is, so guessing keys is slow even from many connections.
AUTH_FAILURES_PER_MINUTE = 30
AUTH_FAILURE_BURST = 10


class ConfigError(ValueError):
    """A configuration the service must not start with; its message is one line for the operator."""


ANONYMOUS = "anonymous"  # the one tenant of every caller without an API key


@dataclass(slots=True, frozen=True)
class Tenant:
    """Who a request is charged to: an API key, or everyone without one (``anonymous``)."""

    name: str  # the key's ``name=`` or ``key#<line>``, never the key: fair share and TPM budget go by it
    weight: float = 1.0  # share of the fleet under fair queuing, relative to other tenants'
    tpm: int = 0  # tokens a minute (prompt + completion); 0: the frontend's default (--tenant-tpm)
    rpm: float = 0.0  # requests a minute; 0: the frontend's default (--rate-limit-rpm)


_KEY_SETTINGS = ("weight", "tpm", "rpm", "name")


def _parse_key_line(line: str, where: str, default_name: str) -> tuple[str, Tenant]:
    key, *settings = line.split()
    values: dict[str, str] = {}
    for item in settings:
        name, eq, value = item.partition("=")
        if not eq or name not in _KEY_SETTINGS or not value:
            raise ConfigError(f"{where}: unknown key setting {item!r}; use {', '.join(s + '=' for s in _KEY_SETTINGS)}")
        values[name] = value
    try:
        weight = float(values.get("weight", 1.0))
        tpm = int(values.get("tpm", 0))
        rpm = float(values.get("rpm", 0.0))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not (weight > 0 and math.isfinite(weight)) or tpm < 0 or rpm < 0 or not math.isfinite(rpm):
        raise ConfigError(f"{where}: weight must be > 0, tpm and rpm >= 0")
    return key, Tenant(values.get("name", default_name), weight, tpm, rpm)


def load_tenants(keys_file: str | None, env_var: str = "BATON_API_KEYS") -> dict[str, Tenant]:
    """Keys and their settings from a file (one per line, '#' comments) and/or a comma-separated
    environment variable (keys only: default settings).

    A keys file that holds no key is an error: starting without authentication because a file
    was emptied by mistake is worse than not starting.
    """
    tenants: dict[str, Tenant] = {}
    if keys_file:
        try:
            text = Path(keys_file).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the API keys file {keys_file}: {e.strerror or e}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                key, tenant = _parse_key_line(line, f"{keys_file} line {number}", f"key#{number}")
                tenants[key] = tenant
        if not tenants:
            raise ConfigError(f"the API keys file {keys_file} holds no key (only blank or comment lines); "
                              "add keys or drop --api-keys-file")
    for i, k in enumerate(os.environ.get(env_var, "").split(",")):
        if k.strip() and k.strip() not in tenants:
            tenants[k.strip()] = Tenant(f"env#{i + 1}")
    return tenants


def load_api_keys(keys_file: str | None, env_var: str = "BATON_API_KEYS") -> frozenset[str]:
    """The keys alone (see :func:`load_tenants`)."""
    return frozenset(load_tenants(keys_file, env_var))


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


class TokenRateLimiter:
    """Tokens a minute per tenant (prompt + completion), counted as they are used.

    A token bucket per tenant holding up to a minute's tokens, refilled continuously. A request is
    refused (429) while its tenant's bucket holds fewer tokens than its prompt; admitted, its
    prompt is taken at once and its completion tokens as they are generated, so a long answer may
    run the bucket below zero and the tenant waits for it to refill. Buckets live in a bounded LRU.
    """

    def __init__(self, max_tenants: int = 100_000) -> None:
        self.max_tenants = max_tenants
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tenant -> (tokens, at)

    def _refill(self, tenant: str, tpm: int, now: float) -> float:
        tokens, at = self._buckets.pop(tenant, (float(tpm), now))
        tokens = min(float(tpm), tokens + (now - at) * tpm / 60.0)
        self._buckets[tenant] = (tokens, now)
        if len(self._buckets) > self.max_tenants:
            self._buckets.popitem(last=False)
        return tokens

    def remaining(self, tenant: str, tpm: int, now: float | None = None) -> float:
        return self._refill(tenant, tpm, time.monotonic() if now is None else now)

    def check(self, tenant: str, tpm: int, requested: int, now: float | None = None) -> None:
        """Raise OpenAI's 429 (the limit named) unless ``tenant`` has ``requested`` tokens left."""
        left = self.remaining(tenant, tpm, now)
        if requested <= left:
            return
        if requested > tpm:
            wait = 60
            detail = f"this request's prompt ({requested} tokens) alone exceeds the limit"
        else:
            wait = max(1, math.ceil((requested - left) * 60.0 / tpm))
            detail = f"please try again in {wait}s"
        used = max(0, tpm - math.floor(left))
        err = RequestError(429, f"Rate limit reached on tokens per min (TPM): Limit {tpm}, Used {used}, "
                                f"Requested {requested}; {detail}", type="tokens", code="rate_limit_exceeded")
        err.headers = [(b"retry-after", str(wait).encode()), (b"x-ratelimit-limit-tokens", str(tpm).encode()),
                       (b"x-ratelimit-remaining-tokens", str(max(0, math.floor(left))).encode())]
        raise err

    def charge(self, tenant: str, tpm: int, tokens: int, now: float | None = None) -> None:
        """Count ``tokens`` used (never refuses; the bucket may go below zero)."""
        now = time.monotonic() if now is None else now
        left = self._refill(tenant, tpm, now)
        self._buckets[tenant] = (left - tokens, now)


class AccessControl:
    """The same rules for every API: an address brake, then the key, then the caller's rate limit."""

    def __init__(self, api_keys: frozenset[str] | dict[str, Tenant], limiter: RateLimiter | None,
                 address_limiter: RateLimiter | None = None) -> None:
        tenants = api_keys if isinstance(api_keys, dict) else {k: Tenant(f"key#{i + 1}")
                                                               for i, k in enumerate(sorted(api_keys))}
        self.api_keys = tuple(k.encode() for k in sorted(tenants))
        self._tenants = {"key:" + k: t for k, t in tenants.items()}  # by caller identity
        # Keys with their own rpm= get their own limiter; the rest share --rate-limit-rpm's.
        self._key_limiters = {caller: RateLimiter(t.rpm) for caller, t in self._tenants.items() if t.rpm > 0}
        self.limiter = limiter
        self.address_limiter = address_limiter  # every request from an address, before authentication
        self.auth_failures = RateLimiter(AUTH_FAILURES_PER_MINUTE, AUTH_FAILURE_BURST)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.limiter or self.address_limiter)

    def tenant_of(self, caller: str) -> Tenant:
        """The tenant ``caller`` (as :meth:`admit` returned it) is charged to; callers without a key
        are all one tenant."""
        return self._tenants.get(caller) or Tenant(ANONYMOUS)

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
        limiter = self._key_limiters.get(caller, self.limiter)
        if limiter is not None:
            limiter.check(caller)
        return caller

    def admit_http(self, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None) -> str:
        """:meth:`admit` for an ASGI request; returns the caller's identity."""
        auth = next((v for k, v in headers if k == b"authorization"), None)
        return self.admit(auth.decode("latin-1") if auth is not None else None, client[0] if client else "unknown")
