"""Load an inventory: read the files, follow includes, merge defaults, render vars, validate.

Merge rules: an included file is merged before the file that includes it, in list
order. The same key of ``vars``, ``hosts``, ``images``, ``networks`` or ``pools`` in two
files is an error. ``defaults`` mappings merge deeply: the including file wins over
its includes, a later include wins over an earlier one. Then each pool is merged over
``defaults`` (mappings deeply, lists and scalars replaced). Errors are InventoryError
with the FILE:LINE of the offending key; the first error found is reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import InventoryError
from orchestrator.inventory import checks, templating, validation
from orchestrator.inventory.fields import INVENTORY_NAME_RE, INVENTORY_NAME_RULE
from orchestrator.inventory.messages import a_yaml_type, did_you_mean, quote, unknown_key
from orchestrator.inventory.model import Inventory
from orchestrator.inventory.positions import Mark, PositionTable, YamlList, YamlMap
from orchestrator.inventory.yamlparse import NodeBudget, parse_yaml, read_text

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("name", "vars", "include", "defaults", "hosts", "images", "networks", "pools")
MAPPING_SECTIONS = ("vars", "defaults", "hosts", "images", "networks", "pools")
NAMED_SECTIONS = ("vars", "hosts", "images", "networks", "pools")
MAX_INCLUDE_DEPTH = 8
MAX_FILES = 64


def load_inventory(path: str | Path) -> Inventory:
    """Load, merge and validate the inventory at ``path``; raise InventoryError if invalid."""
    display = str(path)
    root_mark = Mark(display, 1)
    files = _Files()
    document = _load_files(display, files)
    pools = _merge_defaults(document)
    checks.check_section_keys(document)
    renderer = templating.Renderer(files.budget)
    context = renderer.render_vars(document.get("vars"))
    rendered = _render_sections(renderer, document, pools, context, root_mark)
    _resolve_image_paths(rendered)
    _default_name(rendered, display)
    positions = PositionTable(rendered, root_mark)
    data = dict(rendered)
    data["path"] = Path(display)
    inventory = validation.build_inventory(data, positions)
    inventory.attach_positions(positions)
    checks.check_inventory(inventory)
    log.info("loaded inventory %s from %s: %d pools", inventory.name, display, len(inventory.pools))
    return inventory


@dataclass
class _Files:
    """State of the include walk: the shared node budget, the include line of each file and
    the main file's directory, which includes may not leave."""

    budget: NodeBudget = field(default_factory=NodeBudget)
    included_at: dict[str, str] = field(default_factory=dict)
    top: str = "/"


def _load_files(display: str, files: _Files) -> YamlMap:
    _check_file_name(display)
    real = os.path.realpath(display)
    if not os.path.exists(real):
        raise InventoryError(
            "inventory file not found",
            where=display,
            fix="check the path, e.g. inventories/demo.yaml",
        )
    files.included_at[real] = display
    # The directory the file is named in: includes are resolved relative to it.
    files.top = os.path.realpath(os.path.dirname(os.path.abspath(display)))
    return _load_file(display, real, chain=(), files=files)


def _check_file_name(display: str) -> None:
    """Reject a path that cannot go into a desktop's XML metadata (it records the path)."""
    if any(_unsafe_in_path(char) for char in display):
        raise InventoryError(
            f"the inventory's path {quote(display)} contains control characters or bytes "
            "that are not UTF-8",
            fix="rename the file or its directory",
        )


def _unsafe_in_path(char: str) -> bool:
    # C0 and C1 controls, DEL, and the surrogates Python decodes undecodable bytes to.
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code < 0xE000


def _load_file(display: str, real: str, chain: tuple[str, ...], files: _Files) -> YamlMap:
    text = read_text(Path(display), display)
    root = _check_top_level(parse_yaml(text, display, files.budget), display, is_main=not chain)
    chain = (*chain, display)
    merged = YamlMap(root.mark)
    for include_display, include_real in _includes(root, display, chain, files):
        _merge_file(merged, _load_file(include_display, include_real, chain, files))
    own = YamlMap(root.mark)
    for key, value in root.items():
        if key != "include":
            own.put(key, value, root.mark_of(key))
    _merge_file(merged, own)
    return merged


