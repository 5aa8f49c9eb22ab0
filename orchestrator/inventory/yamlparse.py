"""Parse one inventory file into plain values with positions, safely.

PyYAML's SafeLoader builds only standard types, but it silently keeps the last of two
equal keys, and its aliases let a small file stand for data of any size (the "billion
laughs" attack). This module reads the parser's event stream and builds the values
itself, so it can:

- reject every tag outside plain YAML (``!!python/object``, ``!!binary``, ``!vault``...)
  at its line, before anything is constructed;
- reject duplicate keys in one mapping, naming both lines;
- count nodes, each use of an alias included, and limit the nesting depth;
- limit the file size and the length of each string;
- record the mark of every key and list item (``YamlMap`` and ``YamlList``).

The parser keeps its own state stack in both the C (libyaml) and the pure-Python
implementation, so deep nesting reaches the depth check here instead of overflowing
the Python stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml import events

from orchestrator.errors import InventoryError
from orchestrator.inventory.messages import quote
from orchestrator.inventory.positions import KeyPath, Mark, YamlList, YamlMap, dotted

MAX_FILE_BYTES = 1 << 20
MAX_SCALAR_CHARS = 64 * 1024
MAX_DEPTH = 32
# Values, keys and containers of all files of one inventory, aliases counted each time
# they are used. A large classroom inventory has a few thousand.
MAX_NODES = 100_000

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TAG_PREFIX = "tag:yaml.org,2002:"
_SCALAR_TAGS = {
    _TAG_PREFIX + "str": "construct_yaml_str",
    _TAG_PREFIX + "int": "construct_yaml_int",
    _TAG_PREFIX + "float": "construct_yaml_float",
    _TAG_PREFIX + "bool": "construct_yaml_bool",
    _TAG_PREFIX + "null": "construct_yaml_null",
}
# A date such as 2024-05-01 is kept as the text the user wrote: no inventory key is a date.
_TEXT_TAGS = {_TAG_PREFIX + "timestamp", _TAG_PREFIX + "merge"}
_MAP_TAG = _TAG_PREFIX + "map"
_SEQ_TAG = _TAG_PREFIX + "seq"
_MERGE_KEY = "<<"
# YAML 1.1 also reads 010 as octal 8, 1:20 as 80 (base 60), 0x10 and 1_000 as numbers.
_DECIMAL_RE = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")


@dataclass
class NodeBudget:
    """The number of YAML nodes an inventory may still build, shared by all its files."""

    remaining: int = MAX_NODES

    def spend(self, count: int, mark: Mark) -> None:
        self.remaining -= count
        if self.remaining < 0:
            raise InventoryError(
                f"the inventory expands to more than {MAX_NODES} YAML values "
                "(counting every use of an alias or of a list or mapping variable)",
                where=str(mark),
                fix="split the inventory or use fewer nested aliases and variables",
            )


def read_text(path: Path, display: str) -> str:
    """Read an inventory file as UTF-8 text, rejecting files over MAX_FILE_BYTES."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError as exc:
        raise InventoryError("is a directory, not an inventory file", where=display) from exc
    except OSError as exc:
        raise InventoryError(f"cannot read the inventory: {exc.strerror}", where=display) from exc
    if len(data) > MAX_FILE_BYTES:
        raise InventoryError(
            f"the file is larger than {MAX_FILE_BYTES // 1024} KiB",
            where=display,
            fix="split it into smaller files with include:",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InventoryError(
            f"the file is not valid UTF-8: byte 0x{data[exc.start]:02X} at line {line}, "
            f"column {column}",
            where=f"{display}:{line}",
            fix="save it as UTF-8",
        ) from exc
    return text.removeprefix("\ufeff")


def parse_yaml(text: str, display: str, budget: NodeBudget) -> Any:
    """Parse a single YAML document into values with marks; None for an empty document."""
    loader = _Loader(text)
    try:
        return _Builder(loader, display, budget).build()
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, display) from None
    except yaml.YAMLError as exc:
        raise _reader_error(exc, text, display) from None
    finally:
        loader.dispose()


def _syntax_error(exc: yaml.MarkedYAMLError, display: str) -> InventoryError:
    mark = exc.problem_mark or exc.context_mark
    parts = [part for part in (exc.context, exc.problem) if part]
    problem = "; ".join(" ".join(str(part).split()) for part in parts) or "syntax error"
    if mark is None:
        return InventoryError(f"invalid YAML: {problem}", where=display)
    return InventoryError(
        f"invalid YAML: {problem} (line {mark.line + 1}, column {mark.column + 1})",
        where=f"{display}:{mark.line + 1}",
        fix="check the indentation and quoting at that line",
    )


