"""What the planner sees in one interval, in the shape the policies take it (no NATS here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["decode", "prefill"]
ROLES: tuple[Role, ...] = ("decode", "prefill")


# --- what the planner sees -------------------------------------------------------------------


@dataclass(slots=True)
class RoleSignals:
    """One role's fleet in one interval (sums over its registered workers)."""

    ready: int = 0  # registered in discovery
    running: int = 0  # sequences in the running batches
    waiting: int = 0  # requests admitted by a worker but not yet scheduled
    kv_usage: float = 0.0  # mean fraction of KV blocks in use
    prefill_tokens_queued: int = 0  # prompt tokens not yet prefilled (waiting + partly prefilled)
    queue_pending: int = 0  # prefill: jobs in the JetStream queue not yet delivered
    queue_inflight: int = 0  # prefill: jobs delivered, not yet acked


@dataclass(slots=True)
class Traffic:
    """New work seen during one interval (the planner's subscription to generate requests and prefill jobs)."""

    interval: float = 1.0  # seconds the sample covers
    requests: int = 0
    prompt_tokens: float = 0.0  # mean prompt length of those requests (0 if none)
    output_tokens: float = 0.0  # mean max_tokens of those requests (0 if none)
    prefill_jobs: int = 0
    prefill_job_tokens: float = 0.0

    @property
    def request_rate(self) -> float:
        return self.requests / self.interval if self.interval > 0 else 0.0

    @property
    def prefill_job_rate(self) -> float:
        return self.prefill_jobs / self.interval if self.interval > 0 else 0.0


@dataclass(slots=True)
class Signals:
    timestamp: float
    decode: RoleSignals = field(default_factory=RoleSignals)
    prefill: RoleSignals = field(default_factory=RoleSignals)
    traffic: Traffic = field(default_factory=Traffic)

    def role(self, role: Role) -> RoleSignals:
        return self.decode if role == "decode" else self.prefill


@dataclass(slots=True)
class Proposal:
    role: Role
    replicas: int
    reason: str
