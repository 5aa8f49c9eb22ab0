"""Terminal output: rich tables, plain progress lines or JSON lines."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table

_lock = threading.Lock()


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Piped output (CI logs, `| less`) gets full rows instead of an 80-column squeeze.
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, width=width)


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console().print(table)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def discard_stdout() -> None:
    """Send the rest of stdout to /dev/null, once its reader went away (``| head``).

    Output still buffered then goes nowhere instead of failing again at exit.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class EventPrinter:
    """Prints one line per desktop step, or one JSON object per line with ``json_lines``."""

    def __init__(self, json_lines: bool = False):
        self.json_lines = json_lines
        self.started = time.monotonic()

    def __call__(self, desktop: str, step: str, status: str) -> None:
        elapsed = time.monotonic() - self.started
        with _lock:
            if self.json_lines:
                event = {"time": round(elapsed, 3), "desktop": desktop, "step": step,
                         "status": status}
                line = json.dumps(event) + "\n"
            else:
                line = f"[{elapsed:7.1f}s] {desktop:<16} {step:<10} {status}\n"
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except BrokenPipeError:
                # The reader went away (| head): provisioning goes on without output,
                # because a failing event would roll back the desktop's step.
                discard_stdout()
