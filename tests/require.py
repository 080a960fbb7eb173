"""Optional test dependencies: skipped on a developer's machine, a failure in CI.

CI sets ``CI=true``; there every extra (torch, transformers, vLLM, ucxx, a C compiler for the
fused kernels) must be present and working, so a missing one fails the run instead of quietly
shrinking it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, *, allow_module_level: bool = False) -> NoReturn:
    """Skip locally; fail under ``CI=true`` (CI must install everything the suite tests)."""
    if in_ci():
        pytest.fail(f"{what}; CI (CI=true) must provide it", pytrace=False)
    pytest.skip(what, allow_module_level=allow_module_level)


def require_module(name: str, install: str) -> ModuleType:
    """``importorskip`` that fails in CI. Only a missing module is excused: a broken install raises."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and name != e.name and not name.startswith(e.name + "."):
            raise  # the module is there but one of its own imports is not: a broken install
        missing(f"Python module {name} is not installed ({install})", allow_module_level=True)
