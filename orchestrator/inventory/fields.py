"""Value types of inventory fields: names, sizes, paths, SSH keys, crypt hashes, time zones.

Each type is an ``Annotated`` pydantic type. Its validator raises ``PydanticCustomError``
of type ``labctl`` with a one-line message and a ``fix`` in its context, and the loader
turns that into an InventoryError at the value's FILE:LINE.
"""

from __future__ import annotations

import base64
import binascii
import functools
import posixpath
import re
import zoneinfo
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from orchestrator.hosts import uri
from orchestrator.inventory import naming
from orchestrator.inventory.messages import describe, quote

MAX_TEXT_CHARS = 4096
MAX_COMMAND_CHARS = 64 * 1024
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
MAX_SIZE = 1 << 50

KEY_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
KEY_RULE = (
    "lowercase letters, digits, '-' and '_', starting with a letter or digit, at most 32 characters"
)
INVENTORY_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
INVENTORY_NAME_RULE = "letters, digits, '-' and '_', at most 32 characters"
VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def labctl_error(
    message: str, fix: str | None = None, *, field: str | None = None
) -> PydanticCustomError:
    """Build the pydantic error that the loader reports as an InventoryError.

    ``field`` names the key below the validated model that the error is about, so a
    model validator can point at ``pools.lab.instant`` rather than at ``pools.lab``.
    """
    # The message goes in the context: the template itself would treat {n} as a placeholder.
    context = {"message": message, "fix": fix or "", "field": field or ""}
    return PydanticCustomError("labctl", "{message}", context)


_CONTROL_RE = re.compile("[\x00-\x1f\x7f\ufffe\uffff]")


def _text_checks(value: str, *, single_line: bool, limit: int) -> str:
    if "\x00" in value:
        raise labctl_error("contains a NUL character", fix="remove it")
    if single_line and ("\n" in value or "\r" in value):
        raise labctl_error("must be a single line", fix="remove the line break")
    control = _CONTROL_RE.search(value) if single_line else None
    if control:
        # Paths and names go into libvirt's XML, and XML 1.0 cannot carry these at all.
        raise labctl_error(
            f"contains the control character U+{ord(control.group()):04X}", fix="remove it"
        )
    if len(value) > limit:
        raise labctl_error(f"is {len(value)} characters long, more than the maximum of {limit}")
    return value


def _single_line(value: str) -> str:
    return _text_checks(value, single_line=True, limit=MAX_TEXT_CHARS)


def _command(value: str) -> str:
    return _text_checks(value, single_line=False, limit=MAX_COMMAND_CHARS)