def _reader_error(exc: yaml.YAMLError, text: str, display: str) -> InventoryError:
    # ReaderError (a control character in the text) carries a character offset, not a mark.
    position = getattr(exc, "position", None)
    character = getattr(exc, "character", None)
    if not isinstance(position, int) or not isinstance(character, (int, str)):
        return InventoryError(f"invalid YAML: {' '.join(str(exc).split())}", where=display)
    code = character if isinstance(character, int) else ord(character[:1] or "\0")
    before = text[:position]
    if _Loader is not yaml.SafeLoader:
        # libyaml counts the offset in bytes of UTF-8, the pure-Python reader in characters.
        before = text.encode("utf-8")[:position].decode("utf-8", "ignore")
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    return InventoryError(
        f"invalid YAML: control character U+{code:04X} at line {line}, column {column}",
        where=f"{display}:{line}",
        fix="remove it, or write it as an escape inside double quotes",
    )


@dataclass
class _Anchor:
    value: Any
    size: int


@dataclass
class _Builder:
    loader: Any
    display: str
    budget: NodeBudget
    anchors: dict[str, _Anchor | None] = field(default_factory=dict)

    def build(self) -> Any:
        self._expect(events.StreamStartEvent)
        if self.loader.check_event(events.StreamEndEvent):
            return None
        self._expect(events.DocumentStartEvent)
        value, _size = self._node(())
        self._expect(events.DocumentEndEvent)
        if not self.loader.check_event(events.StreamEndEvent):
            extra = self.loader.peek_event()
            raise InventoryError(
                "the file contains more than one YAML document",
                where=str(self._mark(extra)),
                fix="remove the second '---' or move that part into its own file",
            )
        return value

    def _expect(self, kind: type) -> events.Event:
        event = self.loader.get_event()
        if not isinstance(event, kind):
            raise InventoryError(
                f"unexpected YAML {type(event).__name__}", where=str(self._mark(event))
            )
        return event

    def _mark(self, event: events.Event) -> Mark:
        start = event.start_mark
        return Mark(self.display, start.line + 1, start.column + 1)

    def _node(self, path: KeyPath) -> tuple[Any, int]:
        """Build the next node; return its value and its size in nodes."""
        event = self.loader.get_event()
        mark = self._mark(event)
        if len(path) > MAX_DEPTH:
            raise InventoryError(
                f"values are nested deeper than {MAX_DEPTH} levels at {dotted(path[:4])}...",
                where=str(mark),
                fix="flatten this value: inventories need only a few levels",
            )
        if isinstance(event, events.AliasEvent):
            return self._alias(event, mark)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            # An alias inside its own anchor would make a cycle.
            self.anchors[anchor] = None
        if isinstance(event, events.ScalarEvent):
            value, size = self._scalar(event, mark, path), 1
        elif isinstance(event, events.SequenceStartEvent):
            self._check_container_tag(event, _SEQ_TAG, mark, path)
            value, size = self._sequence(mark, path)
        elif isinstance(event, events.MappingStartEvent):
            self._check_container_tag(event, _MAP_TAG, mark, path)
            value, size = self._mapping(mark, path)
        else:
            raise InventoryError(f"unexpected YAML {type(event).__name__}", where=str(mark))
        self.budget.spend(1, mark)
        if anchor is not None:
            self.anchors[anchor] = _Anchor(value, size)
        return value, size

    def _alias(self, event: events.AliasEvent, mark: Mark) -> tuple[Any, int]:
        if event.anchor not in self.anchors:
            raise InventoryError(
                f"alias *{event.anchor} refers to no anchor &{event.anchor} defined before it",
                where=str(mark),
                fix=f"put &{event.anchor} on a value above this line, or remove the alias",
            )
        target = self.anchors[event.anchor]
        if target is None:
            raise InventoryError(
                f"alias *{event.anchor} is used inside its own anchor &{event.anchor}",
                where=str(mark),
                fix="an alias cannot contain itself",
            )
        self.budget.spend(target.size, mark)
        return target.value, target.size

    def _check_container_tag(self, event: Any, default: str, mark: Mark, path: KeyPath) -> None:
        if event.tag not in (None, "!", default):
            raise _tag_error(event.tag, mark, path)

    def _scalar(self, event: events.ScalarEvent, mark: Mark, path: KeyPath) -> Any:
        if len(event.value) > MAX_SCALAR_CHARS:
            raise InventoryError(
                f"{dotted(path)}: the value is longer than {MAX_SCALAR_CHARS} characters",
                where=str(mark),
                fix="shorten it; long scripts and data belong in the image",
            )
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.loader.resolve(yaml.ScalarNode, event.value, event.implicit)
            if tag == _TAG_PREFIX + "int" and not _DECIMAL_RE.fullmatch(event.value):
                raise self._ambiguous_int(event, mark, path)
        if tag in _TEXT_TAGS:
            return event.value
        method = _SCALAR_TAGS.get(tag)
        if method is None:
            raise _tag_error(tag, mark, path)
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return getattr(self.loader, method)(node)
        except (ValueError, yaml.YAMLError) as exc:
            # int() refuses numbers of more than 4300 digits; float() can fail too.
            raise InventoryError(
                f"{dotted(path)}: the {tag.removeprefix(_TAG_PREFIX)} {quote(event.value)} is "
                f"{len(event.value)} characters long, too long to read",
                where=str(mark),
                fix="use a number of a few digits, or quote the value if it is text",
            ) from exc

    def _ambiguous_int(
        self, event: events.ScalarEvent, mark: Mark, path: KeyPath
    ) -> InventoryError:
        text = event.value
        node = yaml.ScalarNode(_TAG_PREFIX + "int", text, event.start_mark, event.end_mark)
        value = self.loader.construct_yaml_int(node) if len(text) <= 20 else None
        fix = "write the number in plain decimal digits, or quote the value if it is text"
        if value is not None:
            fix = f"write {value} if you mean that number, or quote the value if it is text"
        return InventoryError(
            f"{dotted(path)}: {quote(text)} is {_int_form(text)} in YAML 1.1"
            f"{f' ({value})' if value is not None else ''}; inventories take plain decimal "
            "integers, which every YAML reader reads alike",
            where=str(mark),
            fix=fix,
        )

    def _sequence(self, mark: Mark, path: KeyPath) -> tuple[YamlList, int]:
        result = YamlList(mark)
        size = 1
        while not self.loader.check_event(events.SequenceEndEvent):
            item_mark = self._mark(self.loader.peek_event())
            value, item_size = self._node((*path, len(result)))
            result.put(value, item_mark)
            size += item_size
        self.loader.get_event()
        return result, size

    def _mapping(self, mark: Mark, path: KeyPath) -> tuple[YamlMap, int]:
        result = YamlMap(mark)
        merges: list[tuple[Any, Mark]] = []
        size = 1
        while not self.loader.check_event(events.MappingEndEvent):
            key, key_mark, is_merge = self._key(path)
            if is_merge:
                value, value_size = self._node((*path, key))
                merges.append((value, key_mark))
            else:
                if key in result:
                    raise _duplicate_key((*path, key), result.mark_of(key), key_mark)
                value, value_size = self._node((*path, key))
                result.put(key, value, key_mark)
            size += 1 + value_size
        self.loader.get_event()
        for value, merge_mark in merges:
            _apply_merge(result, value, merge_mark, path)
        return result, size

    def _key(self, path: KeyPath) -> tuple[str, Mark, bool]:
        event = self.loader.get_event()
        mark = self._mark(event)
        if not isinstance(event, events.ScalarEvent):
            raise InventoryError(
                f"{dotted(path)}: mapping keys must be plain text, not lists, mappings or aliases",
                where=str(mark),
                fix="write the key as a word, such as lab:",
            )
        if event.tag not in (None, "!", _TAG_PREFIX + "str"):
            raise _tag_error(event.tag, mark, path)
        if len(event.value) > MAX_SCALAR_CHARS:
            raise InventoryError(f"{dotted(path)}: a key is too long", where=str(mark))
        self.budget.spend(1, mark)
        # Keys are kept as written: "010:" or "yes:" name a pool "010" or "yes", not 8 or True.
        is_merge = event.value == _MERGE_KEY and event.implicit[0] and event.tag is None
        return event.value, mark, is_merge


