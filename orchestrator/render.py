"""The one Jinja2 environment over templates/: XML autoescaping and StrictUndefined.

Templates ending in .xml.j2 are autoescaped, so a name or path carrying ``<``, ``&``
or quotes cannot change the document's structure. Cloud-init templates are YAML and
must emit values through the ``yaml`` filter, which writes them as one-line JSON.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jinja2

_PACKAGE_TEMPLATES = Path(__file__).resolve().parent / "templates"
_SOURCE_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def templates_dir() -> Path:
    """Return templates/ of the source tree, or the copy packed into an installed wheel."""
    if _SOURCE_TEMPLATES.is_dir():
        return _SOURCE_TEMPLATES
    return _PACKAGE_TEMPLATES


def _autoescape(name: str | None) -> bool:
    return bool(name) and (name.endswith(".xml.j2") or name.endswith(".xml"))


def _yaml_scalar(value: object) -> str:
    """Render ``value`` as a one-line YAML flow value.

    JSON is a subset of YAML's flow style, and json.dumps escapes newlines, quotes and
    non-ASCII, so the value cannot break out of its line or start a new key.
    """
    return json.dumps(value, ensure_ascii=True)


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=_autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["yaml"] = _yaml_scalar
    env.filters["json"] = json.dumps
    return env


def render(template: str, **context: object) -> str:
    """Render ``template`` (a path under templates/) with ``context``."""
    return environment().get_template(template).render(**context)