def _matching(regex: re.Pattern[str], label: str, rule: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        _single_line(value)
        if not regex.fullmatch(value):
            raise labctl_error(f"{label} {quote(value)} is invalid", fix=f"use {rule}")
        return value

    return check


def _string_schema(pattern: re.Pattern[str], description: str) -> WithJsonSchema:
    return WithJsonSchema(
        {"type": "string", "pattern": f"^{pattern.pattern}$", "description": description}
    )


SingleLine = Annotated[str, AfterValidator(_single_line)]
Command = Annotated[str, AfterValidator(_command)]

Key = Annotated[
    str,
    AfterValidator(_matching(KEY_RE, "name", KEY_RULE)),
    _string_schema(KEY_RE, f"A key of hosts, images, networks or pools: {KEY_RULE}."),
]
InventoryName = Annotated[
    str,
    AfterValidator(_matching(INVENTORY_NAME_RE, "inventory name", INVENTORY_NAME_RULE)),
    _string_schema(INVENTORY_NAME_RE, f"Inventory name: {INVENTORY_NAME_RULE}."),
]

POSIX_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
PosixUser = Annotated[
    str,
    AfterValidator(
        _matching(
            POSIX_USER_RE,
            "user name",
            "a POSIX user name: lowercase letters, digits, '-' and '_', "
            "starting with a letter or '_', at most 32 characters",
        )
    ),
    _string_schema(POSIX_USER_RE, "POSIX user name."),
]

LIBVIRT_NETWORK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LibvirtNetworkName = Annotated[
    str,
    AfterValidator(
        _matching(
            LIBVIRT_NETWORK_RE,
            "libvirt network name",
            "letters, digits, '.', '-' and '_', at most 64 characters",
        )
    ),
    _string_schema(LIBVIRT_NETWORK_RE, "Name of an existing libvirt network."),
]

# Linux interface names are at most 15 bytes (IFNAMSIZ is 16 with the final NUL).
BRIDGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
BridgeName = Annotated[
    str,
    AfterValidator(
        _matching(BRIDGE_RE, "bridge name", "a Linux interface name of at most 15 characters")
    ),
    _string_schema(BRIDGE_RE, "Name of an existing host bridge, such as br0."),
]

HEX_VERSION_RE = re.compile(r"[0-9a-f]{4,64}")
HexVersion = Annotated[
    str,
    AfterValidator(
        _matching(HEX_VERSION_RE, "image version", "4 to 64 lowercase hex digits of the version")
    ),
    _string_schema(HEX_VERSION_RE, "A prefix of the image version (hex digits of its SHA-256)."),
]

URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def _libvirt_uri(value: str) -> str:
    """Reject URIs that make libvirt's client run a program named in the inventory, or
    that weaken SSH host key checking."""
    scheme = value.split("://", 1)[0].lower()
    if scheme.endswith("+ext") or any(
        name in ("command", "netcat", "proxy") for name, _ in uri.query_parameters(value)
    ):
        raise labctl_error(
            f"libvirt URI {quote(value)} names a program for libvirt to run "
            "(the ext transport, or a command=, netcat= or proxy= parameter)",
            fix="use qemu:///system or qemu+ssh://user@host/system",
        )
    weakening = uri.weakened_host_key_check(value)
    if weakening:
        raise labctl_error(
            f"libvirt URI {quote(value)} turns off SSH host key checking ({weakening})",
            fix=f"remove {weakening} and add the host's key to known_hosts "
            "(ssh-keyscan HOST, then compare its fingerprint with the host's)",
        )
    return value


LibvirtUri = Annotated[
    str,
    AfterValidator(
        _matching(
            URI_RE,
            "libvirt URI",
            "a URI with a scheme, such as qemu:///system or qemu+ssh://user@host/system",
        )
    ),
    AfterValidator(_libvirt_uri),
    _string_schema(URI_RE, "libvirt connection URI, such as qemu:///system."),
]


def _absolute_path(value: str) -> str:
    _single_line(value)
    if not value.startswith("/"):
        raise labctl_error(f"path {quote(value)} is not absolute", fix="start it with /")
    if any(part in (".", "..") for part in value.split("/")):
        # A '..' hides where the files go; libvirt and labctl's checks see the written text.
        raise labctl_error(
            f"path {quote(value)} contains a '.' or '..' component",
            fix=f"write the path it stands for: {quote(posixpath.normpath(value))}",
        )
    return value


AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]

# Directories a storage pool must not be: labctl writes, lists and (at destroy) deletes
# the volumes of its pools, and a pool's directory is created and owned for QEMU.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/sbin", "/sys", "/usr")  # and everything below them
SYSTEM_DIRECTORIES = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv",
                      "/tmp", "/var", "/var/lib", "/var/lib/libvirt", "/var/log", "/var/run")


def _storage_path(value: str) -> str:
    _absolute_path(value)
    path = posixpath.normpath(value.rstrip("/") or "/").replace("//", "/")
    inside = next((tree for tree in SYSTEM_TREES
                   if path == tree or path.startswith(f"{tree}/")), None)
    if inside is not None or path in SYSTEM_DIRECTORIES:
        where = f"inside the system directory {inside}" if inside else "a system directory"
        raise labctl_error(
            f"path {quote(value)} is {where}: a storage pool there would mix desktop "
            "disks with the system's files",
            fix="give the pool a directory of its own, such as /var/lib/labctl/pool",
        )
    return value


StoragePath = Annotated[str, AfterValidator(_storage_path)]


def _shell(value: str) -> str:
    _absolute_path(value)
    if any(char.isspace() for char in value):
        raise labctl_error(f"shell {quote(value)} contains white space", fix="use a path")
    return value


ShellPath = Annotated[str, AfterValidator(_shell)]


DNS_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _dns_domain(value: str) -> str:
    _single_line(value)
    labels = value.split(".")
    if len(value) > naming.FQDN_MAX or not all(DNS_LABEL_RE.fullmatch(x) for x in labels):
        raise labctl_error(
            f"DNS domain {quote(value)} is invalid",
            fix="use dot-separated labels of letters, digits and dashes, such as lab.example",
        )
    return value


DnsDomain = Annotated[
    str,
    AfterValidator(_dns_domain),
    WithJsonSchema({"type": "string", "description": "DNS domain: the FQDN is hostname.domain."}),
]


@functools.cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _timezone(value: str) -> str:
    _single_line(value)
    if value not in _time_zones():
        raise labctl_error(
            f"unknown time zone {quote(value)}",
            fix="use a tz database name such as Etc/UTC or Europe/Berlin",
        )
    return value


