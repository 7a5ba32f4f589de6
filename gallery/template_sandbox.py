"""The resource sandbox chat templates compile and render in: the budget and the Jinja environment's limits.

Chat templates from the Hub are untrusted code. On top of Jinja's sandbox (no attribute escapes, no
mutation of inputs) every compile and every render runs under one budget, the same at import, validation
and runtime: a size limit on the template, a deadline, a cap on loop iterations and calls, and size caps on
the strings, lists and numbers a template can build. Operations that can blow a small input up (format
widths and precisions, `*`, `%`, `~`, padding, indenting, joining) are sized *before* they run, so a bomb
fails with a clear error instead of eating memory — also when Jinja folds a constant expression at compile
time, where the cap is smaller (a value over it is simply left for the render, which never happens inside
`{% if false %}`).

The renderer (`gallery/chat_template.py`) runs each compile and render inside `budget(...)`, in the
environment `make_environment()` builds; nothing here knows about chat messages.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

MAX_TEMPLATE_BYTES = 256 * 1024
MAX_OUTPUT_CHARS = 16 * 1024 * 1024
MAX_VALUE_CHARS = 32 * 1024 * 1024
# Jinja folds constant expressions while compiling; a folded value larger than this is left for the render.
MAX_FOLDED_CHARS = 64 * 1024
MAX_ITERATIONS = 500_000
MAX_WIDTH = 100_000
MAX_INT_BITS = 1 << 16
DEFAULT_DEADLINE_S = 5.0


@dataclasses.dataclass
class _Budget:
    deadline: float
    value_limit: int = MAX_VALUE_CHARS
    steps: int = 0

    def tick(self, amount: int = 1) -> None:
        self.steps += amount
        if self.steps > MAX_ITERATIONS:
            raise SecurityError(f"template exceeded {MAX_ITERATIONS} loop iterations and calls")
        if time.monotonic() > self.deadline:
            raise SecurityError("template took too long to render")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


@contextlib.contextmanager
def budget(deadline_s: float, value_limit: int) -> Iterator[None]:
    """Run the block under a fresh budget: a deadline `deadline_s` from now and a cap on built values."""
    token = _BUDGET.set(_Budget(deadline=time.monotonic() + deadline_s, value_limit=value_limit))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def tick(amount: int = 1) -> None:
    """Count `amount` steps against the current budget (none outside a compile or render)."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick(amount)


def _limit() -> int:
    """The largest value (characters or items) the current compile or render may build."""
    budget = _BUDGET.get()
    return budget.value_limit if budget is not None else MAX_VALUE_CHARS


def _refuse_size(estimate: int, what: str) -> None:
    if estimate > _limit():
        raise SecurityError(f"{what} would build a value larger than the size limit ({_limit()} characters)")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > _limit():
        raise SecurityError(f"template built a value larger than the size limit ({_limit()} items)")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise SecurityError(f"template built a number larger than {MAX_INT_BITS} bits")
    return value


def _width(value: Any, what: str) -> int:
    """A width, precision or count argument, refused when it is over MAX_WIDTH."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    if abs(value) > MAX_WIDTH:
        raise SecurityError(f"{what} width too large ({value}; at most {MAX_WIDTH})")
    return abs(value)


def _measure(value: Any, cap: int) -> tuple[int, int, int]:
    """(characters, nodes, depth) of a value as text, counted up to `cap` (cheap: no string is built)."""
    chars = nodes = depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack and chars <= cap and nodes <= cap:
        item, level = stack.pop()
        nodes += 1
        depth = max(depth, level)
        if isinstance(item, (str, bytes)):
            chars += len(item)
        elif isinstance(item, bool) or item is None:
            chars += 5
        elif isinstance(item, int):
            chars += item.bit_length() // 3 + 2
        elif isinstance(item, float):
            chars += 24
        elif isinstance(item, Mapping):
            chars += 2
            stack.extend((part, level + 1) for pair in item.items() for part in pair)
        elif isinstance(item, (list, tuple)):
            chars += 2
            stack.extend((part, level + 1) for part in item)
        else:
            chars += 32
    return chars, nodes, depth


def _text_len(value: Any) -> int:
    return _measure(value, _limit())[0]


def _materialize(value: Any, what: str) -> list[Any]:
    """An iterable as a list, refused when it has more items than the budget allows."""
    limit = _limit()
    items = list(itertools.islice(iter(value), limit + 1))
    if len(items) > limit:
        raise SecurityError(f"{what} has more than {limit} items")
    return items


# ----- printf-style (`%`) and str.format sizes -----
_PRINTF_SPEC = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[-+ #0]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d*))?[hlL]?(?P<conversion>.)",
    re.DOTALL,
)


def _printf_size(fmt: Any, values: Any) -> int:
    """An upper bound on the length of `fmt % values`; refuses a width or precision over MAX_WIDTH."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else str(fmt)
    positional = list(values) if isinstance(values, tuple) else [values]
    index = 0
    total = len(text)

    def take() -> Any:
        nonlocal index
        value = positional[index] if index < len(positional) else None
        index += 1
        return value

    for match in _PRINTF_SPEC.finditer(text):
        if match["conversion"] == "%":
            continue
        for part in ("width", "precision"):
            given = match[part]
            if given == "*":
                total += _width(take(), "format")
            elif given:
                total += _width(int(given) if len(given) <= 9 else MAX_WIDTH + 1, "format")
        if match["key"] is not None and isinstance(values, Mapping):
            total += _text_len(values.get(match["key"]))
        else:
            total += _text_len(take())
    return total


