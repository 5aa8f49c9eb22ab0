"""Pieces of inventory error messages: quoted values, YAML type names, "did you mean"."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

MAX_QUOTED_CHARS = 60
# An unknown key is echoed only if it is a plain name without these words: a key such as
# "admin_password hunter2" or "token=abc" (a missing colon) carries its value along.
PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
SECRET_WORDS = ("pass", "secret", "token", "key", "hash", "credential", "private", "auth")
HIDDEN_KEY = "(not shown: it may hold a secret)"


def quote(value: object) -> str:
    """Quote a value for a one-line message: escaped control characters, long text cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_QUOTED_CHARS:
        text = text[: MAX_QUOTED_CHARS - 3] + "..."
    # repr escapes newlines, NUL and other control characters, so the message stays one line.
    return repr(text)


def unknown_key(key: str) -> str:
    """Quote an unknown key for a message, or return HIDDEN_KEY if it may hold a secret."""
    lowered = key.lower()
    if PLAIN_KEY_RE.fullmatch(key) and not any(word in lowered for word in SECRET_WORDS):
        return quote(key)
    return HIDDEN_KEY


def yaml_type(value: Any) -> str:
    """Name the YAML type of a parsed value as a user sees it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def a_yaml_type(value: Any) -> str:
    """Name the YAML type of a value with its article: "a list", "an integer", "null"."""
    kind = yaml_type(value)
    if kind == "null":
        return kind
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {kind}"


def describe(value: Any) -> str:
    """Describe a value as ``integer 3`` or ``string 'abc'``; containers by type only."""
    kind = yaml_type(value)
    if isinstance(value, (dict, list)) or value is None:
        return kind
    if isinstance(value, str):
        return f"{kind} {quote(value)}"
    return f"{kind} {str(value).lower()[:MAX_QUOTED_CHARS]}"


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return "did you mean 'x'?" for the closest choice, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {quote(close[0])}?" if close else None


def join_choices(choices: Iterable[str]) -> str:
    """Join choices as "'a', 'b' or 'c'"."""
    quoted = [quote(choice) for choice in choices]
    if len(quoted) <= 1:
        return "".join(quoted) or "none"
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]