TimeZone = Annotated[
    str,
    AfterValidator(_timezone),
    WithJsonSchema({"type": "string", "description": "tz database name, such as Etc/UTC."}),
]

# Crypt(3) formats that libxcrypt 4.4 (Debian 12's crypt) accepts: SHA-256, SHA-512,
# yescrypt, gost-yescrypt, bcrypt and scrypt. It takes MD5 ($1$) and DES too, but those
# are too weak, so they are rejected here.
CRYPT_RE = re.compile(r"\$(5|6|y|gy|2[aby]|7)\$[./A-Za-z0-9$=,]+")


def _password_hash(value: str) -> str:
    # The value may be a real password typed by mistake: no message may contain it.
    if CRYPT_RE.fullmatch(value):
        return value
    if re.fullmatch(r"\$[0-9a-z]+\$\S+", value):
        raise labctl_error(
            "password_hash uses a weak or unknown crypt(3) method (the value is not shown)",
            fix="use SHA-512 ($6$, mkpasswd -m sha-512) or yescrypt ($y$, mkpasswd -m yescrypt)",
        )
    raise labctl_error(
        "password_hash must be a crypt(3) hash such as $6$... or $y$..., "
        "not a plain password (the value is not shown)",
        fix="create one with mkpasswd -m sha-512 or openssl passwd -6",
    )


PasswordHash = Annotated[
    str,
    AfterValidator(_password_hash),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^{CRYPT_RE.pattern}$",
            "description": "crypt(3) hash, e.g. from mkpasswd -m sha-512; never a plain password.",
        }
    ),
]

SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)


def _ssh_key(value: str) -> str:
    _single_line(value)
    parts = value.split(None, 2)
    fix = "paste one line of a .pub file: TYPE BASE64 [COMMENT], e.g. ssh-ed25519 AAAAC3..."
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise labctl_error(f"SSH public key {quote(value)} has no known key type", fix=fix)
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise labctl_error(f"SSH public key {quote(value)} is not valid base64", fix=fix) from exc
    # The key blob starts with its own type as an SSH string (a 4-byte length, then the text).
    length = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + length] != parts[0].encode():
        raise labctl_error(
            f"SSH public key {quote(value)} does not match its type {parts[0]}", fix=fix
        )
    return value


SshPublicKey = Annotated[
    str,
    AfterValidator(_ssh_key),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(ssh-|ecdsa-sha2-|sk-)\S+ [A-Za-z0-9+/]+={0,3}( .*)?$",
            "description": "OpenSSH public key line: TYPE BASE64 [COMMENT].",
        }
    ),
]


# Sizes: a number of bytes, or a number with a unit. As in libvirt and qemu-img, a bare
# letter and "iB" are binary (1G = 1GiB = 2**30 bytes) and "B" after the letter is
# decimal (1GB = 10**9 bytes).
# ASCII digits only, at most 30 before and after the point (fullwidth digits are not sizes).
SIZE_RE = re.compile(
    r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*(?:([kKMGTP])(i?)(B?)|(B?))\s*", re.ASCII
)
SIZE_UNIT_POWER = {"k": 1, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
SIZE_SCHEMA_PATTERN = r"^\s*\d+(\.\d+)?\s*([kKMGTP]i?B?|B)?\s*$"
SIZE_EXAMPLES = "512MiB, 4GiB, 1G or 500MB, or a plain number of bytes"


def parse_size(value: Any) -> int:
    """Convert an inventory size (int bytes or text like ``512MiB``) to bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise labctl_error(f"expected a size, got {describe(value)}", fix=f"use {SIZE_EXAMPLES}")
    if isinstance(value, int):
        return value
    match = SIZE_RE.fullmatch(value)
    if not match:
        raise labctl_error(f"invalid size {quote(value)}", fix=f"use {SIZE_EXAMPLES}")
    number, letter, binary, decimal_b, _bytes = match.groups()
    factor = 1
    if letter:
        base = 1000 if decimal_b and not binary else 1024
        factor = base ** SIZE_UNIT_POWER[letter]
    try:
        exact = Decimal(number) * factor
    except InvalidOperation as exc:
        raise labctl_error(f"invalid size {quote(value)}", fix=f"use {SIZE_EXAMPLES}") from exc
    if exact != exact.to_integral_value():
        raise labctl_error(
            f"size {quote(value)} is not a whole number of bytes", fix="use e.g. 512MiB or 1GiB"
        )
    return int(exact)


def format_size(size: int) -> str:
    """Format bytes in the largest binary unit that divides them, e.g. ``512MiB``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


def _size_range(minimum: int, maximum: int = 0) -> Callable[[int], int]:
    maximum = maximum or MAX_SIZE

    def check(size: int) -> int:
        if size < minimum:
            raise labctl_error(
                f"size {format_size(size)} is below the minimum of {format_size(minimum)}",
                fix=f"use {format_size(minimum)} or more",
            )
        if size > maximum:
            # str() of an int of more than 4300 digits raises, so huge sizes are not shown.
            size_text = str(size) if size.bit_length() <= 128 else "of more than 38 digits"
            raise labctl_error(
                f"size {size_text} is above the maximum of {format_size(maximum)}",
                fix=f"use {format_size(maximum)} or less",
            )
        return size

    return check


def size_type(minimum: int, description: str, maximum: int = 0) -> Any:
    """Build the annotated type of a size field stored as int bytes (``maximum`` 0: MAX_SIZE)."""
    return Annotated[
        int,
        BeforeValidator(parse_size),
        AfterValidator(_size_range(minimum, maximum)),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": minimum},
                    {"type": "string", "pattern": SIZE_SCHEMA_PATTERN},
                ],
                "description": f"{description} Bytes, or a number with a unit: {SIZE_EXAMPLES}.",
            }
        ),
    ]


