"""Credentials never leave the process: redaction of everything the tool writes or prints.

Results directories are made to be shared, so a storage URL's password must not reach a
manifest, a report, a progress line or an error message. Two layers do it:

* :func:`redact` rewrites credentials by their shape wherever they appear in a text:
  the password of ``scheme://user:password@host`` becomes ``***``, and so does the value
  of a ``password=...`` parameter (URL query or libpq keyword string).
* :func:`register_secret` adds a literal (a password parsed from a URL, in both its
  percent-encoded and decoded forms) that :func:`redact` removes wherever it appears, as a
  net for texts that carry it without a URL's shape (a driver's exception text, say).
  :func:`redacting_streams` passes ``sys.stdout``, ``sys.stderr`` and logging handlers
  that write to them through :func:`redact` for the life of a command.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["MASK", "redact", "redact_url", "redacting_streams", "register_secret"]

MASK = "***"

#: Literal secrets shorter than this are not masked by value (masking "abc" everywhere
#: would garble output); their URLs are still redacted by shape.
MIN_SECRET_LEN = 6

_SECRETS: set[str] = set()
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_PASSWORD_PARAM = re.compile(
    r"(?i)(\bpass(?:word|wd)\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&;,'\"]+)")


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` (and its percent-decoded form) in every later :func:`redact`."""
    if not secret:
        return
    for form in {secret, urllib.parse.unquote(secret)}:
        if len(form) >= MIN_SECRET_LEN:
            _SECRETS.add(form)


def redact_url(url: str) -> str:
    """``url`` with the password of its user info masked: ``s://u:***@h/db``.

    The user info is everything before the last ``@``, so a password holding an unencoded
    ``@``, ``/`` or ``?`` is masked whole.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The user info ends at the last "@" of the whole URL: a password may hold unencoded
    # "@", "/" or "?" (SQLAlchemy accepts them). An "@" in the query makes this mask more
    # than the password, never less.
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        user = rest[:at].split(":", 1)[0]
        return f"{scheme}{sep}{user}:{MASK}{rest[at:]}"
    return url


def redact(text: str) -> str:
    """``text`` with every credential masked: URL passwords, ``password=`` values and the
    registered secrets."""
    if not isinstance(text, str) or not text:
        return text
    out = _URL.sub(lambda m: redact_url(m.group(0)), text)
    out = _PASSWORD_PARAM.sub(lambda m: m.group(1) + MASK, out)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        # Whole tokens only: the password "postgres" must not eat "postgresql://".
        out = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", MASK, out)
    return out


def redact_json(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with :func:`redact` applied to every
    string, keys included."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(v) for v in value]
    return value


class _RedactingStream:
    """A text stream that redacts every write; everything else goes to the wrapped one."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacting_streams() -> Iterator[None]:
    """``sys.stdout``, ``sys.stderr`` and the logging handlers writing to them redact
    every write while the block runs."""
    if isinstance(sys.stderr, _RedactingStream):  # nested: already on
        yield
        return
    out, err = sys.stdout, sys.stderr
    swapped: list[tuple[logging.StreamHandler, Any]] = []
    sys.stdout, sys.stderr = _RedactingStream(out), _RedactingStream(err)
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("optuna", "distributed"))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (out, err):
            wrapped = sys.stdout if handler.stream is out else sys.stderr
            swapped.append((handler, handler.setStream(wrapped)))
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)
        sys.stdout, sys.stderr = out, err
