"""Instant clones by restore: the parent VM's libvirt save image, rewritten per child.

libvirt 9.0 rejects restoring a save image under another name or UUID ("Target domain
name ... does not match source"), so each child is restored from the parent's save
image with a new domain XML written into its header. The header and the parent's
migration stream go to libvirt through a named pipe, so no child gets a copy of the
state file.

A save image (libvirt's ``qemu_saveimage.h``, format version 2, checked against
libvirt 9.0 and QEMU 7.2 save images) is laid out as:

- a 92-byte header: the 16-byte magic ``LibvirtQemudSave``, then native-endian
  (little-endian on x86) u32 fields version, data_len, was_running, compressed
  and cookieOffset, then 14 unused u32;
- data_len bytes of data: the domain XML and a NUL, the save cookie and a NUL
  (cookieOffset is where the cookie starts), then zero padding (libvirt adds
  64 KiB so that the XML can grow in place);
- QEMU's migration stream, starting with the magic ``QEVM``, to the end of the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import select
import struct
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from orchestrator.domain import Disk, DiskLayer
from orchestrator.errors import ConflictError, HostError, ImageError, LabctlError
from orchestrator.state import metadata

log = logging.getLogger(__name__)

MAGIC = b"LibvirtQemudSave"
# libvirt writes this magic first and the final one only once the save has finished.
PARTIAL_MAGIC = b"LibvirtQemudPart"
VERSION = 2
HEADER = struct.Struct("<16s5I56x")
HEADER_SIZE = HEADER.size
STREAM_MAGIC = b"QEVM"
# Zero padding libvirt appends to the data section (virQEMUSaveDataWrite).
LIBVIRT_PADDING = 64 * 1024

QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
LABCTL_NAMESPACE_PREFIX = "urn:labctl:"

# Serialized child XML keeps libvirt's usual prefixes instead of ns0, ns1.
ET.register_namespace(metadata.PREFIX, metadata.NAMESPACE)
ET.register_namespace("qemu", QEMU_NAMESPACE)

# Bytes moved per sendfile call, and the pipe buffer requested for the FIFO.
_CHUNK = 1 << 20
# Seconds between checks for a reader on the FIFO and for a stop request.
_POLL = 0.005
# Seconds a writer may still run after libvirt returned from a successful restore.
_DRAIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class SaveImage:
    """A parsed libvirt save image: its header fields and where the migration stream starts."""

    path: str
    version: int
    xml: str
    cookie: str
    was_running: bool
    compressed: int
    stream_offset: int
    size: int


def read_save_image(path: str) -> SaveImage:
    """Parse the header of the save image at ``path`` and check that a stream follows.

    Raises ImageError for a missing or unreadable file, a bad magic, an incomplete
    save, an unknown version, a compressed image or an inconsistent header.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(HEADER_SIZE)
            fields = _parse_header(path, header, size)
            data = handle.read(fields["data_len"])
            stream_magic = handle.read(len(STREAM_MAGIC))
    except FileNotFoundError as exc:
        raise ImageError(
            "save image not found", where=path,
            fix="save the parent VM first (virDomainSave) or check the path",
        ) from exc
    except OSError as exc:
        raise ImageError(f"cannot read save image: {exc.strerror}", where=path) from exc
    xml, cookie = _split_data(path, data, fields["cookie_offset"])
    stream_offset = HEADER_SIZE + fields["data_len"]
    if stream_magic != STREAM_MAGIC:
        raise _corrupt(path, f"no QEMU migration stream at byte {stream_offset} "
                             f"(found {stream_magic!r}, expected {STREAM_MAGIC!r})")
    return SaveImage(
        path=path, version=fields["version"], xml=xml, cookie=cookie,
        was_running=bool(fields["was_running"]), compressed=fields["compressed"],
        stream_offset=stream_offset, size=size,
    )


