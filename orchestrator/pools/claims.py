"""The per-pool lock under which desktops are handed out, and claims on free desktops.

Checkout, release, assign and the refresh of a free desktop read a desktop's record and
write it back under the lock of its pool. So two checkouts never get the same desktop,
and a desktop that is being refreshed or deleted is never handed out: its record states
that (state "refreshing" or "deleting") until it is ready again or gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt

from orchestrator import locks
from orchestrator.state import metadata
from orchestrator.state.metadata import DesktopRecord

# Record states of a desktop that a release or refresh is re-creating or removing.
BUSY_STATES = ("refreshing", "deleting")


@contextlib.contextmanager
def pool_lock(inventory: str, pool: str) -> Iterator[None]:
    """Hold the lock of one pool of an inventory, in this process and across processes."""
    with locks.named_lock(f"pool:{inventory}:{pool}"):
        yield


def claim_free(domain: libvirt.virDomain, inventory: str, pool: str,
               state: str) -> DesktopRecord | None:
    """Mark a free, ready desktop with ``state`` so that no checkout takes it meanwhile.

    Returns the record as it was, or None if the desktop is in use, not ready or gone.
    """
    with pool_lock(inventory, pool):
        try:
            record = metadata.read(domain)
        except libvirt.libvirtError:
            return None
        if record is None or record.session_user or record.state != "ready":
            return None
        marked = metadata.from_xml(metadata.to_xml(record))
        marked.state = state
        metadata.write(domain, marked)
        return record
