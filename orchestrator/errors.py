"""Typed errors that the CLI prints as one line: what failed, where, and how to fix it."""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"\s*[\r\n]+\s*")


class LabctlError(Exception):
    """Base class of every error labctl reports to the user without a traceback.

    ``where`` is a FILE:LINE, a libvirt URI, a domain or a path; ``fix`` is the next
    step for the operator. Both are optional but most errors should have them.
    """

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.fix = fix

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text = f"{text} ({self.fix})"
        # One line, because the CLI prints each error as one line: messages quoted from
        # libvirt or qemu-img may end in a newline or span several.
        return _LINE_BREAK.sub(" ", text).strip()


class InventoryError(LabctlError):
    """The inventory YAML is malformed, invalid or inconsistent."""

    exit_code = 2


class HostError(LabctlError):
    """The libvirt host cannot be reached or cannot do what is asked."""


class ImageError(LabctlError):
    """An image file is missing, corrupt, has a broken backing chain or failed to build."""


class StorageError(LabctlError):
    """A volume, replica or overlay could not be created, read or removed."""


class GuestError(LabctlError):
    """A guest did not respond in time or returned something unexpected."""


class GuestTimeout(GuestError):
    """A wait for a guest ran past its deadline."""


class ConflictError(LabctlError):
    """Another object (a foreign domain, another pool, another labctl run) is in the way."""
