"""Short-term forecast of the load: request rate and prompt/output lengths, one interval at a time.

Rate: Holt's linear (double exponential) smoothing, level plus trend, forecast ``h`` intervals
ahead. A sample too high to be Poisson noise around the forecast (more than ``surprise_z``
standard deviations above it) is taken as a level shift and used as is, so a step up in traffic is
acted on at once rather than after the smoothing catches up; ordinary noise (two arrivals in a
second where 0.7 are expected) is smoothed away. The stabilizer's N-intervals rule filters the
rare surprise that is only a blip.
Lengths: EWMA of the per-interval means, updated only when requests arrived.

:class:`TrafficMeter` collects what the routers' traffic reports and the prefill jobs subscription
show between two samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from services.planner.signals import Traffic


class Holt:
    """Level + trend exponential smoothing."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        self.alpha = alpha
        self.beta = beta
        self.level: float | None = None
        self.trend = 0.0

    def update(self, x: float) -> None:
        if self.level is None:
            self.level = x
            return
        prev = self.level
        self.level = self.alpha * x + (1 - self.alpha) * (self.level + self.trend)
        self.trend = self.beta * (self.level - prev) + (1 - self.beta) * self.trend

    def forecast(self, h: float = 1.0) -> float:
        if self.level is None:
            return 0.0
        return max(0.0, self.level + h * self.trend)


@dataclass(slots=True)
class Prediction:
    request_rate: float = 0.0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    prefill_job_rate: float = 0.0
    prefill_job_tokens: float = 0.0


class _Mean:
    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float, initial: float) -> None:
        self.alpha = alpha
        self.value = initial

    def update(self, x: float, seen: bool) -> None:
        if seen:
            self.value = x if self.value <= 0 else self.alpha * x + (1 - self.alpha) * self.value


def surprising(count: int, expected_rate: float, interval: float, z: float) -> bool:
    """Is ``count`` arrivals in ``interval`` s more than z sigma above a Poisson mean of ``expected_rate``?"""
    lam = expected_rate * interval
    return count > lam + z * math.sqrt(max(lam, 1.0))


class Forecaster:
    def __init__(self, alpha: float = 0.3, beta: float = 0.1, length_alpha: float = 0.3,
                 prompt_tokens: float = 0.0, output_tokens: float = 0.0, surprise_z: float = 1.5) -> None:
        self.rate = Holt(alpha, beta)
        self.job_rate = Holt(alpha, beta)
        self.isl = _Mean(length_alpha, prompt_tokens)
        self.osl = _Mean(length_alpha, output_tokens)
        self.job_isl = _Mean(length_alpha, prompt_tokens)
        self.surprise_z = surprise_z
        self._jump = 0.0  # the latest sample, when it was a surprise
        self._job_jump = 0.0

    def update(self, t: Traffic) -> None:
        z = self.surprise_z
        self._jump = t.request_rate if surprising(t.requests, self.rate.forecast(1), t.interval, z) else 0.0
        self._job_jump = (t.prefill_job_rate if surprising(t.prefill_jobs, self.job_rate.forecast(1), t.interval, z)
                          else 0.0)
        self.rate.update(t.request_rate)
        self.job_rate.update(t.prefill_job_rate)
        self.isl.update(t.prompt_tokens, t.requests > 0)
        self.osl.update(t.output_tokens, t.requests > 0)
        self.job_isl.update(t.prefill_job_tokens, t.prefill_jobs > 0)

    def predict(self, horizon: float = 1.0) -> Prediction:
        return Prediction(
            request_rate=max(self.rate.forecast(horizon), self._jump),
            prompt_tokens=self.isl.value,
            output_tokens=self.osl.value,
            prefill_job_rate=max(self.job_rate.forecast(horizon), self._job_jump),
            prefill_job_tokens=self.job_isl.value,
        )


class TrafficMeter:
    """New requests and prefill jobs between two :meth:`take` calls.

    Requests come from the routers' traffic reports (:mod:`shared.routing.traffic`), each with the
    seconds it covers as its router measured them: a router's rate is its requests over the time
    its reports covered, whatever their phase against the planner's interval (counting reports per
    interval would jitter by one report); the rates of several routers add up. Re-routes of a
    migrated request are not in the reports, so a request counts once.
    """

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self._sources: dict[str, list[float]] = {}  # router -> [seconds covered, requests]
        self.requests = 0
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.jobs = 0
        self.job_tokens = 0

    def routed(self, source: str, interval: float, requests: int, prompt_tokens: int, output_tokens: int) -> None:
        """One traffic report's share for this meter: ``requests`` new requests (with these summed
        prompt and output budgets) placed by router ``source`` over ``interval`` seconds."""
        s = self._sources.get(source)
        if s is None:
            s = self._sources[source] = [0.0, 0]
        s[0] += interval
        s[1] += requests
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens

    def prefill_job(self, prompt_tokens: int) -> None:
        self.jobs += 1
        self.job_tokens += prompt_tokens

    def take(self, now: float | None = None) -> Traffic:
        now = time.monotonic() if now is None else now
        interval = max(now - self._last, 1e-3)
        rate = sum(n / covered for covered, n in self._sources.values() if covered > 0)
        t = Traffic(
            interval=interval, requests=round(rate * interval),
            prompt_tokens=self.prompt_tokens / self.requests if self.requests else 0.0,
            output_tokens=self.output_tokens / self.requests if self.requests else 0.0,
            prefill_jobs=self.jobs, prefill_job_tokens=self.job_tokens / self.jobs if self.jobs else 0.0,
        )
        self._last = now
        self._reset()
        return t
