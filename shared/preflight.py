"""Preflight: the mistakes of day one caught before anything starts, each as one line.

Every service (and ``baton up`` before it starts any) runs the checks that apply to it: the
engine's extra is installed, the model directory loads (config, tokenizer, chat template), the
ports it will listen on are free, the NATS URL answers. A failure prints one line to stderr,
``<service>: error: <what is wrong>; <what to do>``, and exits with code 2: no traceback, no
restart loop that hides the reason.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from shared.redact import redact

EXIT_PREFLIGHT = 2  # the exit code of a failed check (and of an unreachable bus: shared/runtime.py)

# The package each engine needs and the extra that installs it.
ENGINE_PACKAGES = {"torch": ("torch", "torch"), "vllm": ("vllm", "vllm"), "mocker": (None, None)}


class PreflightError(Exception):
    """A check failed; the message is the whole line an operator reads: what, then what to do."""


Check = Callable[[], object]


def fail(service: str, message: str) -> None:
    """Print the one line and exit; used for every fatal startup error."""
    print(f"{service}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_PREFLIGHT)


def run_checks(service: str, checks: Iterable[Check]) -> None:
    """Run ``checks`` in order; the first failure ends the process with its one line."""
    for check in checks:
        try:
            check()
        except PreflightError as e:
            fail(service, str(e))


ENGINE_IMPORT_TIMEOUT = 120.0  # seconds: a cold torch import on a slow disk takes tens of seconds


def check_engine(engine: str, *, in_subprocess: bool = False, timeout: float = ENGINE_IMPORT_TIMEOUT) -> None:
    """The engine's package imports: a missing install and a broken one (a wrong wheel, a missing
    shared library) are each one line. A worker imports it in-process (it needs it next anyway);
    ``baton up`` and the planner, which never run the engine, import it in a child interpreter,
    which also turns a crash inside the import into a line."""
    if engine not in ENGINE_PACKAGES:
        raise PreflightError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_PACKAGES)}")
    package, extra = ENGINE_PACKAGES[engine]
    if package is None:
        return
    missing = PreflightError(f"the {engine} engine needs the '{package}' package, which is not installed; "
                             f"pip install 'baton[{extra}]' (or run with --engine mocker)")
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a hidden or half-removed install counts as missing
        found = False
    if not found:
        raise missing
    reason = _import_subprocess(package, timeout) if in_subprocess else _import_here(package, timeout)
    if reason is None:
        return
    if reason == f"ModuleNotFoundError: No module named '{package}'":
        raise missing
    raise PreflightError(f"the {engine} engine's '{package}' package is installed but does not import ({reason}); "
                         f"reinstall it: pip install --force-reinstall 'baton[{extra}]'")


def _import_here(package: str, timeout: float) -> str | None:
    """Import ``package`` in this process; the reason it failed, or None. A thread bounds the wait
    (an import that hangs is reported; the process exits on the error anyway)."""
    outcome: list[str | None] = []

    def load() -> None:
        try:
            importlib.import_module(package)
            outcome.append(None)
        except BaseException as e:  # a broken wheel raises anything (OSError, SystemExit)
            outcome.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": "))

    t = threading.Thread(target=load, name=f"import-{package}", daemon=True)
    t.start()
    t.join(timeout)
    return outcome[0] if outcome else f"the import did not finish within {timeout:g}s"


def _import_subprocess(package: str, timeout: float) -> str | None:
    """Import ``package`` in a child interpreter (same environment); the reason it failed, or None."""
    try:
        r = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"the import did not finish within {timeout:g}s"
    if r.returncode == 0:
        return None
    if r.returncode < 0:
        return f"the interpreter died with {signal.Signals(-r.returncode).name} while importing it"
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {r.returncode}"


def check_model(model: str, *, tokenizer: bool = True) -> Path:
    """The model resolves to a directory whose config.json parses and whose tokenizer and chat
    template load. A built-in name is built on first use (as the services would)."""
    from shared.builtin_model import BUILTIN_MODELS
    from shared.models import resolve_model

    if model not in BUILTIN_MODELS:
        p = Path(model).expanduser()
        if not p.is_dir():
            raise PreflightError(
                f"model {model!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a directory; "
                "pass --model with a Hugging Face model directory (config.json, tokenizer.json)"
            )
        if not (p / "config.json").is_file():
            raise PreflightError(f"model directory {str(p)!r} has no config.json; point --model at the directory "
                                 "that holds config.json and tokenizer.json")
    path = resolve_model(model).path
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PreflightError(f"{path / 'config.json'} does not load ({e}); fix or replace the file") from None
    if tokenizer:
        if not (path / "tokenizer.json").is_file():
            raise PreflightError(f"model directory {str(path)!r} has no tokenizer.json; copy the model's "
                                 "tokenizer files into it")
        from shared.tokenizer import Tokenizer

        try:
            Tokenizer(path)
        except Exception as e:  # tokenizers and jinja raise many unrelated types
            raise PreflightError(f"the tokenizer or chat template of {str(path)!r} does not load "
                                 f"({type(e).__name__}: {e}); fix tokenizer.json / tokenizer_config.json") from None
    return path


def check_port(host: str, port: int, what: str, option: str) -> None:
    """Nothing listens on ``host:port`` yet (a bind succeeds; port 0 is always free)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PreflightError(f"{what} port {port} on {host} is already in use (another Baton?); "
                                     f"stop that process or pass {option} with a free port") from None
            raise PreflightError(f"cannot listen on {host}:{port} for {what} ({e.strerror}); "
                                 f"pass {option} with another address or port") from None


def nats_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return parts.hostname or "127.0.0.1", parts.port or 4222


def check_nats(url: str, timeout: float) -> None:
    """One of the NATS URLs (comma-separated: a cluster) answers a TCP connect within ``timeout``
    (retried: a server may be starting). The last reason is kept for the message."""
    addresses = [nats_host_port(u) for u in url.split(",") if u.strip()]
    deadline = time.monotonic() + timeout
    reason = "no attempt"
    while True:
        for host, port in addresses:
            left = deadline - time.monotonic()
            try:
                with socket.create_connection((host, port), timeout=max(0.2, min(2.0, left))):
                    return
            except OSError as e:
                reason = e.strerror or type(e).__name__
        if time.monotonic() + 0.25 > deadline:
            break
        time.sleep(0.25)
    raise PreflightError(f"NATS at {redact(url)} does not answer ({reason}) after {timeout:g}s; start "
                         "nats-server there or fix --nats-url / BATON_NATS_URL")
