"""Turn pydantic's validation errors into one InventoryError at the key's FILE:LINE.

The first error pydantic lists is reported (pydantic lists them in the order of the
model's fields: name, hosts, images, networks, pools).
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from orchestrator.errors import InventoryError
from orchestrator.inventory.messages import (
    describe,
    did_you_mean,
    join_choices,
    quote,
    unknown_key,
)
from orchestrator.inventory.model import Inventory
from orchestrator.inventory.positions import KeyPath, PositionTable, dotted

# Keys whose values are never shown in messages: a user may have typed a real password.
SECRET_KEYS = frozenset({"password_hash"})
DISCRIMINATOR = "mode"

EXPECTED = {
    "int_type": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "float_type": "a number",
}

MISSING_HINTS = {
    "size": "add size: N (the number of desktops), or list the desktops in names:",
    "image": "add image: with a key of images:",
    "clone": "add clone: full, linked or instant",
    "uri": "add uri:, e.g. qemu:///system",
    "name": "add name:",
    "mode": "add mode: user, network or bridge",
}


def build_inventory(data: dict[str, Any], positions: PositionTable) -> Inventory:
    """Validate ``data`` into an Inventory or raise the first error as an InventoryError."""
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise to_inventory_error(first, data, positions) from None


def to_inventory_error(
    error: dict[str, Any], data: dict[str, Any], positions: PositionTable
) -> InventoryError:
    """Translate one pydantic error dict into an InventoryError naming the key path."""
    path = key_path(error["loc"], data)
    kind = error["type"]
    context = error.get("ctx") or {}
    if kind == "labctl":
        if context.get("field"):
            path = (*path, context["field"])
        return _error(path, context["message"], positions, context.get("fix") or None)
    if kind == "missing":
        fix = MISSING_HINTS.get(str(path[-1]), f"add {path[-1]}:")
        return _error(path, "is missing", positions, fix)
    if kind == "extra_forbidden":
        return _unknown_key(error["loc"], path, positions)
    if kind in EXPECTED:
        return _wrong_type(path, kind, error.get("input"), positions)
    if kind == "literal_error":
        return _not_a_choice(path, context.get("expected", ""), error.get("input"), positions)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return _bad_mode(path, context, positions)
    if kind in ("greater_than_equal", "less_than_equal"):
        bound = "at least" if kind == "greater_than_equal" else "at most"
        limit = context.get("ge", context.get("le"))
        got = _shown(path, error.get("input"))
        fix = f"use {limit} or {'more' if kind == 'greater_than_equal' else 'less'}"
        return _error(path, f"must be {bound} {limit}, got {got}", positions, fix)
    return _error(path, error.get("msg", "is invalid"), positions)


def key_path(loc: tuple[Any, ...], data: Any) -> KeyPath:
    """Map a pydantic location onto the YAML key path, dropping union tags and key markers."""
    path: list[str | int] = []
    current = data
    for index, part in enumerate(loc):
        is_last = index == len(loc) - 1
        if _is_tag(part, current) and not is_last:
            # pydantic puts the tag of a discriminated union (mode: network) into the location.
            continue
        if isinstance(current, dict) and part in current:
            path.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
        elif isinstance(part, str) and part.startswith("["):
            continue
        else:
            path.append(part)
            current = None
    return tuple(path)


def _is_tag(part: Any, current: Any) -> bool:
    return isinstance(current, dict) and current.get(DISCRIMINATOR) == part


def _error(
    path: KeyPath, message: str, positions: PositionTable, fix: str | None = None
) -> InventoryError:
    return InventoryError(f"{dotted(path)}: {message}", where=positions.where(path), fix=fix)


def _shown(path: KeyPath, value: Any) -> str:
    if any(part in SECRET_KEYS for part in path):
        return "a value that is not shown"
    return describe(value)


def _wrong_type(path: KeyPath, kind: str, value: Any, positions: PositionTable) -> InventoryError:
    message = f"expected {EXPECTED[kind]}, got {_shown(path, value)}"
    return _error(path, message, positions, _type_fix(kind, value))


def _type_fix(kind: str, value: Any) -> str:
    if kind == "string_type" and isinstance(value, (int, float, bool)):
        return "quote the value to make it a string"
    if kind == "string_type" and isinstance(value, dict):
        return "quote the whole value: YAML reads 'word: text' as a mapping"
    if kind == "int_type" and isinstance(value, str) and value.isascii() and value.isdigit():
        return "write the number without quotes"
    if kind == "int_type":
        return "write a whole number such as 2"
    if kind == "list_type":
        return "write a list: [a, b] or one '- item' line per entry"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "write indented 'key: value' lines below this key"
    return f"write {EXPECTED[kind]} here"


def _not_a_choice(
    path: KeyPath, expected: str, value: Any, positions: PositionTable
) -> InventoryError:
    choices = re.findall(r"'([^']*)'", expected)
    hint = did_you_mean(value, choices) if isinstance(value, str) else None
    if isinstance(value, bool):
        hint = ("YAML reads an unquoted on, off, yes or no as a boolean, so write one of the "
                "expected values")
    message = f"expected {join_choices(choices)}, got {_shown(path, value)}"
    return _error(path, message, positions, hint)


def _bad_mode(path: KeyPath, context: dict[str, Any], positions: PositionTable) -> InventoryError:
    choices = re.findall(r"'([^']*)'", context.get("expected_tags", "")) or [
        "user",
        "network",
        "bridge",
    ]
    tag = context.get("tag")
    mode_path = (*path, DISCRIMINATOR)
    if tag is None:
        return _error(
            mode_path, "is missing", positions, f"add {DISCRIMINATOR}: {join_choices(choices)}"
        )
    hint = did_you_mean(str(tag), choices) or (
        "use user (QEMU user networking), network (an existing libvirt network) or "
        "bridge (an existing host bridge)"
    )
    return _error(
        mode_path,
        f"unknown network mode {quote(tag)}; expected {join_choices(choices)}",
        positions,
        hint,
    )


def _unknown_key(loc: tuple[Any, ...], path: KeyPath, positions: PositionTable) -> InventoryError:
    key = str(path[-1])
    allowed = allowed_keys(loc)
    hint = did_you_mean(key, allowed)
    fix = hint or (f"allowed keys here: {', '.join(allowed)}" if allowed else None)
    return InventoryError(
        f"{dotted(path[:-1])}: unknown key {unknown_key(key)}", where=positions.where(path),
        fix=fix
    )


def allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Return the field names of the model that contains the last key of ``loc``."""
    annotation: Any = Inventory
    for part in loc[:-1]:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    model = _unwrap(annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    # The loader fills in path: it is not a key of the file.
    return [name for name in model.model_fields if (model, name) != (Inventory, "path")]


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and the None of Optional[...]."""
    while True:
        if get_origin(annotation) is typing.Annotated:
            annotation = get_args(annotation)[0]
            continue
        if get_origin(annotation) in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) == 1:
                annotation = members[0]
                continue
        return annotation


def _step(annotation: Any, part: Any) -> Any:
    annotation = _unwrap(annotation)
    origin = get_origin(annotation)
    if origin is dict:
        return get_args(annotation)[1]
    if origin is list:
        return get_args(annotation)[0]
    if origin in (Union, types.UnionType):
        return _union_member(annotation, part)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(part)
        return field.annotation if field else None
    return None


def _union_member(annotation: Any, tag: Any) -> Any:
    for member in get_args(annotation):
        field = getattr(member, "model_fields", {}).get(DISCRIMINATOR)
        if field is not None and tag in get_args(field.annotation):
            return member
    return None
