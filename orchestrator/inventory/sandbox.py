"""The Jinja2 sandbox inventory values are rendered in, with bounds on what one value may cost.

Jinja2's own sandbox blocks Python internals. An inventory value can still ask for a
string of 10**10 characters (``'x' | center(n)``, ``'%0*d'``, ``zfill``), an integer of
billions of digits (``((10 ** 200) ** 200) ** 200``) or 10**10 loop iterations. This sandbox
rejects those before the work is done:

- ``*``, ``**`` and ``%`` are checked before they run (long repeats, huge integers,
  format widths);
- string methods are an allowlist, and ``replace`` and ``join`` are checked by the length
  of what they would return;
- filters are an allowlist, with ``replace`` and ``join`` checked the same way, and no
  call takes an integer above ``MAX_STRING_CHARS``;
- ``range()`` and ``{% for %}`` loops draw on one budget of items per inventory;
- ``{% include %}``, ``{% import %}`` and ``{% extends %}`` are rejected, so a value
  cannot read other files;
- ``str.format``, ``lipsum()`` and ``namespace()`` are not available.

NOTE: the budgets bound the number of steps, not the cost of each: a loop body can
still take a millisecond per step, so a hostile value can cost some seconds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_STRING_CHARS = 64 * 1024
MAX_EXPONENT = 256
MAX_INT_BITS = 4096
# Items of range(), of {% for %} loops and of the values that filters and string methods
# work on, summed over all values of one inventory. That is roughly a second of work
# (an estimate: sorting a 64,000-item list at each step of a loop took 0.7 s).
MAX_ITEMS = 1_000_000
_CONVERSION_RE = re.compile(r"%[-#0 +]*(\d*|\*)(?:\.(\d*|\*))?")

SAFE_STR_METHODS = frozenset({
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha",
    "isdigit", "islower", "isspace", "isupper", "join", "lower", "lstrip", "partition",
    "removeprefix", "removesuffix", "replace", "rfind", "rindex", "rpartition", "rsplit",
    "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper",
})
SAFE_FILTERS = frozenset({
    "abs", "attr", "capitalize", "count", "d", "default", "dictsort", "filesizeformat",
    "first", "float", "groupby", "int", "items", "join", "last", "length", "list", "lower",
    "map", "max", "min", "reject", "rejectattr", "replace", "reverse", "round", "select",
    "selectattr", "sort", "string", "striptags", "sum", "title", "trim", "truncate",
    "unique", "upper", "urlencode", "wordcount",
})
# lipsum makes text of any size, and a namespace's attributes can grow in a loop.
REMOVED_GLOBALS = ("lipsum", "namespace")
FILE_ACCESS_NODES = (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)


class InventorySandbox(ImmutableSandboxedEnvironment):
    """Immutable sandbox with bounded strings, integers, calls and loops (see module doc)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined)
        self.items_left = MAX_ITEMS
        self.filters = {
            name: _bounded_filter(name, function, self._spend)
            for name, function in self.filters.items()
            if name in SAFE_FILTERS
        }
        for name in REMOVED_GLOBALS:
            self.globals.pop(name, None)
        self.globals["range"] = self._range
        self.globals["_labctl_loop"] = self._loop

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        if operator == "*":
            _check_repeat(left, right)
            _check_repeat(right, left)
            _check_int_bits(left, right, _bits(left) + _bits(right))
        elif operator == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right} is above {MAX_EXPONENT}")
            _check_int_bits(left, right, _bits(left) * max(right, 0) if _is_int(right) else 0)
        elif operator == "%" and isinstance(left, str):
            _check_format_widths(left, right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> None:
        # Jinja2 returns str.format and format_map wrapped before it calls is_safe_attribute,
        # and a format spec such as {:>1000000000} would build a string of that width.
        return None

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and callable(value) and attr not in SAFE_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # Jinja2 passes the context and callable positionally, hence the odd names.
        _check_arguments(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            __self._spend(len(owner))
            _check_str_method(owner, getattr(__obj, "__name__", ""), args)
        return super().call(__context, __obj, *args, **kwargs)

    def parse_checked(self, source: str) -> nodes.Template:
        """Parse ``source``, reject file access and make its loops draw on the item budget."""
        tree = self.parse(source)
        for node in tree.find_all(FILE_ACCESS_NODES):
            tag = type(node).__name__.lower().replace("fromimport", "from ... import")
            raise SecurityError(f"{{% {tag} %}} is not available in inventory values")
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name("_labctl_loop", "load"), [loop.iter], [], None, None)
        return tree

    def _spend(self, count: int) -> None:
        self.items_left -= count
        if self.items_left < 0:
            raise SecurityError(
                f"the inventory's templates iterate over more than {MAX_ITEMS} items in all"
            )

    def _range(self, *args: int) -> range:
        numbers = range(*args)
        self._spend(len(numbers))
        return numbers

    def _loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self._spend(1)
            yield item


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bits(value: Any) -> int:
    return abs(value).bit_length() if _is_int(value) else 0


def _check_int_bits(left: Any, right: Any, bits: int) -> None:
    if _is_int(left) and _is_int(right) and bits > MAX_INT_BITS:
        raise SecurityError(f"the result would have more than {MAX_INT_BITS} bits")


def _check_repeat(sequence: Any, count: Any) -> None:
    repeats = isinstance(sequence, (str, list, tuple)) and isinstance(count, int)
    if repeats and len(sequence) * count > MAX_STRING_CHARS:
        raise SecurityError("the repeated value would be too long")


def _check_arguments(args: Iterable[Any], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if _is_int(value) and abs(value) > MAX_STRING_CHARS:
            raise SecurityError(f"the argument {value} is above {MAX_STRING_CHARS}")


def _check_format_widths(text: str, args: tuple[Any, ...]) -> None:
    """Reject %-conversions wider than MAX_STRING_CHARS, also with a width argument (``*``)."""
    for width, precision in _CONVERSION_RE.findall(text):
        for number in (width, precision):
            if number.isdigit() and int(number[:12]) > MAX_STRING_CHARS:
                raise SecurityError(
                    f"a format width in {text[:40]!r} is above {MAX_STRING_CHARS}"
                )
    if "*" in text:
        _check_arguments(args, {})


def _check_str_method(text: str, name: str, args: tuple[Any, ...]) -> None:
    if name == "replace" and len(args) >= 2:
        _check_length(_replaced_length(text, str(args[0]), str(args[1])))
    elif name == "join" and args:
        items = [str(item) for item in args[0]]
        _check_length(sum(map(len, items)) + len(text) * len(items))


def _replaced_length(text: str, old: str, new: str) -> int:
    matches = text.count(old) if old else len(text) + 1
    return len(text) + matches * max(len(new) - len(old), 0)


def _check_length(length: int) -> None:
    if length > MAX_STRING_CHARS:
        raise SecurityError(f"the result would be longer than {MAX_STRING_CHARS} characters")


def _bounded_filter(
    name: str, function: Callable[..., Any], spend: Callable[[int], None]
) -> Callable[..., Any]:
    """Wrap a filter: no argument may be a huge integer, the length of its input is spent
    from the item budget, and replace and join are checked by the length of their result."""

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args, kwargs)
        values = [arg for arg in args if not isinstance(arg, (jinja2.runtime.Context,
                                                                  jinja2.nodes.EvalContext,
                                                                  jinja2.Environment))]
        if values and isinstance(values[0], Sized):
            spend(len(values[0]))
        if name == "replace" and len(values) >= 3:
            _check_length(_replaced_length(str(values[0]), str(values[1]), str(values[2])))
        elif name == "join" and values and "attribute" not in kwargs:
            items = [str(item) for item in values[0]]
            separator = str(values[1]) if len(values) > 1 else str(kwargs.get("d", ""))
            _check_length(sum(map(len, items)) + len(separator) * len(items))
            return function(*args[:-len(values)], items, *values[1:], **kwargs)
        return function(*args, **kwargs)

    return bounded
