"""The two log formats keep an error's traceback: JSON in its ``error`` field, text below the
line (the text format dropped it, so `--log-format text` logged a crash without its cause)."""

from __future__ import annotations

import json
import logging
import sys

from idemproxy.observability import JsonFormatter, TextFormatter


def failed_record() -> logging.LogRecord:
    try:
        raise ValueError("the cause")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("idemproxy", logging.CRITICAL, __file__, 1, "crashed", (), exc_info)
    record.fields = {"error": "ValueError: the cause"}
    return record


def test_text_format_puts_the_traceback_below_the_line() -> None:
    first, *rest = TextFormatter().format(failed_record()).split("\n")
    assert first.endswith("CRITICAL crashed error=ValueError: the cause")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: the cause"
    assert "in failed_record" in "\n".join(rest)


def test_text_format_without_an_error_is_one_line() -> None:
    record = logging.LogRecord("idemproxy", logging.INFO, __file__, 1, "started", (), None)
    record.fields = {"workers": 2, "admin": None}
    assert TextFormatter().format(record).endswith("INFO started workers=2")


def test_json_format_keeps_the_traceback_in_one_line() -> None:
    text = JsonFormatter().format(failed_record())
    assert "\n" not in text
    line = json.loads(text)
    assert line["message"] == "crashed"
    assert line["error"].startswith("Traceback (most recent call last):")
    assert line["error"].endswith("ValueError: the cause")
