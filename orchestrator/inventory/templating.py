"""Jinja2 variables in inventory values: ``{{ prefix }}`` in any string.

Only strings that contain ``{{`` or ``{%`` are rendered, in a sandboxed environment
with StrictUndefined, so a typo in a variable name is an error at the value's
FILE:LINE. A value that is exactly one ``{{ expression }}`` keeps the expression's
type (``size: "{{ seats }}"`` gives an integer), as in Ansible. Single braces such as
the ``{n}`` of naming patterns are not Jinja and pass through unchanged.

The sandbox (orchestrator.inventory.sandbox) blocks Python internals and other files,
and bounds the size of strings and integers and the number of loop steps; the output
of a template is cut off past MAX_RENDERED_CHARS. NOTE: a hostile value can still cost
some seconds of CPU, so inventories should come from the operator, not untrusted users.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from orchestrator.errors import InventoryError
from orchestrator.inventory.fields import MAX_COMMAND_CHARS, VAR_NAME_RE
from orchestrator.inventory.messages import did_you_mean, quote, yaml_type
from orchestrator.inventory.positions import KeyPath, Mark, YamlList, YamlMap, dotted
from orchestrator.inventory.sandbox import REMOVED_GLOBALS, SAFE_FILTERS, InventorySandbox
from orchestrator.inventory.yamlparse import NodeBudget

log = logging.getLogger(__name__)

MAX_RENDERED_CHARS = MAX_COMMAND_CHARS
# A templated value longer than this is not a real inventory's: it would only multiply
# the cost of expressions such as {{ s ~ s ~ s ~ ... }}.
MAX_TEMPLATE_CHARS = 8192
# Templated strings rendered per inventory, each use counted; far above a real inventory.
MAX_RENDERS = 20_000
_SINGLE_EXPRESSION_RE = re.compile(r"\s*\{\{(?P<expr>(?:(?!\{\{|\}\}).)*)\}\}\s*", re.S)


def needs_rendering(text: str) -> bool:
    return "{{" in text or "{%" in text


class Renderer:
    """Renderer of the templated strings of one inventory; it shares the loader's node budget.

    Compiled templates are cached by their text, because ``defaults:`` copies the same
    string into every pool. Each template is passed only the variables it names, so its
    cost does not grow with the number of vars.
    """

    def __init__(self, budget: NodeBudget) -> None:
        self.environment = InventorySandbox()
        self.budget = budget
        self.renders = 0
        self._templates: dict[str, tuple[Callable[..., Any], frozenset[str]]] = {}

    def render_vars(self, variables: Any) -> dict[str, Any]:
        """Render ``vars:`` in order; each variable may use the variables defined before it."""
        context: dict[str, Any] = {}
        if not isinstance(variables, YamlMap):
            return context
        for name, value in variables.items():
            mark = variables.mark_of(name)
            if not VAR_NAME_RE.fullmatch(name):
                raise InventoryError(
                    f"vars.{name}: invalid variable name",
                    where=str(mark),
                    fix="use letters, digits and '_', not starting with a digit "
                    "(a Python identifier)",
                )
            context[name] = self.render_tree(value, context, ("vars", name), mark)
        return context

    def render_tree(self, value: Any, context: dict[str, Any], path: KeyPath, mark: Mark) -> Any:
        """Return a copy of ``value`` with every templated string rendered; marks are kept."""
        if isinstance(value, YamlMap):
            rendered_map = YamlMap(value.mark)
            for key, item in value.items():
                key_mark = value.mark_of(key)
                rendered_map.put(
                    key, self.render_tree(item, context, (*path, key), key_mark), key_mark
                )
            return rendered_map
        if isinstance(value, YamlList):
            rendered_list = YamlList(value.mark)
            for index, item in enumerate(value):
                item_mark = value.mark_of(index)
                rendered_list.put(
                    self.render_tree(item, context, (*path, index), item_mark), item_mark
                )
            return rendered_list
        if isinstance(value, str) and needs_rendering(value):
            return self._render_string(value, context, path, mark)
        return value

    def _render_string(self, text: str, context: dict[str, Any], path: KeyPath, mark: Mark) -> Any:
        self.renders += 1
        if self.renders > MAX_RENDERS:
            raise InventoryError(
                f"the inventory has more than {MAX_RENDERS} templated values", where=str(mark)
            )
        if len(text) > MAX_TEMPLATE_CHARS:
            raise InventoryError(
                f"{dotted(path)}: a value with {{{{ }}}} or {{% %}} is longer than "
                f"{MAX_TEMPLATE_CHARS} characters",
                where=str(mark),
                fix="shorten it, or move the long text into a variable of its own",
            )
        try:
            render, names = self._compile(text)
            _check_undefined(names, context, self.environment, path, mark)
            result = render({name: context[name] for name in names if name in context})
        except InventoryError:
            raise
        except jinja2.TemplateAssertionError as exc:
            raise InventoryError(
                f"{dotted(path)}: {exc.message}",
                where=str(mark),
                fix=f"inventory values take these filters: {', '.join(sorted(SAFE_FILTERS))}",
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise InventoryError(
                f"{dotted(path)}: invalid template: {exc.message}",
                where=str(mark),
                fix="check the {{ }} and {% %} pairs; quote the whole value in YAML",
            ) from None
        except jinja2.UndefinedError as exc:
            raise InventoryError(
                f"{dotted(path)}: {_plain_type_names(exc.message or 'undefined value')}",
                where=str(mark),
                fix="check the keys and attributes used in the template",
            ) from None
        except Exception as exc:
            # A user's expression can raise anything: ZeroDivisionError, TypeError, OverflowError...
            reason = " ".join(str(exc).split())[:200]
            raise InventoryError(
                f"{dotted(path)}: the template failed: {type(exc).__name__}: {reason}",
                where=str(mark),
                fix="simplify the expression; inventory values are rendered in a bounded sandbox",
            ) from None
        _check_result(result, path, mark)
        if isinstance(result, (dict, list)):
            # Each use of a list or mapping variable counts, as each use of a YAML alias does.
            self.budget.spend(_count_nodes(result, depth=0), mark)
        log.debug("rendered %s", dotted(path))
        return result

    def _compile(self, text: str) -> tuple[Callable[..., Any], frozenset[str]]:
        cached = self._templates.get(text)
        if cached is not None:
            return cached
        tree = self.environment.parse_checked(text)
        names = frozenset(meta.find_undeclared_variables(tree))
        single = _SINGLE_EXPRESSION_RE.fullmatch(text)
        if single:
            expression = self.environment.compile_expression(
                single["expr"], undefined_to_none=False
            )
            compiled = (lambda variables: expression(**variables)), names
        else:
            template = self.environment.from_string(tree)
            compiled = functools.partial(_render_bounded, template), names
        self._templates[text] = compiled
        return compiled


def _render_bounded(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render ``template``, stopping as soon as its output passes MAX_RENDERED_CHARS."""
    parts: list[str] = []
    length = 0
    for part in template.generate(variables):
        length += len(part)
        if length > MAX_RENDERED_CHARS:
            raise jinja2.sandbox.SecurityError(
                f"the output would be longer than {MAX_RENDERED_CHARS} characters"
            )
        parts.append(part)
    return "".join(parts)


