"""Desktop facts stored in each domain's <metadata> under labctl's XML namespace.

libvirt is the record of truth: ``labctl status`` reads these elements back, so it
works after a restart, from another directory or another machine pointed at the host.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import libvirt

NAMESPACE = "urn:labctl:desktop:1"
# Instant-clone parent VMs carry their record under their own namespace, so nothing
# that lists desktops ever mistakes a parent for one.
PARENT_NAMESPACE = "urn:labctl:parent:1"
PREFIX = "labctl"
ROOTS = {NAMESPACE: "desktop", PARENT_NAMESPACE: "parent"}


@dataclass
class DesktopRecord:
    """Facts about one desktop that labctl stores with its domain."""

    inventory: str
    pool: str
    index: int
    clone: str
    image: str
    host: str
    hostname: str
    fqdn: str
    machine_id: str
    mac: str
    disk: str
    seed: str = ""
    network: str = ""
    ssh_port: int = 0
    generation: int = 1
    state: str = "provisioning"
    created: str = ""
    ready_seconds: float = 0.0
    config_hash: str = ""
    user: str = ""
    # Assignment and session: the user a dedicated desktop belongs to, and the user who
    # has it checked out now, since when (ISO 8601 UTC). Empty: unassigned / free.
    assigned_to: str = ""
    session_user: str = ""
    session_since: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}


def to_xml(record: object, namespace: str = NAMESPACE) -> str:
    """Serialize a record dataclass as the element libvirt stores (namespace on the root)."""
    root = ET.Element(ROOTS[namespace], {"xmlns": namespace})
    for name in _fields(type(record)):
        child = ET.SubElement(root, name)
        child.text = str(getattr(record, name))
    for key, value in sorted(getattr(record, "extra", {}).items()):
        ET.SubElement(root, "extra", {"key": key}).text = value
    # ElementTree writes a CR in text as is and XML parsers read it as LF, so a character
    # reference replaces it. ElementTree already escapes CR in attributes.
    return ET.tostring(root, encoding="unicode").replace("\r", "&#13;")


def from_xml(text: str, cls: type = DesktopRecord):
    """Parse the element written by ``to_xml``; unknown children are ignored."""
    root = ET.fromstring(text)
    fields = _fields(cls)
    values: dict[str, object] = {}
    extra: dict[str, str] = {}
    for child in root:
        tag = child.tag.split("}", 1)[-1]
        if tag == "extra":
            extra[child.get("key", "")] = child.text or ""
        elif tag in fields:
            values[tag] = _convert(fields[tag], child.text or "")
    if "extra" in {f.name for f in dataclasses.fields(cls)}:
        values["extra"] = extra
    return cls(**values)


def _convert(spec: dataclasses.Field, text: str) -> object:
    if spec.type in ("int", int):
        return int(text or 0)
    if spec.type in ("float", float):
        return float(text or 0)
    return text


def read(domain: libvirt.virDomain, cls: type = DesktopRecord, namespace: str = NAMESPACE):
    """Return the record stored in ``domain`` or None if labctl did not create it."""
    try:
        text = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0)
    except libvirt.libvirtError as exc:
        # A domain that vanished since it was listed (another program removed it)
        # has no record either.
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                                    libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise
    return from_xml(text, cls)


def write(domain: libvirt.virDomain, record: object, namespace: str = NAMESPACE) -> None:
    """Replace the stored record in the live and (if there is one) persistent definition."""
    flags = 0
    if domain.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if domain.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    domain.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, to_xml(record, namespace), PREFIX, namespace, flags
    )


def inventory_desktops(conn: libvirt.virConnect,
                       inventory: str) -> dict[str, tuple[libvirt.virDomain, DesktopRecord]]:
    """Return the domains whose labctl record belongs to ``inventory``, by name."""
    found = {}
    for domain in conn.listAllDomains(0):
        record = read(domain)
        if record is not None and record.inventory == inventory:
            found[domain.name()] = (domain, record)
    return found
