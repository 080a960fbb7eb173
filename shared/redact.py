"""Secrets never reach a log line: one filter on every handler, one function for ad-hoc text.

What counts as a secret here: the password in a URL's user-info (``nats://user:pass@host``),
bearer tokens and API keys (``sk-…``), NATS nkey seeds (``SU…``/``SA…``/``SO…``) and user JWTs,
and ``password=``/``token=``/``secret=`` style assignments.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?P<tail>@)"), rf"\g<head>{MASK}\g<tail>"),
    # scheme://token@host (a token alone as user-info, as NATS allows)
    (re.compile(r"(?P<head>(?:nats|tls|wss?)://)[^@\s/:]{16,}(?P<tail>@)"), rf"\g<head>{MASK}\g<tail>"),
    (re.compile(r"(?i)(?P<head>\bbearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\g<head>{MASK}"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), f"sk-{MASK}"),
    # nkey seeds: S + key type letter + base32 body
    (re.compile(r"\bS[UAONCX][A-Z2-7]{50,}\b"), MASK),
    # a JWT: three base64url parts, the first starting with eyJ
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), MASK),
    (
        re.compile(r"(?i)(?P<head>\b(?:password|passwd|pass|token|secret|api[_-]?key|auth[_-]?token)\s*[=:]\s*[\"']?)[^\s\"',;&]+"),
        rf"\g<head>{MASK}",
    ),
)


def redact(text: str) -> str:
    """``text`` with every recognised secret replaced by ``***``."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (arguments merged in, exception text too) with secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put the filter on every handler of ``logger`` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
