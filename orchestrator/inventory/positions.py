"""Source positions of inventory values, so errors can point at FILE:LINE.

The YAML parser returns ``YamlMap`` and ``YamlList`` containers that record the mark
of every key and list item. Merging includes and defaults copies those marks along
with the values, so a pool key inherited from ``defaults:`` still points at the line
in ``defaults:``. ``PositionTable`` flattens the final tree into key paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Mark:
    """A place in an inventory file: the file as displayed to the user, 1-based line and column."""

    file: str
    line: int
    column: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class YamlMap(dict):
    """A mapping from YAML that remembers where it starts and where each key is."""

    def __init__(self, mark: Mark) -> None:
        super().__init__()
        self.mark = mark
        self.key_marks: dict[str, Mark] = {}

    def put(self, key: str, value: Any, mark: Mark) -> None:
        self[key] = value
        self.key_marks[key] = mark

    def mark_of(self, key: str) -> Mark:
        return self.key_marks.get(key, self.mark)


class YamlList(list):
    """A sequence from YAML that remembers where it starts and where each item is."""

    def __init__(self, mark: Mark) -> None:
        super().__init__()
        self.mark = mark
        self.item_marks: list[Mark] = []

    def put(self, value: Any, mark: Mark) -> None:
        self.append(value)
        self.item_marks.append(mark)

    def mark_of(self, index: int) -> Mark:
        if 0 <= index < len(self.item_marks):
            return self.item_marks[index]
        return self.mark


def dotted(path: KeyPath) -> str:
    """Format a key path the way users write it: ``pools.lab.identity.users[0].name``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text = f"{text}.{part}" if text else part
    return text or "(top level)"


def iter_marks(value: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Mark]]:
    """Yield the key path and mark of every key and list item below ``value``."""
    if isinstance(value, YamlMap):
        for key, item in value.items():
            yield (*path, key), value.mark_of(key)
            yield from iter_marks(item, (*path, key))
    elif isinstance(value, YamlList):
        for index, item in enumerate(value):
            yield (*path, index), value.mark_of(index)
            yield from iter_marks(item, (*path, index))


class PositionTable:
    """The FILE:LINE of every key path of a loaded inventory."""

    def __init__(self, root: Any, root_mark: Mark) -> None:
        self._root_mark = root_mark
        self._marks: dict[KeyPath, Mark] = dict(iter_marks(root))

    def mark(self, path: KeyPath) -> Mark:
        """Return the mark of ``path`` or of its nearest ancestor that the file spells out.

        A key filled in by a model default (no line in any file) reports the line of
        the mapping that lacks it.
        """
        path = tuple(path)
        while path:
            found = self._marks.get(path)
            if found is not None:
                return found
            path = path[:-1]
        return self._root_mark

    def where(self, path: KeyPath) -> str:
        return str(self.mark(path))

    def has(self, path: KeyPath) -> bool:
        return tuple(path) in self._marks