_SPEC_NUMBERS = re.compile(r"\d+")


class _SizedFields:
    """str.format under the budget: each field's width and precision, and the running total, are checked
    before the field is formatted (nested fields like `{:{w}}` are resolved by then)."""

    _total = 0

    def vformat(self, format_string: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)  # type: ignore[misc]

    def format_field(self, value: Any, format_spec: str) -> Any:
        widths = [int(n) if len(n) <= 9 else MAX_WIDTH + 1 for n in _SPEC_NUMBERS.findall(format_spec)]
        self._total += sum(_width(w, "format") for w in widths) + _text_len(value)
        _refuse_size(self._total, "str.format")
        tick()
        return super().format_field(value, format_spec)  # type: ignore[misc]


class _SizedFormatter(_SizedFields, SandboxedFormatter):
    pass


class _SizedEscapeFormatter(_SizedFields, SandboxedEscapeFormatter):
    pass


# ----- sizes of filters and str methods, before they run -----
def _size_center(args: dict[str, Any]) -> int:
    return max(_text_len(args["value"]), _width(args["width"], "filter center"))


def _size_indent(args: dict[str, Any]) -> int:
    text, width = str(args["s"]), args["width"]
    step = len(width) if isinstance(width, str) else _width(width, "filter indent")
    return len(text) + (text.count("\n") + 1) * step


def _size_wordwrap(args: dict[str, Any]) -> int:
    text, width = str(args["s"]), _width(args["width"], "filter wordwrap")
    lines = len(text.split()) + len(text) // max(width, 1) + 1
    return len(text) + lines * len(args["wrapstring"] or "\n")


def _size_truncate(args: dict[str, Any]) -> int:
    _width(args["length"], "filter truncate")
    return _text_len(args["s"]) + _text_len(args["end"])


def _size_format(args: dict[str, Any]) -> int:
    return _printf_size(args["value"], args["kwargs"] or tuple(args["args"]))


def _size_replace(text: Any, old: Any, new: Any, count: Any) -> int:
    text, old, new = str(text), str(old), str(new)
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


def _size_join(args: dict[str, Any]) -> int:
    items = args["value"] = _materialize(args["value"], "join")
    return _text_len(items) + max(len(items) - 1, 0) * len(str(args["d"]))


def _size_batch(args: dict[str, Any]) -> int:
    return _width(args["linecount"], "filter batch")


def _size_slice(args: dict[str, Any]) -> int:
    return _width(args["slices"], "filter slice")


def _size_tojson(args: dict[str, Any]) -> int:
    chars, nodes, depth = _measure(args["value"], _limit())
    indent = args.get("indent")
    step = len(indent) if isinstance(indent, str) else _width(indent, "tojson indent")
    return 6 * chars + nodes * (depth * step + 2)


def _size_pprint(args: dict[str, Any]) -> int:
    chars, nodes, depth = _measure(args["value"], _limit())
    return 4 * chars + nodes * depth


def _size_urlize(args: dict[str, Any]) -> int:
    text = str(args["value"])
    extra = _text_len(args.get("target")) + _text_len(args.get("rel")) + 64
    return 3 * len(text) + len(text.split()) * extra


