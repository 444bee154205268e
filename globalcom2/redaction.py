"""Keep credentials off the console: mask them in everything our entry points print.

lmms-eval's CLI logs ``Evaluation tracker args: {..., 'token': 'hf_...'}`` (it appends ``HF_TOKEN`` to the
tracker arguments, lmms_eval/__main__.py ``cli_evaluate_single`` in 0.7.3), and a library may echo an API
key in an error. :func:`redacted_console` wraps ``sys.stdout``/``sys.stderr`` and every loguru message for
the duration of a command, replacing the value of each secret environment variable (and anything shaped
like a Hugging Face or OpenAI key) by ``***``; it also filters the root logger's handlers (Hydra's console
and job-log file) and the message of an exception that leaves the block. Files we write hold no secret to begin with
(``tests/harness/test_process_safety.py`` greps every one of them with fake keys set).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO

#: Environment variables whose values are credentials.
SECRET_VARIABLES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "OPENAI_API_KEY",
    "AZURE_API_KEY",
    "ANTHROPIC_API_KEY",
    "WANDB_API_KEY",
)
#: Token shapes masked even when they come from elsewhere (a config file, a login cache).
SECRET_PATTERNS = (
    r"hf_[A-Za-z0-9]{20,}",  # Hugging Face access tokens
    r"sk-[A-Za-z0-9_\-]{20,}",  # OpenAI-style API keys
)
MASK = "***"
_MIN_SECRET_LENGTH = 8  # shorter values would mask ordinary words


def secret_pattern() -> re.Pattern[str]:
    """One regex matching every secret value set in the environment and every known token shape."""
    values = sorted(
        {v for name in SECRET_VARIABLES if len(v := os.environ.get(name, "")) >= _MIN_SECRET_LENGTH},
        key=len,
        reverse=True,
    )
    return re.compile("|".join([*map(re.escape, values), *SECRET_PATTERNS]))


def redact(text: str, pattern: re.Pattern[str] | None = None) -> str:
    """``text`` with every secret replaced by ``***``."""
    return (pattern or secret_pattern()).sub(MASK, text)


class RedactingStream:
    """A text stream that masks secrets in what it writes, line by line (a secret never spans a newline;
    a partial line waits until its newline, a flush or the end)."""

    def __init__(self, stream: TextIO, pattern: re.Pattern[str]) -> None:
        self._stream = stream
        self._pattern = pattern
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        complete, newline, rest = self._pending.rpartition("\n")
        if newline:
            self._stream.write(redact(complete + newline, self._pattern))
            self._pending = rest
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(redact(self._pending, self._pattern))
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_console() -> Iterator[None]:
    """Mask secrets in ``sys.stdout``, ``sys.stderr`` and loguru's messages until the block ends."""
    pattern = secret_pattern()
    from loguru import logger

    def mask_record(record: dict[str, Any]) -> None:
        record["message"] = redact(record["message"], pattern)

    class MaskingFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg, record.args = redact(record.getMessage(), pattern), None
            return True

    handlers = [h for h in logging.getLogger().handlers]
    masking = MaskingFilter()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(saved[0], pattern), RedactingStream(saved[1], pattern)
    logger.configure(patcher=mask_record)
    for handler in handlers:  # Hydra's console and file handlers hold the real streams
        handler.addFilter(masking)
    try:
        yield
    except BaseException as err:  # printed after the streams are restored (Hydra, the interpreter)
        with contextlib.suppress(Exception):
            err.args = tuple(redact(a, pattern) if isinstance(a, str) else a for a in err.args)
        raise
    finally:
        for handler in handlers:
            handler.removeFilter(masking)
        logger.configure(patcher=None)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved
