"""Desktop name patterns such as ``lab-{n}`` or ``lab-{n:fixed=2}``, and hostname patterns.

Desktops are numbered from 1. ``{n:fixed=N}`` pads the number with zeros to N digits.
Desktop names are at most 15 characters, the NetBIOS name limit that Windows guests
and VMware Horizon enforce, so a pool can later hold Windows desktops under the same
names. Hostname patterns take ``{name}`` (the desktop name), ``{n}`` (its number,
``{n:fixed=N}`` padded) and ``{pool}`` (the pool's key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.inventory.model import Pool

DESKTOP_NAME_MAX = 15
HOSTNAME_MAX = 63
FQDN_MAX = 253
MAX_POOL_SIZE = 10_000

DESKTOP_NAME_RULE = (
    f"letters, digits and dashes, not starting or ending with a dash, "
    f"at most {DESKTOP_NAME_MAX} characters"
)
DESKTOP_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_NUMBER_RE = re.compile(r"n(?::fixed=([1-9]))?")
_LITERAL_RE = re.compile(r"[A-Za-z0-9-]*")


class NamingError(ValueError):
    """A name or hostname pattern is invalid; ``fix`` is the next step for the user."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


@dataclass(frozen=True)
class NamePattern:
    """A parsed name pattern: the text before and after ``{n}`` and the zero-padding width."""

    prefix: str
    suffix: str
    width: int = 0

    def format(self, number: int) -> str:
        return f"{self.prefix}{number:0{self.width}d}{self.suffix}"

    def digits(self, size: int) -> int:
        return max(self.width, len(str(size)))

    def number_of(self, name: str) -> int | None:
        """Return the number this pattern gives ``name``, or None if it never makes ``name``.

        Names compare without case, as desktop names do elsewhere.
        """
        prefix, suffix = self.prefix.casefold(), self.suffix.casefold()
        folded = name.casefold()
        if not (folded.startswith(prefix) and folded.endswith(suffix)):
            return None
        digits = folded[len(prefix):len(folded) - len(suffix)]
        if not digits.isascii() or not digits.isdigit():
            return None
        number = int(digits)
        if number < 1 or self.format(number).casefold() != folded:
            return None
        return number

    @property
    def key(self) -> tuple[str, str, int]:
        """Pools whose patterns have the same key share one space of numbers."""
        return (self.prefix.casefold(), self.suffix.casefold(), self.width)


def parse_pattern(text: str) -> NamePattern:
    """Parse a desktop name pattern with exactly one ``{n}`` or ``{n:fixed=N}``."""
    parts = _PLACEHOLDER_RE.split(text)
    # split() alternates literal text and placeholder bodies: even items are literal.
    literals, placeholders = parts[0::2], parts[1::2]
    for literal in literals:
        _check_literal(text, literal)
    for body in placeholders:
        if not _NUMBER_RE.fullmatch(body):
            raise NamingError(
                f"name pattern {text!r} has the unknown placeholder {{{body}}}",
                fix="use {n} or {n:fixed=N} with N from 1 to 9",
            )
    if len(placeholders) != 1:
        raise NamingError(
            f"name pattern {text!r} must contain {{n}} exactly once, found {len(placeholders)}",
            fix="write one {n} (or {n:fixed=2} for 01, 02, ...) where the number goes",
        )
    number = _NUMBER_RE.fullmatch(placeholders[0])
    assert number is not None
    width = int(number.group(1) or 0)
    pattern = NamePattern(prefix=literals[0], suffix=literals[1], width=width)
    _check_dashes(text, pattern)
    literal = pattern.prefix + pattern.suffix
    if not literal or literal.isdigit():
        raise NamingError(
            f"name pattern {text!r} makes names of digits only, which Windows rejects as "
            "computer names",
            fix="add a letter, as in lab-{n}",
        )
    return pattern


def _check_literal(text: str, literal: str) -> None:
    if "{" in literal or "}" in literal:
        raise NamingError(
            f"name pattern {text!r} has an unmatched brace",
            fix="use {n} or {n:fixed=N}; variables are written {{ name }}",
        )
    if not _LITERAL_RE.fullmatch(literal):
        raise NamingError(
            f"name pattern {text!r} contains characters not allowed in desktop names",
            fix=f"desktop names use {DESKTOP_NAME_RULE}",
        )


def _check_dashes(text: str, pattern: NamePattern) -> None:
    if pattern.prefix.startswith("-") or pattern.suffix.endswith("-"):
        raise NamingError(
            f"name pattern {text!r} makes names that start or end with a dash",
            fix=f"desktop names use {DESKTOP_NAME_RULE}",
        )


def check_fits(text: str, pattern: NamePattern, size: int) -> None:
    """Raise NamingError unless every name of a pool of ``size`` desktops is valid."""
    if pattern.width and size >= 10**pattern.width:
        raise NamingError(
            f"name pattern {text!r} pads numbers to {pattern.width} digits, "
            f"which allows at most {10**pattern.width - 1} desktops, but size is {size}",
            fix=f"use {{n:fixed={len(str(size))}}} or plain {{n}}",
        )
    digits = pattern.digits(size)
    length = len(pattern.prefix) + digits + len(pattern.suffix)
    if length > DESKTOP_NAME_MAX:
        room = DESKTOP_NAME_MAX - digits
        raise NamingError(
            f"pattern {text!r} makes {length}-character names for {size} desktops; names "
            f"are limited to {DESKTOP_NAME_MAX} characters (NetBIOS), so with {digits}-digit "
            f"numbers the prefix and suffix around {{n}} may be at most {room} characters",
            fix=f"shorten the prefix and suffix to {room} characters in all",
        )


def check_desktop_name(name: str) -> None:
    """Raise NamingError unless ``name`` is a valid desktop name."""
    if len(name) > DESKTOP_NAME_MAX:
        raise NamingError(
            f"desktop name {name!r} is {len(name)} characters long, "
            f"more than the maximum of {DESKTOP_NAME_MAX}",
            fix=f"desktop names use {DESKTOP_NAME_RULE}",
        )
    if not DESKTOP_NAME_RE.fullmatch(name):
        raise NamingError(
            f"desktop name {name!r} is invalid", fix=f"desktop names use {DESKTOP_NAME_RULE}"
        )
    if name.isdigit():
        raise NamingError(f"desktop name {name!r} has digits only, which Windows rejects "
                          "as a computer name", fix="add a letter to the name")


def expand_names(pool: Pool) -> list[str]:
    """Return the desktop names of a validated pool, in order (desktop 1 first)."""
    if pool.names is not None:
        return list(pool.names)
    assert pool.naming is not None, "a validated pool has naming or names"
    pattern = parse_pattern(pool.naming)
    return [pattern.format(number) for number in range(1, pool.size + 1)]


def check_hostname_pattern(text: str) -> None:
    """Raise NamingError unless ``text`` uses only the hostname placeholders."""
    parts = _PLACEHOLDER_RE.split(text)
    for literal in parts[0::2]:
        if "{" in literal or "}" in literal:
            raise NamingError(
                f"hostname pattern {text!r} has an unmatched brace",
                fix="use {name}, {n}, {n:fixed=N} or {pool}",
            )
        if not _LITERAL_RE.fullmatch(literal):
            raise NamingError(
                f"hostname pattern {text!r} contains characters not allowed in hostnames",
                fix="hostnames use letters, digits and dashes (the domain goes in domain:)",
            )
    for body in parts[1::2]:
        if body not in ("name", "pool") and not _NUMBER_RE.fullmatch(body):
            raise NamingError(
                f"hostname pattern {text!r} has the unknown placeholder {{{body}}}",
                fix="use {name}, {n}, {n:fixed=N} or {pool}",
            )


def expand_hostname(text: str, name: str, number: int, pool: str) -> str:
    """Fill a hostname pattern checked by check_hostname_pattern."""

    def substitute(match: re.Match[str]) -> str:
        body = match.group(1)
        if body == "name":
            return name
        if body == "pool":
            return pool
        width = _NUMBER_RE.fullmatch(body)
        assert width is not None
        return f"{number:0{int(width.group(1) or 0)}d}"

    return _PLACEHOLDER_RE.sub(substitute, text)