def _size_sum(args: dict[str, Any]) -> int:
    if not isinstance(args["start"], (list, tuple)):
        return 0
    # Adding lists copies the running total each time: the work grows as items x total size, so that
    # product (scaled to a fraction of a second of copying) is what must stay within the budget.
    items = args["iterable"] = _materialize(args["iterable"], "sum")
    return len(items) * _measure(items, _limit())[1] // 8


_FILTER_SIZES: dict[str, Callable[[dict[str, Any]], int]] = {
    "center": _size_center,
    "indent": _size_indent,
    "wordwrap": _size_wordwrap,
    "truncate": _size_truncate,
    "format": _size_format,
    "replace": lambda a: _size_replace(a["s"], a["old"], a["new"], a["count"]),
    "join": _size_join,
    "batch": _size_batch,
    "slice": _size_slice,
    "tojson": _size_tojson,
    "pprint": _size_pprint,
    "urlize": _size_urlize,
    "sum": _size_sum,
}


def _str_method_size(owner: str | bytes, name: str, args: tuple[Any, ...]) -> tuple[int, tuple[Any, ...]]:
    """(size estimate, arguments to call with) for the str/bytes methods that can build large values."""
    if name in ("center", "ljust", "rjust", "zfill") and args:
        return max(len(owner), _width(args[0], f"str.{name}")), args
    if name == "expandtabs":
        tab = _width(args[0], "str.expandtabs") if args else 8
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        return len(owner) + tabs * tab, args
    if name == "replace" and len(args) >= 2:
        return _size_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1), args
    if name == "join" and args:
        items = _materialize(args[0], f"str.{name}")
        return _text_len(items) + max(len(items) - 1, 0) * len(owner), (items, *args[1:])
    if name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((_text_len(v) for v in args[0].values()), default=1)
        return len(owner) * max(longest, 1), args
    return 0, args


# ----- the tree rewrite: every loop iteration ticks, every `~` is sized -----
class _BudgetHooks(jinja2.ext.Extension):
    """Hooks the parsed template is rewired to call (Jinja has no sandbox hook for loops or `~`)."""

    def iterate(self, iterable: Any) -> Iterator[Any]:
        """The loop's items, one budget tick each: nested loops over long strings cannot run unbounded."""
        for item in iterable:
            tick()
            yield item

    def join_text(self, *pieces: Any) -> str:
        """`a ~ b ~ c` (str_join), sized before it is built."""
        texts = [str(piece) for piece in pieces]
        _refuse_size(sum(len(text) for text in texts), "'~'")
        return "".join(texts)


class _BudgetRewriter(NodeTransformer):
    def _hook(self, method: str, args: list[jinja2.nodes.Expr], lineno: int) -> jinja2.nodes.Call:
        target = jinja2.nodes.ExtensionAttribute(_BudgetHooks.identifier, method, lineno=lineno)
        return jinja2.nodes.Call(target, args, [], None, None, lineno=lineno)

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.For:
        self.generic_visit(node)
        node.iter = self._hook("iterate", [node.iter], node.lineno)  # type: ignore[list-item]
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Call:
        self.generic_visit(node)
        return self._hook("join_text", list(node.nodes), node.lineno)


class _BudgetedRange:
    """range() for templates: Jinja's size cap per call, plus one iteration budget per render."""

    def __init__(self, *args: int) -> None:
        rng = range(*args)
        if len(rng) > 100_000:
            raise OverflowError("range too big for a chat template (over 100000 items)")
        self._range = rng

    def __iter__(self) -> Iterator[int]:
        for value in self._range:
            tick()
            yield value

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        return self._range[index]

    def __reversed__(self) -> Iterator[int]:
        for value in reversed(self._range):
            tick()
            yield value

    def __repr__(self) -> str:
        return repr(self._range)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}  # noqa: RUF012  (Jinja's extension API wants a class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        block = jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body)
        block.set_lineno(lineno)
        return block

    def _render_body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes (CPython internals) and oversized values."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _TemplateNamespace._check(name, value)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name, value)
        tick()
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"templates cannot set underscore attributes on a namespace ({name!r})")
        _check_size(value)


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: no HTML escaping, with indent/separators/sort_keys exposed (sized by its guard).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    # Jinja's default global, with its paragraph and word counts bounded.
    _refuse_size(_width(n, "lipsum") * _width(max, "lipsum") * 12, "lipsum")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


