"""The one place that opens libvirt connections.

libvirt prints its errors to stderr from a default handler; labctl turns them into
``HostError`` instead, so the handler is replaced once here.

labctl never reuses a connection across runs: each plan opens fresh ones and closes
them. A connection that breaks (libvirtd stopped or restarted) fails the rest of that
run with RECONNECT_FIX; ``labctl run`` then opens new ones at its next pass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import libvirt

from orchestrator.errors import HostError
from orchestrator.hosts.uri import weakened_host_key_check

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"

_handler_installed = False
_lock = threading.Lock()


class HostUnreachable(HostError):
    """libvirt.open failed because libvirtd does not run there, does not respond, or the
    URI is wrong."""


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """Drop libvirt's default stderr print; the exception raised carries the message."""


def _install_error_handler() -> None:
    global _handler_installed
    with _lock:
        if not _handler_installed:
            libvirt.registerErrorHandler(_ignore_libvirt_error, None)
            _handler_installed = True


def open_connection(uri: str = DEFAULT_URI, *, read_only: bool = False) -> libvirt.virConnect:
    """Open a libvirt connection to ``uri`` or raise a HostError naming the URI."""
    _install_error_handler()
    weakening = weakened_host_key_check(uri)
    if weakening:
        raise HostError(
            f"the URI turns off SSH host key checking ({weakening})", where=uri,
            fix=f"remove {weakening} and add the host's key to known_hosts",
        )
    log.debug("opening libvirt connection %s", uri)
    try:
        conn = libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostUnreachable(
            f"cannot connect to libvirt: {exc.get_error_message()}",
            where=uri,
            fix="check that libvirtd runs there (scripts/host-setup starts it locally) "
            "and that the URI is right",
        ) from exc
    if conn is None:
        raise HostError("cannot connect to libvirt", where=uri)
    return conn


@contextlib.contextmanager
def connection(uri: str = DEFAULT_URI, *, read_only: bool = False) -> Iterator[libvirt.virConnect]:
    """Open a connection for the ``with`` block and close it afterwards."""
    conn = open_connection(uri, read_only=read_only)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def is_local(uri: str) -> bool:
    """Return whether ``uri`` names the libvirtd on this machine (no host part)."""
    scheme, _, rest = uri.partition("://")
    if "+" in scheme and not scheme.endswith("+unix"):
        return False
    return rest.startswith("/") or rest == ""


# The fix for an error of a libvirt connection that broke (libvirtd stopped or restarted).
# A one-shot command fails on that connection for the rest of its run; `labctl run`
# opens a new connection at its next pass.
RECONNECT_FIX = ("the connection to libvirtd was lost: check that libvirtd runs, then run "
                 "the command again, which removes what this run left half-made")


def connection_lost(exc: BaseException) -> bool:
    """Return whether ``exc`` is a libvirt error of the connection itself, not of the call.

    libvirt reports a closed or broken connection ("client socket is closed", "Cannot
    recv data") from its RPC layer; errors of the daemon's drivers come from others.
    """
    return (isinstance(exc, libvirt.libvirtError)
            and exc.get_error_domain() == libvirt.VIR_FROM_RPC)


def libvirt_failure(what: str, exc: libvirt.libvirtError, *, where: str | None = None) -> HostError:
    """Return a HostError for a failed libvirt call, with a fix if the connection broke."""
    error = HostError(f"{what}: {exc.get_error_message() or exc}", where=where,
                      fix=RECONNECT_FIX if connection_lost(exc) else None)
    error.__cause__ = exc
    return error


def lost_libvirtd(exc: BaseException) -> bool:
    """Return whether ``exc`` or one of its causes is a lost or unreachable libvirtd.

    That is a connection that broke in a call, or one that could not be opened. It is an
    error of the host, not of the desktop or the call that met it.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, HostUnreachable) or connection_lost(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or getattr(current, "cause", None)
    return False
