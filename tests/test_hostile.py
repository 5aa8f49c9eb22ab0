"""The hostile-input corpus (tests/hostile/): each inventory is rejected with its exact error.

Every file in tests/hostile/ carries one hostile idea and its expected error in a
three-line header::

    # hostile: what the file tries
    # expect: LINE: message          (or OTHER-FILE:LINE: message, relative to the corpus)
    # fix: the fix in parentheses     (or - for none)

``{dir}`` in a header stands for the corpus directory as passed to labctl and
``{realdir}`` for its resolved path. ``labctl validate`` and ``labctl plan`` must print
exactly ``labctl: error: FILE:LINE: message (fix)`` as their only line, exit with 2,
and leave the host as it was. Files in tests/hostile/accept/ are legal but hostile:
they must load, and every value must come back unchanged from the rendered domain,
volume and pool XML and from the cloud-init seed (see test_accepted_values_round_trip).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import URI, run_labctl
from orchestrator import cli, paths
from orchestrator.hosts.connection import open_connection
from orchestrator.inventory import load_inventory
from roundtrip import check_inventory_renders

REPO = Path(__file__).resolve().parent.parent
CORPUS_DIR = "tests/hostile"
CORPUS = REPO / CORPUS_DIR
REJECTED = sorted(CORPUS.glob("*.yaml"))
ACCEPTED = sorted((CORPUS / "accept").glob("*.yaml"))
# A labctl process takes about 0.5 s to start (labctl validate, measured on 2 cores), so
# only this sample goes through real processes.
CLI_SAMPLE = [
    "tag-python-apply", "alias-billion-laughs", "byte-nul", "byte-latin1", "include-absolute",
    "include-loop", "uri-command-encoded", "jinja-nested-loops", "password-newline",
    "escape-newline-name", "unknown-top-key-secret",
]
# Names the corpus would give to libvirt objects; other developers' tests share this
# libvirtd, so the snapshot covers only these.
CORPUS_PREFIXES = ("hz", "labctl-hz")
PWNED_MARKER = Path("/tmp/hz-pwned")
HEADER_RE = re.compile(
    r"\A\ufeff?# hostile: (?P<idea>.+)\n# expect: (?P<expect>.+)\n# fix: (?P<fix>.+)\n"
)
WHERE_RE = re.compile(r"(?:(?P<file>[\w./-]+\.yaml):)?(?P<line>\d+): (?P<message>.+)")


@dataclass(frozen=True)
class Expected:
    """The error one corpus file must produce."""

    idea: str
    where: str
    message: str
    fix: str | None

    def stderr(self) -> str:
        text = f"labctl: error: {self.where}: {self.message}"
        return f"{text} ({self.fix})\n" if self.fix else f"{text}\n"


def display(path: Path) -> str:
    """The path as the tests pass it to labctl: relative to the checkout."""
    return str(path.relative_to(REPO))


def expected_error(path: Path) -> Expected:
    head = path.read_bytes()[:4096].decode("utf-8", "replace")
    header = HEADER_RE.match(head)
    assert header, f"{path.name}: the file must start with # hostile:, # expect:, # fix:"
    values = {
        key: header[key].replace("{realdir}", str(CORPUS.resolve())).replace("{dir}", CORPUS_DIR)
        for key in ("idea", "expect", "fix")
    }
    where = WHERE_RE.fullmatch(values["expect"])
    assert where, f"{path.name}: # expect: must be [FILE:]LINE: MESSAGE"
    file = f"{CORPUS_DIR}/{where['file']}" if where["file"] else display(path)
    fix = None if values["fix"] == "-" else values["fix"]
    return Expected(values["idea"], f"{file}:{where['line']}", where["message"], fix)


# --- running labctl ---------------------------------------------------------------------------


def run_in_process(capsys, *args: str, seconds: float = 20) -> tuple[int, str, str]:
    """Run labctl's main() in this process (spawning 250 processes would take minutes).

    main() installs signal handlers, and this function puts them back afterwards. An alarm turns a hang
    into a failure of this test instead of a hung suite.
    """
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM,
                                                    signal.SIGPIPE, signal.SIGALRM)}
    in_main = threading.current_thread() is threading.main_thread()

    def too_slow(_signum, _frame):
        raise AssertionError(f"labctl {' '.join(args)} ran longer than {seconds} s")

    if in_main:
        signal.signal(signal.SIGALRM, too_slow)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        code = cli.main(list(args))
    finally:
        if in_main:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    return code, out, err


def assert_rejected(expected: Expected, code: int, out: str, err: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert out == "", f"nothing belongs on stdout, got {out!r}"
    assert err.count("\n") == 1, f"the error must be one line, got {err!r}"
    assert err == expected.stderr(), f"\n got:      {err!r}\n expected: {expected.stderr()!r}"


# --- what the host looks like -----------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """labctl's data directory (catalog, state) for the test, with files that must stay as
    they are."""
    root = tmp_path / "labctl-data"
    monkeypatch.setenv("LABCTL_DATA_DIR", str(root))
    for directory in (paths.images_dir(), paths.state_dir()):
        directory.mkdir(parents=True)
        (directory / "keep.json").write_text('{"hostile": "corpus"}\n')
    return root


def files_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Mode, mtime and content hash of every file and directory below ``root``."""
    found: dict[str, tuple[int, int, str]] = {}
    for directory, _dirs, files in os.walk(root):
        for name in ["", *files]:
            path = Path(directory, name)
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if name else ""
            found[str(path.relative_to(root))] = (info.st_mode, info.st_mtime_ns, digest)
    return found


