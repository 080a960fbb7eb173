"""Progress bars for long operations: building a model, profiling an engine, benchmark loops.

For a person watching, never for logs: the bar goes to stderr, and only when stderr is a terminal,
``quiet`` is false, the logs are not JSON (``BATON_LOG_FORMAT=json``) and ``BATON_PROGRESS`` is not
``0``. Otherwise it prints nothing and costs nothing, so captured output and log files stay clean.

    with progress("building baton-tiny", total=6, quiet=quiet) as bar:
        ...; bar.advance(what="tokenizer")

    for item in track(items, "requests"):   # a loop; the same rules
        ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

_OFF = ("0", "false", "no", "off")


def enabled(quiet: bool = False) -> bool:
    """Whether a progress bar should be drawn now (see the module doc)."""
    if quiet or os.environ.get("BATON_PROGRESS", "1").strip().lower() in _OFF:
        return False
    if os.environ.get("BATON_LOG_FORMAT", "text").strip().lower() == "json":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Bar:
    """One task of a rich Progress, or nothing at all when progress is off."""

    def __init__(self, progress: Any = None, task: Any = None, description: str = "") -> None:
        self._progress, self._task, self._description = progress, task, description
        self._in_step = False

    def step(self, what: str) -> None:
        """A new step starts (``what``): the one before it, if any, is done. A hook for code that
        reports steps as they start (``shared.builtin_model.build``'s ``on_step``)."""
        self.advance(1 if self._in_step else 0, what)
        self._in_step = True

    def advance(self, n: float = 1, what: str | None = None) -> None:
        """Count ``n`` more done; ``what`` (shown after the description) says what is being done now."""
        if self._progress is None:
            return
        kw: dict[str, Any] = {"advance": n}
        if what is not None:
            kw["description"] = f"{self._description}: {what}"
        self._progress.update(self._task, **kw)


@contextmanager
def progress(description: str, total: float | None, *, quiet: bool = False) -> Iterator[Bar]:
    """A progress bar for ``total`` steps (None: unknown, a spinner), removed when done."""
    if not enabled(quiet):
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as p:
        task = p.add_task(description, total=total)
        yield Bar(p, task, description)
        if total is not None:
            p.update(task, completed=total)


def track(items: Iterable[T], description: str, total: float | None = None, *, quiet: bool = False) -> Iterator[T]:
    """Iterate ``items`` with a progress bar (the same rules as ``progress``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(description, total, quiet=quiet) as bar:
        for item in items:
            yield item
            bar.advance()
