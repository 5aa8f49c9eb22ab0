"""Checks on libvirt connection URIs that need no connection.

libvirt's remote driver takes two URI parameters that weaken SSH host key checking
(both names, and the ssh option, are strings in libvirt 9.0's client library):

- ``no_verify=1`` makes the ``ssh`` transport run ``ssh -o StrictHostKeyChecking=no``,
  which accepts any new host key without asking (for TLS it skips the certificate check).
- ``known_hosts_verify=auto`` makes the ``libssh`` and ``libssh2`` transports accept new
  host keys without asking, and ``known_hosts_verify=ignore`` skips the check entirely.

labctl rejects both, so a remote host is always checked against the operator's
known_hosts file.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

UNCHECKED_KNOWN_HOSTS = ("auto", "ignore")


def query_parameters(uri: str) -> list[tuple[str, str]]:
    """Return the URI's query parameters in order, names in lower case.

    libvirt separates parameters with ``&`` or ``;``.
    """
    query = uri.split("?", 1)[1] if "?" in uri else ""
    pairs = parse_qsl(query.replace(";", "&"), keep_blank_values=True)
    return [(name.lower(), value) for name, value in pairs]


def weakened_host_key_check(uri: str) -> str | None:
    """Return the parameter of ``uri`` that weakens SSH host key checking, or None."""
    for name, value in query_parameters(uri):
        if name == "no_verify" and not _is_zero(value):
            return f"{name}={value}"
        if name == "known_hosts_verify" and value.lower() in UNCHECKED_KNOWN_HOSTS:
            return f"{name}={value}"
    return None


def _is_zero(value: str) -> bool:
    try:
        return int(value) == 0
    except ValueError:
        return False