def libvirt_snapshot(conn) -> dict[str, object]:
    """The corpus-named domains, storage pools, volumes and networks libvirt has."""

    def ours(name: str) -> bool:
        return name.startswith(CORPUS_PREFIXES)

    volumes = set()
    for pool in conn.listAllStoragePools():
        if pool.isActive():
            volumes |= {(pool.name(), name) for name in pool.listVolumes() if ours(name)}
    return {
        "domains": sorted(d.name() for d in conn.listAllDomains() if ours(d.name())),
        "pools": sorted(p.name() for p in conn.listAllStoragePools() if ours(p.name())),
        "volumes": sorted(volumes),
        "networks": sorted(n.name() for n in conn.listAllNetworks() if ours(n.name())),
    }


@pytest.fixture(scope="module")
def libvirt_conn():
    connection = open_connection(URI)
    yield connection
    connection.close()


@pytest.fixture
def host_unchanged(libvirt_conn, data_dir):
    """Snapshot libvirt and labctl's files before the test and compare them after it."""
    before = (libvirt_snapshot(libvirt_conn), files_snapshot(data_dir))
    yield
    after = (libvirt_snapshot(libvirt_conn), files_snapshot(data_dir))
    assert after[0] == before[0], "libvirt objects named by the corpus changed"
    assert after[1] == before[1], "labctl's catalog or state directory changed"
    assert not PWNED_MARKER.exists(), f"{PWNED_MARKER} exists: a YAML tag ran a command"


# --- the rejected corpus ----------------------------------------------------------------------


def test_corpus_is_complete():
    """At least 50 hostile files, each with one idea of its own and a parsable header."""
    ideas = [expected_error(path).idea for path in REJECTED]
    assert len(REJECTED) >= 50, f"only {len(REJECTED)} corpus files"
    assert len(set(ideas)) == len(ideas), "two corpus files describe the same idea"


@pytest.mark.parametrize("path", REJECTED, ids=[path.stem for path in REJECTED])
def test_rejected_exactly(path, capsys, monkeypatch, host_unchanged):
    """validate and plan both print the expected FILE:LINE, message and fix, and no more."""
    monkeypatch.chdir(REPO)
    expected = expected_error(path)
    for command in ("validate", "plan"):
        assert_rejected(expected, *run_in_process(capsys, command, display(path)))


@pytest.mark.parametrize("stem", CLI_SAMPLE)
def test_rejected_by_real_process(stem, host_unchanged):
    """A sample through a real labctl process: the same single line, exit code 2."""
    path = CORPUS / f"{stem}.yaml"
    expected = expected_error(path)
    for command in ("validate", "plan"):
        result = run_labctl(command, display(path), timeout=60)
        assert_rejected(expected, result.returncode, result.stdout, result.stderr)


def test_include_symlink_outside_rejected(tmp_path, capsys, monkeypatch, host_unchanged):
    """A symlink to a file outside the directory is rejected before the file is read."""
    secret = tmp_path / "secret" / "outside.yaml"
    secret.parent.mkdir()
    secret.write_text("pools: {}\n")
    main = tmp_path / "lab" / "main.yaml"
    main.parent.mkdir()
    (main.parent / "link.yaml").symlink_to(secret)
    main.write_text("include: link.yaml\npools: {}\n")
    expected = Expected(
        "", f"{main}:1",
        f"include: 'link.yaml' is outside the main inventory's directory {main.parent}",
        "keep included files in the main inventory's directory or below it",
    )
    assert_rejected(expected, *run_in_process(capsys, "validate", str(main)))


def test_include_next_to_symlinked_main(tmp_path):
    """Includes resolve next to the main file as named, even when it is a symlink."""
    (tmp_path / "store").mkdir()
    (tmp_path / "lab").mkdir()
    (tmp_path / "store" / "real.yaml").write_text("name: linked\ninclude: common.yaml\n")
    (tmp_path / "lab" / "common.yaml").write_text("images: {img: {build: tiny}}\n")
    (tmp_path / "lab" / "main.yaml").symlink_to(tmp_path / "store" / "real.yaml")
    inventory = load_inventory(tmp_path / "lab" / "main.yaml")
    assert inventory.images["img"].build == "tiny"


def test_control_characters_in_file_name(tmp_path, capsys, monkeypatch, host_unchanged):
    """A newline or escape in the inventory's own path is rejected, in one line: the path
    would otherwise break the error line and the XML metadata that records it."""
    monkeypatch.chdir(tmp_path)
    Path("a\nb\x1b[2J").mkdir()
    Path("a\nb\x1b[2J/inv.yaml").write_text("pools: {}\n")
    code, out, err = run_in_process(capsys, "validate", "a\nb\x1b[2J/inv.yaml")
    assert (code, out) == (2, "")
    assert err == (
        "labctl: error: the inventory's path 'a\\nb\\x1b[2J/inv.yaml' contains control "
        "characters or bytes that are not UTF-8 (rename the file or its directory)\n"
    )


# --- the accepted corpus ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ACCEPTED, ids=[path.stem for path in ACCEPTED])
def test_accepted_validates(path, capsys, monkeypatch, host_unchanged):
    monkeypatch.chdir(REPO)
    assert HEADER_RE.match(path.read_text())["expect"] == "valid"
    code, out, err = run_in_process(capsys, "validate", display(path))
    assert (code, err) == (0, ""), err
    assert out.startswith(f"{display(path)}: valid: inventory hz-accept-")


@pytest.mark.parametrize("path", ACCEPTED, ids=[path.stem for path in ACCEPTED])
def test_accepted_values_round_trip(path):
    """Each hostile value comes back unchanged from the XML and the seed it is rendered into."""
    check_inventory_renders(load_inventory(path))
