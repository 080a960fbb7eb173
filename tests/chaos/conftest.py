"""Chaos suites run their stacks with NATS authentication on (tests/procs.py Stack's default): whatever
a test does to the processes, no service may ever have been refused a subject by its role's permissions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import STARTED_STACKS


@pytest.fixture(autouse=True)
def no_permission_violations() -> Iterator[None]:
    before = len(STARTED_STACKS)
    yield  # autouse, so torn down after the test's own stack fixture has stopped the stack
    stacks = STARTED_STACKS[before:]
    del STARTED_STACKS[before:]
    for s in stacks:
        assert s.nats.identities is not None, "chaos stacks run with NATS authentication on"
        assert s.nats.violations() == [], f"permission violations in {s.nats.log_file}"
