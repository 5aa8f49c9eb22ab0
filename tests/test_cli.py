"""Tests of the labctl CLI, run as a user runs it: ``python -m orchestrator`` in a subprocess.

Every run gets LABCTL_DATA_DIR under the test's tmp_path, so the real image catalog
and probe cache are never touched. Errors must be one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_POOL, TEST_POOL_PATH, URI, run_labctl

from orchestrator.errors import ImageError
from orchestrator.identity.registry import OPERATIONS
from orchestrator.images import catalog

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "inventories" / "demo.yaml"
QCOW2_MAGIC = b"QFI\xfb"


def labctl(data_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI with its data directory in ``data_dir``; return the completed process."""
    env = {**os.environ, "LABCTL_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """Return the single error line of a failed run, checking the CLI's error contract."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("labctl: error: "), result.stderr
    return lines[0]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# --- identity, schema, validate -------------------------------------------------------------


def test_identity_list_table(data_dir):
    result = labctl(data_dir, "identity", "list")
    assert result.returncode == 0, result.stderr
    assert len(OPERATIONS) == 10
    for operation in OPERATIONS:
        assert operation.name in result.stdout


def test_identity_list_json(data_dir):
    result = labctl(data_dir, "identity", "list", "-o", "json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [item["name"] for item in listed] == [
        "hostname", "machine-id", "ssh-host-keys", "mac", "smbios-uuid", "vm-generation-id",
        "instance-id", "users", "timezone", "run-once",
    ]
    assert all(set(item) == {"name", "default", "description", "applied_by", "detail"}
               for item in listed)


def test_schema_prints_json(data_dir):
    result = labctl(data_dir, "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "$schema" in schema
    assert "pools" in json.dumps(schema)


def test_validate_demo(data_dir):
    result = labctl(data_dir, "validate", str(DEMO))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert result.stderr == ""


MALFORMED = {
    # name -> (text replacing line 37 of the demo, "size: 3", and the line the error names)
    "yaml-syntax": ("    size: [3", 38),
    "wrong-type": ("    size: three", 37),
    "unknown-key": ("    size: 3\n    colour: red", 38),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_validate_malformed(data_dir, tmp_path, case):
    replacement, line = MALFORMED[case]
    lines = DEMO.read_text().splitlines()
    assert lines[36] == "    size: 3"
    lines[36] = replacement
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = labctl(data_dir, "validate", str(path))
    message = error_line(result)
    assert f"{path}:{line}" in message


def test_validate_missing_file(data_dir, tmp_path):
    path = tmp_path / "absent.yaml"
    message = error_line(labctl(data_dir, "validate", str(path)))
    assert str(path) in message


# --- host check -----------------------------------------------------------------------------


def test_host_check_refused(data_dir):
    uri = "qemu+tcp://127.0.0.1:1/system"
    message = error_line(labctl(data_dir, "host", "check", "--uri", uri, timeout=60))
    assert uri in message
    assert "cannot connect" in message


@pytest.mark.libvirt
def test_host_check_tcg(data_dir):
    result = labctl(data_dir, "host", "check", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tcg" in result.stdout


@pytest.mark.libvirt
def test_host_check_json(data_dir):
    result = labctl(data_dir, "host", "check", "-o", "json", timeout=300)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    for key in ("uri", "libvirt_version", "qemu_version", "accelerator",
                "storage_free_bytes", "ksm_available"):
        assert key in facts, key
    assert facts["accelerator"] == "tcg"
    assert facts["uri"] == "qemu:///system"
    assert facts["storage_free_bytes"] > 0
    assert isinstance(facts["ksm_available"], bool)


# --- image import ---------------------------------------------------------------------------


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("name, version, fix", [
    ("win10", None, "run 'labctl image import PATH --name win10' with the image's file (win10 "
     "is no recipe of labctl image build, which knows debian12, tiny)"),
    ("tiny", None, "run 'labctl image build tiny' or 'labctl image import PATH --name tiny'"),
    ("tiny", "0123", "run 'labctl image list' for the versions there are, or import that "
     "version's file with 'labctl image import PATH --name tiny'"),
])
def test_missing_image_fix_names_a_working_command(data_dir, monkeypatch, name, version, fix):
    """Only recipes can be built: the hint for any other catalog image is an import."""
    monkeypatch.setenv("LABCTL_DATA_DIR", str(data_dir))
    with pytest.raises(ImageError) as caught:
        catalog.resolve(name, version)
    assert caught.value.fix == fix


def test_import_missing(data_dir, tmp_path):
    path = tmp_path / "absent.qcow2"
    message = error_line(labctl(data_dir, "image", "import", str(path), "--name", "x"))
    assert str(path) in message
    assert "not found" in message


def test_import_corrupt(data_dir, tmp_path):
    path = tmp_path / "corrupt.qcow2"
    garbage = bytes((index * 37 + 11) % 256 for index in range(4096))
    path.write_bytes(QCOW2_MAGIC + garbage)
    message = error_line(labctl(data_dir, "image", "import", str(path), "--name", "x"))
    assert str(path) in message
    assert not (data_dir / "images" / "x").exists()


def test_import_broken_chain(data_dir, tmp_path):
    base = tmp_path / "base.qcow2"
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    base.unlink()
    message = error_line(labctl(data_dir, "image", "import", str(overlay), "--name", "x"))
    assert str(overlay) in message
    assert str(base) in message


def test_import_overlay_refused(data_dir, tmp_path):
    base = tmp_path / "base.qcow2"
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    message = error_line(labctl(data_dir, "image", "import", str(overlay), "--name", "x"))
    assert str(overlay) in message
    assert "backing file" in message


def test_import_valid(data_dir, tmp_path):
    path = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    result = labctl(data_dir, "image", "import", str(path), "--name", "small", "-o", "json")
    assert result.returncode == 0, result.stderr
    image = json.loads(result.stdout)
    assert image["name"] == "small"
    assert image["format"] == "qcow2"
    assert image["virtual_size"] == 16 << 20
    assert Path(image["path"]).is_relative_to(data_dir)
    listed = json.loads(labctl(data_dir, "image", "list", "-o", "json").stdout)
    assert [item["ref"] for item in listed] == [image["ref"]]


# --- argument errors ------------------------------------------------------------------------


def test_unknown_command(data_dir):
    result = labctl(data_dir, "frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize("memory, message", [
    ("0", "0 MiB is outside 64 to 1048576 MiB"),
    ("-512", "-512 MiB is outside 64 to 1048576 MiB"),
    ("4000000000", "4000000000 MiB is outside 64 to 1048576 MiB"),
    ("1.5", "invalid number of MiB: '1.5'"),
])
def test_smoke_memory_checked_first(data_dir, memory, message):
    """A bad --memory is refused before the image is built or libvirt is contacted (the URI
    would refuse any connection, and the empty data directory stays empty)."""
    result = labctl(data_dir, "smoke", f"--memory={memory}", "--uri", "test:///nonexistent")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"labctl smoke: error: argument --memory: {message}"), last
    assert not data_dir.exists(), f"smoke wrote {list(data_dir.rglob('*'))}"


# --- SIGPIPE and libvirt errors -------------------------------------------------------------


def test_closed_stdout_exits_quietly(data_dir):
    """A reader that goes away (| head) ends labctl with 141 and no traceback."""
    env = {**os.environ, "LABCTL_DATA_DIR": str(data_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "schema"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.close()  # before labctl has imported its modules, so its write fails
    stderr = process.stderr.read().decode()
    assert process.wait(60) == 141, stderr
    assert stderr == "", f"labctl printed on stderr: {stderr}"


def test_sigpipe_ignored_in_commands(monkeypatch):
    """Commands run with SIGPIPE ignored, so a socket closed by its peer raises EPIPE
    (BrokenPipeError) instead of killing labctl without a message."""
    from orchestrator import cli
    from orchestrator.commands import identity_cmd

    seen = []
    monkeypatch.setattr(identity_cmd, "list_operations",
                        lambda args: seen.append(signal.getsignal(signal.SIGPIPE)) or 0)
    handlers = {number: signal.getsignal(number)
                for number in (signal.SIGPIPE, signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main(["identity", "list"]) == 0
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert seen == [signal.SIG_IGN], f"SIGPIPE action during the command: {seen}"


def test_libvirt_error_one_line(monkeypatch, capsys):
    """A libvirt error no step wraps (libvirtd restarted mid-run) is one line, no traceback."""
    import libvirt

    from orchestrator import cli
    from orchestrator.commands import identity_cmd

    def fail(args):
        raise libvirt.libvirtError("internal error: client socket is closed")

    monkeypatch.setattr(identity_cmd, "list_operations", fail)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main(["identity", "list"]) == 1
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == ("labctl: error: a libvirt call failed: internal error: client "
                        "socket is closed"), lines[0]


def test_events_limit_bounded(tmp_path):
    result = labctl(tmp_path, "events", str(DEMO), "--limit", "99999999999999999999999")
    assert result.returncode == 2, result.stderr
    assert "--limit must be from 1 to" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    result = labctl(afile, "events", str(DEMO))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert result.stderr.startswith(f"labctl: error: {afile}/state: Not a directory"), result.stderr


def test_host_check_empty_uri(tmp_path):
    result = labctl(tmp_path, "host", "check", "--uri", "")
    assert result.returncode == 2, result.stderr
    assert "the libvirt URI is empty" in result.stderr


@pytest.mark.libvirt
def test_plan_rejects_storage_pool_elsewhere(make_inventory):
    """The test storage pool exists at TEST_POOL_PATH; the inventory names another path."""
    elsewhere = "/var/lib/labctl/not-the-test-pool"
    path = make_inventory(
        {"lab": {"image": "tiny", "clone": "linked", "size": 1, "naming": "sp-{n}",
                 "network": "lab"}},
        hosts={"local": {"uri": URI, "storage": {"pool": TEST_POOL, "path": elsewhere}}})
    result = run_labctl("plan", str(path))
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"storage pool {TEST_POOL} already exists" in lines[0], lines[0]
    assert f"at {TEST_POOL_PATH}, not {elsewhere}" in lines[0], lines[0]
    # The file's line of the path: key (line 5 of what make_inventory writes).
    assert f"{path}:" in lines[0], lines[0]
    assert "write path:" in lines[0], lines[0]
    assert not os.path.exists(elsewhere), "plan created the directory it rejected"


def test_interrupted_validate_claims_no_rollback(tmp_path):
    """SIGTERM while validate waits on a FIFO: 'interrupted', no rollback claimed, exit 130."""
    fifo = tmp_path / "inventory.yaml"
    os.mkfifo(fifo)
    process = subprocess.Popen([sys.executable, "-m", "orchestrator", "validate", str(fifo)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        stdout, stderr = process.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, f"exit {process.returncode}: {stderr}"
    assert stderr.strip() == "labctl: interrupted", stderr
    assert stdout == ""


def test_json_error_line(tmp_path):
    """With -o json, an error is also the last stdout line, as JSON, for scripts."""
    missing = tmp_path / "missing.yaml"
    result = subprocess.run([sys.executable, "-m", "orchestrator", "status", str(missing),
                             "-o", "json"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("labctl: error: "), result.stderr
    event = json.loads(result.stdout.strip().splitlines()[-1])
    assert event["event"] == "error"
    assert "inventory file not found" in event["error"]
    assert event["exit_code"] == 2