def _parse_header(path: str, header: bytes, size: int) -> dict[str, int]:
    if len(header) < HEADER_SIZE:
        raise _corrupt(path, f"file is {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, data_len, was_running, compressed, cookie_offset = HEADER.unpack(header)
    if magic == PARTIAL_MAGIC:
        raise ImageError(
            "save image is incomplete: libvirt did not finish writing it", where=path,
            fix="start the parent VM again and save it again",
        )
    if magic != MAGIC:
        raise _corrupt(path, f"magic is {magic!r}, expected {MAGIC!r}: "
                             "not a libvirt QEMU save image")
    if version == int.from_bytes(VERSION.to_bytes(4, "little"), "big"):
        raise ImageError(
            "save image was written on a host of the other byte order", where=path,
            fix="save the parent VM on a little-endian host",
        )
    if version != VERSION:
        raise ImageError(
            f"save image format version {version} is not supported (expected {VERSION})",
            where=path, fix="save the parent VM again with libvirt 1.0 or later",
        )
    if compressed != 0:
        raise ImageError(
            f"save image is compressed (libvirt format {compressed}), so its migration "
            "stream cannot be passed on unchanged", where=path,
            fix='set save_image_format = "raw" in /etc/libvirt/qemu.conf, restart '
            "libvirtd and save the parent VM again",
        )
    if data_len == 0 or HEADER_SIZE + data_len >= size:
        raise _corrupt(path, f"data length {data_len} does not fit a {size}-byte file")
    if cookie_offset >= data_len:
        raise _corrupt(path, f"cookie offset {cookie_offset} is past the data length {data_len}")
    return {"version": version, "data_len": data_len, "was_running": was_running,
            "compressed": compressed, "cookie_offset": cookie_offset}


def _split_data(path: str, data: bytes, cookie_offset: int) -> tuple[str, str]:
    """Return the domain XML and the cookie (empty when the image has none)."""
    xml_part = data[:cookie_offset] if cookie_offset else data
    cookie_part = data[cookie_offset:] if cookie_offset else b""
    xml = _c_string(path, xml_part, "domain XML")
    cookie = _c_string(path, cookie_part, "cookie") if cookie_part else ""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise _corrupt(path, f"the domain XML in the header is not valid XML: {exc}") from exc
    if root.tag != "domain":
        raise _corrupt(path, f"the header contains <{root.tag}>, expected <domain>")
    return xml, cookie


def _c_string(path: str, raw: bytes, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise _corrupt(path, f"the {what} in the header has no terminating NUL")
    try:
        return raw[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(path, f"the {what} in the header is not UTF-8: {exc}") from exc


def _corrupt(path: str, detail: str) -> ImageError:
    return ImageError(f"invalid save image: {detail}", where=path,
                      fix="save the parent VM again")


def child_header(image: SaveImage, xml: str) -> bytes:
    """Build the header and data section for a child whose domain XML is ``xml``.

    The stream of ``image`` follows it unchanged. The data section keeps the parent's
    length while the new XML fits, so the stream starts at the same offset, and grows
    without padding otherwise.
    """
    xml_bytes = xml.encode("utf-8") + b"\0"
    cookie_bytes = image.cookie.encode("utf-8") + b"\0" if image.cookie else b""
    used = len(xml_bytes) + len(cookie_bytes)
    data_len = max(image.stream_offset - HEADER_SIZE, used)
    cookie_offset = len(xml_bytes) if cookie_bytes else 0
    header = HEADER.pack(MAGIC, image.version, data_len, int(image.was_running),
                         image.compressed, cookie_offset)
    return header + xml_bytes + cookie_bytes + bytes(data_len - used)


def retarget_xml(xml: str, *, name: str, uuid: str, title: str, genid: str,
                 metadata_xml: str, disks: dict[str, Disk], console_log: str,
                 tcg_cache_mib: int = 0) -> str:
    """Rewrite the parent's saved (live) domain XML into the child's.

    The child gets its own name, UUID, title, genid (only where the parent has a
    <genid>), labctl metadata, disks and serial console log. Every labctl metadata
    element of the parent (its desktop or parent VM record) is replaced by
    ``metadata_xml``. Each disk whose <target dev> is a key of ``disks`` is pointed at
    that Disk (source, driver type, backing chain, read-only flag), and a key that
    matches no disk raises ImageError. A TCG domain's translated-code cache becomes
    ``tcg_cache_mib`` when that is not 0. The live-only ``id`` attribute goes. Everything
    else stays, because the devices must match the migration stream. The caller must
    retarget every writable disk: one left alone is still the parent's file.
    """
    root = _parse_domain(xml)
    root.attrib.pop("id", None)
    _set_child_text(root, "name", name)
    _set_child_text(root, "uuid", uuid)
    if root.find("genid") is not None:
        _set_child_text(root, "genid", genid)
    _set_title(root, title)
    _replace_metadata(root, metadata_xml)
    for target, disk in disks.items():
        _retarget_disk(_find_disk(root, target), target, disk)
    _set_console_log(root, console_log)
    cache = root.find("features/tcg/tb-cache")
    if tcg_cache_mib and cache is not None:
        cache.attrib["unit"] = "MiB"
        cache.text = str(tcg_cache_mib)
    return ET.tostring(root, encoding="unicode")


def _parse_domain(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabctlError(f"the parent's domain XML is not valid XML: {exc}") from exc
    if root.tag != "domain":
        raise LabctlError(f"the parent's domain XML has root <{root.tag}>, expected <domain>")
    return root


def _set_child_text(root: ET.Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        raise LabctlError(f"the parent's domain XML has no <{tag}> element")
    element.text = text


def _set_title(root: ET.Element, title: str) -> None:
    element = root.find("title")
    if not title:
        if element is not None:
            root.remove(element)
        return
    if element is None:
        element = ET.Element("title")
        anchor = root.find("genid")
        if anchor is None:
            anchor = root.find("uuid")
        root.insert(list(root).index(anchor) + 1, element)
    element.text = title


def _replace_metadata(root: ET.Element, metadata_xml: str) -> None:
    try:
        record = ET.fromstring(metadata_xml)
    except ET.ParseError as exc:
        raise LabctlError(f"the child's metadata is not valid XML: {exc}") from exc
    if not record.tag.startswith("{" + metadata.NAMESPACE + "}"):
        raise LabctlError(
            f"the child's metadata element {record.tag} is not in namespace "
            f"{metadata.NAMESPACE}", fix="serialize it with orchestrator.state.metadata.to_xml",
        )
    container = root.find("metadata")
    if container is None:
        container = ET.SubElement(root, "metadata")
    for element in list(container):
        if element.tag.startswith("{" + LABCTL_NAMESPACE_PREFIX):
            container.remove(element)
    container.append(record)


def _find_disk(root: ET.Element, target: str) -> ET.Element:
    for disk in root.iterfind("devices/disk"):
        element = disk.find("target")
        if element is not None and element.get("dev") == target:
            return disk
    raise ImageError(
        f"the parent's domain XML has no disk with target {target}",
        fix="name the child's disks by the parent's <target dev> values",
    )


def _retarget_disk(element: ET.Element, target: str, disk: Disk) -> None:
    if disk.target != target:
        raise LabctlError(f"disk {disk.path} has target {disk.target} but is given for {target}")
    element.set("type", "file")
    driver = element.find("driver")
    if driver is None:
        driver = ET.SubElement(element, "driver", {"name": "qemu"})
    driver.set("type", disk.format)
    source = element.find("source")
    if source is None:
        source = ET.SubElement(element, "source")
    source.attrib.clear()
    source.set("file", disk.path)
    for old in element.findall("backingStore"):
        element.remove(old)
    element.insert(list(element).index(source) + 1, _backing_store(disk.backing))
    _set_readonly(element, disk.readonly)


def _backing_store(layers: tuple[DiskLayer, ...]) -> ET.Element:
    """Build libvirt's nested <backingStore> chain; an empty element ends it."""
    element = ET.Element("backingStore")
    if layers:
        element.set("type", "file")
        ET.SubElement(element, "format", {"type": layers[0].format})
        ET.SubElement(element, "source", {"file": layers[0].path})
        element.append(_backing_store(layers[1:]))
    return element


def _set_readonly(element: ET.Element, readonly: bool) -> None:
    flag = element.find("readonly")
    if readonly and flag is None:
        ET.SubElement(element, "readonly")
    elif not readonly and flag is not None:
        element.remove(flag)


def _set_console_log(root: ET.Element, console_log: str) -> None:
    """Point the serial port's log at ``console_log`` (no log when it is empty).

    libvirt repeats the serial port's <log> in the <console> that aliases it, so both
    are rewritten.
    """
    for device in [*root.iterfind("devices/serial"), *root.iterfind("devices/console")]:
        log_element = device.find("log")
        if not console_log:
            if log_element is not None:
                device.remove(log_element)
            continue
        if log_element is None:
            log_element = ET.Element("log", {"append": "off"})
            device.insert(0, log_element)
        log_element.set("file", console_log)


def restore_child(conn: libvirt.virConnect, image: SaveImage, xml: str, *,
                  workdir: str, timeout: float) -> libvirt.virDomain:
    """Restore one child from ``image`` under the domain XML ``xml`` and return its domain.

    The child header and the parent's stream are written from a thread into a new
    FIFO (mode 0600) in ``workdir``, which libvirtd must be able to open, and libvirt
    restores from that FIFO. ``timeout`` bounds, in seconds, how long the writer waits
    for libvirt to open the FIFO and to read the stream. The child runs if the parent
    was running when it was saved. The FIFO is removed and the writer joined in every
    case. On failure no domain with the child's UUID stays behind, and HostError names
    the child and libvirt's message.
    """
    name, uuid = _domain_identity(xml)
    _check_unchanged(image)
    _check_name_free(conn, name, uuid)
    fifo = _make_fifo(workdir, name)
    writer = _StreamWriter(fifo, child_header(image, xml), image, timeout)
    started = time.monotonic()
    try:
        writer.start()
        _restore(conn, fifo, name, uuid, writer)
        writer.join(_DRAIN_TIMEOUT)
    finally:
        writer.stop()
        writer.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo)
    if not writer.done:
        # libvirt reported success, so QEMU had read the stream up to its end marker.
        log.debug("stream writer for %s did not finish after the restore: %s", name,
                  writer.error)
    log.info("restored instant clone %s from %s in %.2f s", name, image.path,
             time.monotonic() - started)
    return conn.lookupByName(name)


def _domain_identity(xml: str) -> tuple[str, str]:
    root = _parse_domain(xml)
    name = root.findtext("name") or ""
    uuid = root.findtext("uuid") or ""
    if not name or not uuid:
        raise LabctlError("the child's domain XML has no <name> or no <uuid>",
                          fix="build it with retarget_xml")
    return name, uuid


def _check_unchanged(image: SaveImage) -> None:
    """Raise ImageError if the file no longer has the size it had when it was parsed."""
    try:
        size = os.stat(image.path).st_size
    except OSError as exc:
        raise ImageError(f"cannot read save image: {exc.strerror}", where=image.path) from exc
    if size != image.size:
        raise ImageError(
            f"save image changed since it was read ({image.size} bytes then, {size} now)",
            where=image.path, fix="read it again with read_save_image",
        )


def _check_name_free(conn: libvirt.virConnect, name: str, uuid: str) -> None:
    """Raise ConflictError if a domain already has the child's name or UUID.

    The cleanup after a failed restore destroys the domain with the child's UUID, so
    no domain may have it beforehand.
    """
    for lookup, value in ((conn.lookupByName, name), (conn.lookupByUUIDString, uuid)):
        try:
            lookup(value)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue
            raise HostError(f"looking up domain {value} failed: {exc.get_error_message()}",
                            where=name) from exc
        raise ConflictError(f"a domain with the child's name or UUID {value} already exists",
                            where=name, fix="pick another name and UUID for the child")


def fifo_pattern(workdir: str, name: str) -> str:
    """Return the fnmatch pattern of the FIFOs that restoring child ``name`` creates."""
    # Exactly the 8 hex digits of token_hex(4), so child "k1" never matches k1-2's FIFO.
    return os.path.join(workdir, f".labctl-restore-{name}-{'[0-9a-f]' * 8}.fifo")


def _make_fifo(workdir: str, name: str) -> str:
    path = os.path.join(workdir, f".labctl-restore-{name}-{secrets.token_hex(4)}.fifo")
    try:
        os.mkfifo(path, 0o600)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise HostError(f"cannot create the restore FIFO: {exc.strerror}", where=path,
                        fix="pass a writable workdir that libvirtd can read") from exc
    return path


def _restore(conn: libvirt.virConnect, fifo: str, name: str, uuid: str,
             writer: _StreamWriter) -> None:
    try:
        # NOTE: virDomainRestoreFlags has no deadline of its own. A writer that times
        # out closes the FIFO, which makes the restore fail, but a libvirtd that stalls
        # after it has read the whole stream would block this call.
        conn.restoreFlags(fifo, None, 0)
    except libvirt.libvirtError as exc:
        writer.stop()
        writer.join()
        _remove_failed_child(conn, name, uuid)
        raise HostError(
            f"restoring instant clone {name} failed: {exc.get_error_message()}"
            + _writer_detail(writer.error),
            where=name, fix=_restore_fix(writer.error),
        ) from exc


def _writer_detail(error: Exception | None) -> str:
    # A broken pipe only means that libvirt stopped reading, which its message explains.
    if error is None or isinstance(error, BrokenPipeError):
        return ""
    return f". The stream writer stopped: {error}"


def _restore_fix(error: Exception | None) -> str:
    if isinstance(error, TimeoutError):
        return "allow a longer timeout, and check that libvirtd can open files in the workdir"
    return "check that the child's disks exist and that its XML keeps the parent's devices"


def _remove_failed_child(conn: libvirt.virConnect, name: str, uuid: str) -> None:
    """Destroy a domain that a failed restore left behind (libvirt 9.0 left none in tests)."""
    try:
        domain = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError:
        return
    log.warning("destroying %s, left by its failed restore", name)
    with contextlib.suppress(libvirt.libvirtError):
        domain.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        domain.undefine()


class _StreamWriter(threading.Thread):
    """Write a child header and then the parent's migration stream into a FIFO.

    It waits for a reader without blocking, so ``stop`` ends it at any point. ``run``
    stores any Exception in ``error`` for the caller instead of raising it.
    """

    def __init__(self, fifo: str, header: bytes, image: SaveImage, timeout: float):
        super().__init__(name=f"restore-writer:{os.path.basename(fifo)}", daemon=True)
        self._fifo = fifo
        self._header = header
        self._image = image
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._stopping = threading.Event()
        self.error: Exception | None = None
        self.done = False

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            descriptor = self._open_for_reader()
        except Exception as exc:  # noqa: BLE001 - reported through self.error
            self.error = exc
            self._release_reader()
            return
        try:
            self._write_all(descriptor)
            self.done = True
        except Exception as exc:  # noqa: BLE001 - reported through self.error
            self.error = exc
        finally:
            os.close(descriptor)

    def _open_for_reader(self) -> int:
        """Open the FIFO for writing once libvirt has opened it for reading."""
        while True:
            try:
                descriptor = os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
            else:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(descriptor, fcntl.F_SETPIPE_SZ, _CHUNK)
                return descriptor
            self._check_running("open the FIFO")
            self._stopping.wait(_POLL)

    def _release_reader(self) -> None:
        """Give EOF to a reader that opens the FIFO now or later, instead of a hang.

        libvirtd opens the FIFO with a blocking open, which waits for a writer. While
        this end is held open for both reading and writing, a waiting or new reader
        gets past its open. Unlinking the FIFO then makes later opens fail, and closing
        it gives every reader EOF, so the restore fails instead of hanging.
        """
        with contextlib.suppress(OSError):
            descriptor = os.open(self._fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.unlink(self._fifo)
            finally:
                os.close(descriptor)

    def _write_all(self, descriptor: int) -> None:
        view = memoryview(self._header)
        while view:
            self._wait_writable(descriptor)
            try:
                view = view[os.write(descriptor, view):]
            except BlockingIOError:
                continue
        with open(self._image.path, "rb") as source:
            offset = self._image.stream_offset
            while offset < self._image.size:
                self._wait_writable(descriptor)
                count = min(_CHUNK, self._image.size - offset)
                try:
                    offset += os.sendfile(descriptor, source.fileno(), offset, count)
                except BlockingIOError:
                    continue

    def _wait_writable(self, descriptor: int) -> None:
        while True:
            self._check_running("read the stream")
            remaining = self._deadline - time.monotonic()
            _, writable, _ = select.select([], [descriptor], [], max(0.0, min(remaining, 0.1)))
            if writable:
                return

    def _check_running(self, action: str) -> None:
        if self._stopping.is_set():
            raise InterruptedError("stream writer stopped")
        if time.monotonic() >= self._deadline:
            raise TimeoutError(f"timed out after {self._timeout:g} s waiting for libvirt to "
                               f"{action}")