def _check_top_level(data: Any, display: str, *, is_main: bool) -> YamlMap:
    if data is None:
        raise InventoryError(
            "the inventory file is empty",
            where=display,
            fix="add at least pools:, see inventories/demo.yaml",
        )
    if not isinstance(data, YamlMap):
        raise InventoryError(
            f"the top level must be a mapping of keys such as pools:, got {a_yaml_type(data)}",
            where=f"{display}:{getattr(data, 'mark', Mark(display, 1)).line}",
            fix="start lines with keys such as pools:, see inventories/demo.yaml",
        )
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            hint = did_you_mean(key, TOP_LEVEL_KEYS)
            raise InventoryError(
                f"unknown top-level key {unknown_key(key)}",
                where=str(data.mark_of(key)),
                fix=hint or f"allowed keys: {', '.join(TOP_LEVEL_KEYS)}",
            )
    if "name" in data and not is_main:
        raise InventoryError(
            "name: is allowed only in the main inventory file",
            where=str(data.mark_of("name")),
            fix="remove it from this file",
        )
    for section in MAPPING_SECTIONS:
        if section in data:
            data[section] = _as_mapping(data[section], section, data.mark_of(section))
    return data


def _as_mapping(value: Any, section: str, mark: Mark) -> YamlMap:
    if value is None:
        return YamlMap(mark)
    if not isinstance(value, YamlMap):
        raise InventoryError(
            f"{section}: expected a mapping of names to entries, got {a_yaml_type(value)}",
            where=str(mark),
            fix=f"write {section}: followed by indented 'name: ...' lines",
        )
    return value


def _includes(
    root: YamlMap, display: str, chain: tuple[str, ...], files: _Files
) -> Iterator[tuple[str, str]]:
    """Yield the display path and real path of each file that ``root`` includes."""
    items = root.get("include")
    if items is None:
        return
    if isinstance(items, str):
        items = YamlList(root.mark_of("include"))
        items.put(root["include"], root.mark_of("include"))
    if not isinstance(items, YamlList):
        raise InventoryError(
            f"include: expected a list of file names, got {a_yaml_type(items)}",
            where=str(root.mark_of("include")),
            fix="write include: [common.yaml] or one '- file.yaml' line per file",
        )
    for index, item in enumerate(items):
        yield _resolve_include(item, items.mark_of(index), display, chain, files)


def _resolve_include(
    item: Any, mark: Mark, display: str, chain: tuple[str, ...], files: _Files
) -> tuple[str, str]:
    if not isinstance(item, str) or not item or "\x00" in item:
        raise InventoryError(
            f"include: expected a file name, got {a_yaml_type(item)}",
            where=str(mark),
            fix="write each include as a path relative to this file, such as common.yaml",
        )
    if templating.needs_rendering(item):
        raise InventoryError(
            "include: file names cannot use variables",
            where=str(mark),
            fix="write the path relative to this file",
        )
    target = os.path.normpath(os.path.join(os.path.dirname(display), item))
    real = os.path.realpath(target)
    if os.path.commonpath([files.top, real]) != files.top:
        # An include may not read /etc/passwd or a file next to someone else's inventory.
        raise InventoryError(
            f"include: {quote(item)} is outside the main inventory's directory {files.top}",
            where=str(mark),
            fix="keep included files in the main inventory's directory or below it",
        )
    if real in (os.path.realpath(step) for step in chain):
        cycle = " -> ".join((*chain, target))
        raise InventoryError(
            f"include cycle: {cycle}", where=str(mark), fix="remove one of these includes"
        )
    if real in files.included_at:
        raise InventoryError(
            f"{target} is included twice, first at {files.included_at[real]}",
            where=str(mark),
            fix="include each file once",
        )
    if os.path.isdir(real):
        raise InventoryError(
            f"included path {target} is a directory",
            where=str(mark),
            fix="include the YAML files in it one by one",
        )
    if os.path.exists(real) and not os.path.isfile(real):
        raise InventoryError(
            f"included path {target} is not a regular file (a FIFO, socket or device)",
            where=str(mark),
            fix="include a YAML file",
        )
    if not os.path.isfile(real):
        raise InventoryError(
            f"included file {target} not found",
            where=str(mark),
            fix="include paths are relative to the including file",
        )
    if len(chain) >= MAX_INCLUDE_DEPTH or len(files.included_at) >= MAX_FILES:
        raise InventoryError(
            f"includes nest deeper than {MAX_INCLUDE_DEPTH} or load more than {MAX_FILES} files",
            where=str(mark),
        )
    files.included_at[real] = str(mark)
    return target, real


