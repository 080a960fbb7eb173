"""Secrets are masked in log lines and in text handed to ``redact``."""

from __future__ import annotations

import io
import logging

import pytest

from shared.redact import RedactingFilter, redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("connecting to nats://baton:s3cr3t-pw@127.0.0.1:4222", "s3cr3t-pw"),
        ("Authorization: Bearer abc.def-123xyz", "abc.def-123xyz"),
        ("bad key sk-live-abcdef123456", "live-abcdef123456"),
        ("password=hunter22 user=x", "hunter22"),
        ("token: 'tok_9f8e7d'", "tok_9f8e7d"),
        ("seed SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU loaded", "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"),
    ],
)
def test_secret_is_masked(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "***" in out


@pytest.mark.parametrize("text", ["nats://127.0.0.1:4222", "http://0.0.0.0:8000/v1/models", "served 12 tokens"])
def test_plain_text_is_untouched(text: str) -> None:
    assert redact(text) == text


def test_filter_masks_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("cannot reach %s", "nats://u:topsecret@h:4222")
        try:
            raise RuntimeError("auth failed for nats://u:othersecret@h:4222")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "topsecret" not in text and "othersecret" not in text
    assert "cannot reach nats://u:***@h:4222" in text
    assert "RuntimeError: auth failed for nats://u:***@h:4222" in text
