"""The one Jinja2 environment over templates/: XML autoescaping and StrictUndefined.

Templates ending in .xml.j2 are autoescaped, so a name or path carrying ``<``, ``&``
or quotes cannot change the document's structure. Cloud-init templates are YAML and
must emit values through the ``yaml`` filter, which writes them as one-line JSON.
In XML templates, tab, CR and LF become character references (see ``_finalize``).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jinja2
import markupsafe

_PACKAGE_TEMPLATES = Path(__file__).resolve().parent / "templates"
_SOURCE_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def templates_dir() -> Path:
    """Return templates/ of the source tree, or the copy packed into an installed wheel."""
    if _SOURCE_TEMPLATES.is_dir():
        return _SOURCE_TEMPLATES
    return _PACKAGE_TEMPLATES


def _autoescape(name: str | None) -> bool:
    return bool(name) and (name.endswith(".xml.j2") or name.endswith(".xml"))


# XML parsers read a raw CR as LF, and a raw tab, CR or LF inside an attribute as a space.
# Character references survive both rules.
_XML_WHITESPACE_REFS = str.maketrans({"\t": "&#9;", "\n": "&#10;", "\r": "&#13;"})
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")


@jinja2.pass_eval_context
def _finalize(eval_ctx: jinja2.nodes.EvalContext, value: object) -> object:
    """Escape plain strings in autoescaped templates so the parsed value equals the input."""
    if not eval_ctx.autoescape or not isinstance(value, str):
        return value
    if isinstance(value, markupsafe.Markup):
        return value
    return markupsafe.Markup(str(markupsafe.escape(value)).translate(_XML_WHITESPACE_REFS))


def _yaml_scalar(value: object) -> str:
    """Render ``value`` as a one-line YAML flow value.

    JSON is a subset of YAML's flow style, and json.dumps escapes newlines, quotes and
    control characters, so the value cannot break out of its line or start a new key.
    Everything outside printable ASCII becomes \\uXXXX, or \\UXXXXXXXX above U+FFFF,
    because PyYAML (6.0 checked) reads JSON's surrogate-pair escapes as two separate characters.
    """
    return _NOT_PRINTABLE_ASCII.sub(_escape_code_point, json.dumps(value, ensure_ascii=False))


def _escape_code_point(match: re.Match[str]) -> str:
    point = ord(match.group())
    return f"\\u{point:04x}" if point <= 0xFFFF else f"\\U{point:08x}"


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=_autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.filters["yaml"] = _yaml_scalar
    env.filters["json"] = json.dumps
    return env


def render(template: str, **context: object) -> str:
    """Render ``template`` (a path under templates/) with ``context``."""
    return environment().get_template(template).render(**context)
