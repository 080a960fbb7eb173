"""vLLM engine tests: one engine per module (a start costs ~25 s), on asyncio like the services."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"
