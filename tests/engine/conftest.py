"""Engine tests run their coroutines on asyncio (the services' loop)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