def _merge_file(merged: YamlMap, incoming: YamlMap) -> None:
    for key, value in incoming.items():
        mark = incoming.mark_of(key)
        if key in NAMED_SECTIONS:
            target = merged.setdefault(key, YamlMap(value.mark))
            merged.key_marks.setdefault(key, mark)
            _merge_named(target, value, key)
        elif key == "defaults":
            merged.put(key, deep_merge(merged.get(key), value), merged.key_marks.get(key, mark))
        else:
            merged.put(key, value, mark)


def _merge_named(target: YamlMap, incoming: YamlMap, section: str) -> None:
    for name, entry in incoming.items():
        mark = incoming.mark_of(name)
        if name in target:
            first = target.mark_of(name)
            raise InventoryError(
                f"{section}.{name} is defined twice: at {first} and at {mark}",
                where=str(mark),
                fix="rename or remove one of them",
            )
        target.put(name, entry, mark)


def deep_merge(base: Any, override: Any) -> Any:
    """Merge two mappings with marks: ``override`` wins; nested mappings merge too."""
    if not isinstance(base, YamlMap) or not isinstance(override, YamlMap):
        return override
    result = YamlMap(override.mark)
    for key, value in base.items():
        result.put(key, value, base.mark_of(key))
    for key, value in override.items():
        result.put(key, deep_merge(result.get(key), value), override.mark_of(key))
    return result


def _merge_defaults(document: YamlMap) -> YamlMap:
    defaults = document.get("defaults") or YamlMap(document.mark)
    checks.check_defaults_keys(defaults)
    pools = document.get("pools") or YamlMap(document.mark)
    merged = YamlMap(pools.mark)
    for name, pool in pools.items():
        mark = pools.mark_of(name)
        if not isinstance(pool, YamlMap):
            raise InventoryError(
                f"pools.{name}: expected a mapping of pool settings, got {a_yaml_type(pool)}",
                where=str(mark),
            )
        merged.put(name, deep_merge(defaults, pool), mark)
    return merged


def _render_sections(
    renderer: templating.Renderer,
    document: YamlMap,
    pools: YamlMap,
    context: dict[str, Any],
    root_mark: Mark,
) -> YamlMap:
    rendered = YamlMap(root_mark)
    for key in ("name", "hosts", "images", "networks", "pools"):
        if key == "pools" and "pools" in document:
            value = pools
        elif key in document:
            value = document[key]
        else:
            continue
        mark = document.mark_of(key)
        rendered.put(key, renderer.render_tree(value, context, (key,), mark), mark)
    return rendered


def _resolve_image_paths(document: YamlMap) -> None:
    """Make relative image paths absolute, relative to the file that names them."""
    images = document.get("images")
    if not isinstance(images, YamlMap):
        return
    for image in images.values():
        if not isinstance(image, YamlMap):
            continue
        path = image.get("path")
        if isinstance(path, str) and path and not path.startswith("/") and "\x00" not in path:
            base = os.path.dirname(image.mark_of("path").file)
            image["path"] = os.path.abspath(os.path.join(base, path))


def _default_name(document: YamlMap, display: str) -> None:
    if "name" in document:
        return
    stem = Path(display).stem
    if not INVENTORY_NAME_RE.fullmatch(stem):
        raise InventoryError(
            f"the inventory name defaults to the file name {stem!r}, which is not a valid name",
            where=display,
            fix=f"add name: to the file ({INVENTORY_NAME_RULE})",
        )
    document["name"] = stem
