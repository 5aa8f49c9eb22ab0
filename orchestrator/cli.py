"""The labctl command line: argument parsing, output format, and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys

import libvirt

from orchestrator import __version__, output
from orchestrator.errors import LabctlError
from orchestrator.hosts.connection import libvirt_failure
from orchestrator.provision import steps

log = logging.getLogger("orchestrator")


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", choices=("table", "json"), default="table",
                        help="print a table (default) or JSON")


def build_parser() -> argparse.ArgumentParser:
    from orchestrator.commands import (
        apply_cmd, events_cmd, gc_cmd, host_cmd, identity_cmd, image_cmd, inventory_cmd,
        maintenance_cmd, run_cmd, session_cmd, ssh_cmd,
    )

    parser = argparse.ArgumentParser(
        prog="labctl",
        description="Pools of lab desktops on libvirt/QEMU: full, linked and instant clones "
        "of golden images, each with its own identity.",
    )
    parser.add_argument("--version", action="version", version=f"labctl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log INFO (-v) or DEBUG (-vv) messages to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    host_cmd.register(commands, _add_output)
    image_cmd.register(commands, _add_output)
    identity_cmd.register(commands, _add_output)
    inventory_cmd.register(commands, _add_output)
    apply_cmd.register(commands, _add_output)
    apply_cmd.register_bench(commands, _add_output)
    maintenance_cmd.register(commands, _add_output)
    session_cmd.register(commands, _add_output)
    run_cmd.register(commands, _add_output)
    events_cmd.register(commands, _add_output)
    ssh_cmd.register(commands, _add_output)
    gc_cmd.register(commands, _add_output)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG
    if verbosity == 0:
        level = logging.WARNING
    elif verbosity == 1:
        level = logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbosity < 2:
        # paramiko logs every refused connection while a guest boots as an ERROR.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def _interrupt(_signum: int, _frame: object) -> None:
    # A second Ctrl-C would break off the rollback itself and leave volumes behind,
    # so after the first one further interrupts only print that the rollback runs.
    signal.signal(signal.SIGINT, _rolling_back)
    signal.signal(signal.SIGTERM, _rolling_back)
    raise KeyboardInterrupt


def _rolling_back(_signum: int, _frame: object) -> None:
    print("labctl: rolling back the interrupted desktops, please wait", file=sys.stderr)


_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def one_line(text: str) -> str:
    """Escape line breaks and control characters, so an error is one line on a terminal.

    Messages quote the values they name, but a path given on the command line or a
    libvirt message may still hold a newline or a terminal escape sequence.
    """
    return _LINE_BREAKING.sub(lambda match: ascii(match.group())[1:-1], text)


def _error(args: argparse.Namespace, exc: LabctlError) -> int:
    """Print the error on stderr and, with ``-o json``, as a last JSON line on stdout."""
    text = one_line(str(exc))
    print(f"labctl: error: {text}", file=sys.stderr)
    if getattr(args, "output", None) == "json":
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.write(json.dumps({"event": "error", "error": text,
                                         "exit_code": exc.exit_code}) + "\n")
            sys.stdout.flush()
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    # SIGPIPE stays ignored, as Python sets it: with the default action, a write to the
    # socket of a libvirtd that went away, or to a restore pipe, would kill labctl without
    # a message or a rollback. A reader of stdout that goes away (head, less) raises
    # BrokenPipeError instead, handled below and in output.EventPrinter.
    # SIGTERM takes the same path as Ctrl-C: interrupted desktops are rolled back.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is a command for the guest (labctl ssh), never labctl options.
    remote_command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, remote_command = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    args.remote_command = remote_command
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except LabctlError as exc:
        return _error(args, exc)
    except libvirt.libvirtError as exc:
        # A libvirt call that no command wrapped, e.g. after libvirtd went away mid-run.
        return _error(args, libvirt_failure("a libvirt call failed", exc))
    except (NotADirectoryError, FileExistsError, PermissionError) as exc:
        # A state or data directory that is a file, or not writable, e.g. a wrong
        # LABCTL_DATA_DIR or LABCTL_STATE_DIR.
        print(f"labctl: error: {exc.filename}: {exc.strerror} (check LABCTL_DATA_DIR and "
              "LABCTL_STATE_DIR, and the permissions of labctl's data directory)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        rolled_back = steps.interrupted_desktops()
        if rolled_back:
            print("labctl: interrupted; what was done for these desktops was rolled back: "
                  + ", ".join(sorted(set(rolled_back))), file=sys.stderr)
        else:
            print("labctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away: exit quietly, with the status a shell reports
        # for a command that SIGPIPE ended (128 + 13).
        output.discard_stdout()
        return 141


if __name__ == "__main__":
    sys.exit(main())