# Durations: seconds, or a number with a unit (s, m, h, d), e.g. 90s, 5m, 2h.
DURATION_RE = re.compile(r"\s*(\d+)\s*([smhd]?)\s*")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 365 * 86400
DURATION_EXAMPLES = "90s, 5m, 2h, 1d or a plain number of seconds"


def parse_duration(value: Any) -> int:
    """Convert an inventory duration (int seconds or text like ``5m``) to seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise labctl_error(
            f"expected a duration, got {describe(value)}", fix=f"use {DURATION_EXAMPLES}"
        )
    if isinstance(value, int):
        seconds = value
    else:
        match = DURATION_RE.fullmatch(value)
        if not match:
            raise labctl_error(f"invalid duration {quote(value)}", fix=f"use {DURATION_EXAMPLES}")
        seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    if not 0 <= seconds <= MAX_DURATION:
        raise labctl_error(f"duration {value} is outside 0 to {MAX_DURATION} seconds (1 year)")
    return seconds


def _duration_range(minimum: int, maximum: int) -> Callable[[int], int]:
    def check(seconds: int) -> int:
        if not minimum <= seconds <= maximum:
            raise labctl_error(f"duration of {seconds} s is outside {minimum} to {maximum} s",
                               fix=f"use a duration from {minimum} to {maximum} seconds")
        return seconds

    return check


def duration_type(description: str, minimum: int = 0, maximum: int = MAX_DURATION) -> Any:
    """Build the annotated type of a duration field stored as int seconds."""
    return Annotated[
        int,
        BeforeValidator(parse_duration),
        AfterValidator(_duration_range(minimum, maximum)),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": minimum, "maximum": maximum},
                    {"type": "string", "pattern": r"^\s*\d+\s*[smhd]?\s*$"},
                ],
                "description": f"{description} Seconds, or a number with a unit: "
                f"{DURATION_EXAMPLES}.",
            }
        ),
    ]


def _naming_pattern(value: str) -> str:
    _single_line(value)
    try:
        naming.parse_pattern(value)
    except naming.NamingError as exc:
        raise labctl_error(exc.message, exc.fix) from exc
    return value


NamingPattern = Annotated[
    str,
    AfterValidator(_naming_pattern),
    WithJsonSchema(
        {
            "type": "string",
            "description": "Desktop name pattern with exactly one {n} (1, 2, ...) or "
            "{n:fixed=N} (zero-padded to N digits); names are letters, digits and dashes, "
            f"at most {naming.DESKTOP_NAME_MAX} characters.",
        }
    ),
]


def _desktop_name(value: str) -> str:
    _single_line(value)
    try:
        naming.check_desktop_name(value)
    except naming.NamingError as exc:
        raise labctl_error(exc.message, exc.fix) from exc
    return value


DesktopName = Annotated[
    str,
    AfterValidator(_desktop_name),
    _string_schema(naming.DESKTOP_NAME_RE, f"Desktop name: {naming.DESKTOP_NAME_RULE}."),
]


def _hostname_pattern(value: str) -> str:
    _single_line(value)
    try:
        naming.check_hostname_pattern(value)
    except naming.NamingError as exc:
        raise labctl_error(exc.message, exc.fix) from exc
    return value


HostnamePattern = Annotated[
    str,
    AfterValidator(_hostname_pattern),
    WithJsonSchema(
        {
            "type": "string",
            "description": "Hostname pattern: {name} is the desktop name, {n} its number "
            "({n:fixed=N} zero-padded), {pool} the pool's key.",
        }
    ),
]