def _check_undefined(
    names: frozenset[str],
    context: dict[str, Any],
    environment: SandboxedEnvironment,
    path: KeyPath,
    mark: Mark,
) -> None:
    missing = sorted(
        name for name in names if name not in context and name not in environment.globals
    )
    if not missing:
        return
    if missing[0] in REMOVED_GLOBALS:
        raise InventoryError(
            f"{dotted(path)}: {missing[0]}() is not available in inventory values",
            where=str(mark),
            fix="build the value from variables with ~ and filters",
        )
    hint = did_you_mean(missing[0], context)
    fix = "define it under vars:"
    if path[:1] == ("vars",):
        fix = "define it under vars: before this variable"
    raise InventoryError(
        f"{dotted(path)}: undefined variable {quote(missing[0])}",
        where=str(mark),
        fix=f"{hint} {fix}" if hint else fix,
    )


def _plain_type_names(message: str) -> str:
    """Replace the names of labctl's YAML containers in Jinja2 messages by YAML type names."""
    message = re.sub(r"'[\w.]*YamlMap object'", "'mapping'", message)
    return re.sub(r"'[\w.]*YamlList object'", "'list'", message)


def _check_result(result: Any, path: KeyPath, mark: Mark) -> None:
    if isinstance(result, jinja2.Undefined):
        # Reaching an undefined attribute of a defined variable, e.g. {{ user.nmae }}.
        raise InventoryError(
            f"{dotted(path)}: the expression is undefined",
            where=str(mark),
            fix="check attribute and key names",
        )
    if not _is_plain_data(result, depth=0):
        raise InventoryError(
            f"{dotted(path)}: the expression gives a {type(result).__name__}, not a string, "
            "number, boolean, list or mapping",
            where=str(mark),
        )
    if isinstance(result, str) and len(result) > MAX_RENDERED_CHARS:
        raise InventoryError(
            f"{dotted(path)}: the rendered {yaml_type(result)} is longer than "
            f"{MAX_RENDERED_CHARS} characters",
            where=str(mark),
        )


def _is_plain_data(value: Any, depth: int) -> bool:
    if depth > 32:
        return False
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(_is_plain_data(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(key, str) and _is_plain_data(item, depth + 1) for key, item in value.items()
        )
    return False


def _count_nodes(value: Any, depth: int) -> int:
    if depth > 32:
        return 1
    if isinstance(value, dict):
        return 1 + sum(1 + _count_nodes(item, depth + 1) for item in value.values())
    if isinstance(value, list):
        return 1 + sum(_count_nodes(item, depth + 1) for item in value)
    return 1