_SIZED_STR_METHODS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "translate"}
)


class ChatSandbox(ImmutableSandboxedEnvironment):
    """transformers' template environment, with a per-compile and per-render budget on time, iterations and sizes."""

    # Intercepted operators are also never folded at compile time: `'%999999999s' % 'a'` is sized at render.
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        rewritten = _BudgetRewriter().visit(tree)
        assert isinstance(rewritten, jinja2.nodes.Template)
        return rewritten

    @staticmethod
    def concat(pieces: Iterable[str]) -> str:
        """Join a block's output (macro bodies, `caller()`, `{% set %}` blocks), refusing an oversized one."""
        collected, size, limit = [], 0, _limit()
        for piece in pieces:
            size += len(piece)
            if size > limit:
                raise SecurityError(f"template built a block larger than the size limit ({limit} characters)")
            collected.append(piece)
        return "".join(collected)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        tick()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int):
                    _refuse_size(len(seq) * count, "'*'")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_INT_BITS
            ):
                raise SecurityError(f"template built a number larger than {MAX_INT_BITS} bits")
        if (
            operator == "**"
            and isinstance(right, (int, float))
            and (
                abs(right) > 256 or (isinstance(left, int) and left.bit_length() * abs(right) > MAX_INT_BITS)
            )
        ):
            raise SecurityError("exponent too large in a chat template")
        if operator == "%" and isinstance(left, (str, bytes)):
            _refuse_size(_printf_size(left, right), "'%' formatting")
        return _check_size(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """str.format / format_map of a string, through a formatter that sizes every field before formatting it."""
        if super().wrap_str_format(value) is None:
            return None
        owner: str = value.__self__
        formatter: SandboxedFormatter = (
            _SizedEscapeFormatter(self, escape=owner.escape)
            if isinstance(owner, Markup)
            else _SizedFormatter(self)
        )

        def sized(*args: Any, **kwargs: Any) -> str:
            if value.__name__ != "format_map":
                return type(owner)(formatter.vformat(owner, args, kwargs))
            if kwargs or len(args) != 1:
                raise TypeError("format_map() takes exactly one argument")
            return type(owner)(formatter.vformat(owner, (), args[0]))

        return functools.update_wrapper(sized, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        tick()
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, (str, bytes)) and name in _SIZED_STR_METHODS:
            estimate, args = _str_method_size(owner, name, args)
            _refuse_size(estimate, f"str.{name}")
        for arg in (*args, *kwargs.values()):
            _check_size(arg)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _guard_filter(name: str, func: Any) -> Any:
    """Wrap a Jinja filter: size what it would build before it runs (where that can outgrow its input),
    refuse huge widths, and check the result."""
    sizer = _FILTER_SIZES.get(name)
    try:
        signature = inspect.signature(func) if sizer is not None else None
    except (TypeError, ValueError):  # pragma: no cover - every built-in filter has a signature
        signature = None
    # Jinja's async-capable filters take an eval context their own signature does not list.
    injected = int(
        getattr(func, "jinja_pass_arg", None) is not None
        and getattr(inspect.unwrap(func), "jinja_pass_arg", None) is None
    )

    def guarded(*args: Any, **kwargs: Any) -> Any:
        tick()
        if sizer is not None and signature is not None:
            try:
                bound = signature.bind(*args[injected:], **kwargs)
            except TypeError:
                bound = None  # wrong arguments: let the filter raise its own error
            if bound is not None:
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                _refuse_size(sizer(arguments), f"filter {name}")
                bound.arguments.update(arguments)  # a sizer may have turned an iterator into a list
                args, kwargs = (*args[:injected], *bound.args), bound.kwargs
        return _check_size(func(*args, **kwargs))

    for attr in ("jinja_pass_arg",):
        if hasattr(func, attr):
            setattr(guarded, attr, getattr(func, attr))
    guarded.__name__ = getattr(func, "__name__", name)
    return guarded


def make_environment() -> ChatSandbox:
    """A fresh sandboxed environment configured as transformers configures its template environment."""
    env = ChatSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols, _BudgetHooks],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, func) for name, func in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals["range"] = _BudgetedRange
    env.globals["lipsum"] = _lipsum
    return env
