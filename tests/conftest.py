from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.procs import Stack
from tests.require import in_ci


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One hermetic cache for the built-in models, built once, shared by every process."""
    cache = Path(os.environ.get("BATON_TEST_CACHE_DIR") or tmp_path_factory.mktemp("baton-cache"))
    os.environ["BATON_CACHE_DIR"] = str(cache)
    from shared.builtin_model import ensure_builtin

    ensure_builtin("baton-tiny")
    return cache


def e2e_engine() -> str:
    """End-to-end tests run the real torch engine; the mocker only where torch is not installed
    (a failure under CI=true) or where BATON_TEST_ENGINE asks for it."""
    forced = os.environ.get("BATON_TEST_ENGINE")
    if forced:
        return forced
    if importlib.util.find_spec("torch") is not None:
        return "torch"
    if in_ci():
        pytest.fail("torch is not installed: end-to-end tests would fall back to the mocker "
                    "(pip install 'baton[torch]'); CI (CI=true) must provide it", pytrace=False)
    return "mocker"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A running stack for a test module: nats-server, router, one decode worker, frontend."""
    s = Stack(tmp_path_factory.mktemp("stack"), e2e_engine())
    try:
        s.start()
    except Exception:
        print(s.logs())
        s.stop()
        raise
    yield s
    s.stop()
    if request.session.testsfailed:
        print(s.logs())
    # Every service ran with only its role's NATS permissions: none may have been refused anything.
    assert s.nats.violations() == []