def _apply_merge(result: YamlMap, source: Any, mark: Mark, path: KeyPath) -> None:
    """Apply a YAML merge key: keys written in the mapping win, earlier sources win."""
    sources = list(source) if isinstance(source, list) else [source]
    for item in sources:
        if not isinstance(item, YamlMap):
            raise InventoryError(
                f"{dotted(path)}: the merge key << takes a mapping or a list of mappings",
                where=str(mark),
            )
        for key, value in item.items():
            if key not in result:
                result.put(key, value, item.mark_of(key))


def _duplicate_key(path: KeyPath, first: Mark, second: Mark) -> InventoryError:
    return InventoryError(
        f"duplicate key {dotted(path)}: defined at line {first.line} and again at line "
        f"{second.line} (YAML would silently keep only the last)",
        where=str(second),
        fix="remove or rename one of them",
    )


def _tag_error(tag: str, mark: Mark, path: KeyPath) -> InventoryError:
    short_tag = "!!" + tag.removeprefix(_TAG_PREFIX) if tag.startswith(_TAG_PREFIX) else tag
    return InventoryError(
        f"{dotted(path)}: the YAML tag {short_tag} is not allowed",
        where=str(mark),
        fix="inventories take plain strings, numbers, booleans, lists and mappings; remove the tag",
    )



def _int_form(text: str) -> str:
    """Name the YAML 1.1 integer notation of ``text``, which is not plain decimal."""
    digits = text.lstrip("+-")
    if ":" in digits:
        return "a base-60 number"
    if digits.startswith(("0x", "0X")):
        return "a hexadecimal number"
    if digits.startswith(("0b", "0B")):
        return "a binary number"
    if "_" in digits:
        return "a number with '_' separators"
    return "an octal number"
