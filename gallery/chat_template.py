"""The sandboxed chat-template renderer shared by the importer, the validator and the runtime.

Chat templates from the Hub are untrusted code. They render here exactly as transformers renders
them (an immutable sandboxed Jinja environment with `trim_blocks`, `lstrip_blocks`, loop controls,
the `{% generation %}` tag, transformers' `tojson`, `raise_exception`, `strftime_now`, `dict`,
`namespace`; special tokens as variables; None-valued message keys dropped; reasoning fields
aliased), so the prompt is byte-identical to `tokenizer.apply_chat_template(..., tokenize=False)`.

On top of Jinja's sandbox (no attribute escapes, no mutation of inputs) every render runs under a
budget: a size limit on the template, a deadline, a cap on loop iterations and calls, and size caps
on the strings and lists a template can build — so a malicious template fails with a clear error
instead of hanging or eating memory.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_BYTES = 256 * 1024
MAX_OUTPUT_CHARS = 16 * 1024 * 1024
MAX_VALUE_CHARS = 32 * 1024 * 1024
MAX_ITERATIONS = 500_000
MAX_WIDTH = 100_000
DEFAULT_DEADLINE_S = 5.0

# Special-token variables transformers passes to every template (its named special tokens).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(ValueError):
    """A chat template that cannot be compiled or rendered; the message is one line."""


@dataclasses.dataclass
class _Budget:
    deadline: float
    steps: int = 0

    def tick(self, amount: int = 1) -> None:
        self.steps += amount
        if self.steps > MAX_ITERATIONS:
            raise SecurityError(f"template exceeded {MAX_ITERATIONS} loop iterations and calls")
        if time.monotonic() > self.deadline:
            raise SecurityError("template took too long to render")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _tick(amount: int = 1) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick(amount)


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_VALUE_CHARS:
        raise SecurityError(f"template built a value larger than {MAX_VALUE_CHARS} items")
    return value


class _BudgetedRange:
    """range() for templates: Jinja's size cap per call, plus one iteration budget per render."""

    def __init__(self, *args: int) -> None:
        rng = range(*args)
        if len(rng) > 100_000:
            raise OverflowError("range too big for a chat template (over 100000 items)")
        self._range = rng

    def __iter__(self) -> Iterator[int]:
        for value in self._range:
            _tick()
            yield value

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        return self._range[index]

    def __reversed__(self) -> Iterator[int]:
        for value in reversed(self._range):
            _tick()
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
        _tick()
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
    # transformers' tojson: no HTML escaping, with indent/separators/sort_keys exposed.
    if isinstance(indent, int) and indent > MAX_WIDTH:
        raise SecurityError("tojson indent too large")
    return _check_size(
        json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_WIDTH_IN_FORMAT = re.compile(r"%[-+ #0]*(\d+)|\{[^{}]*:[^{}]*?(\d{4,})[^{}]*\}")


def _check_format_widths(fmt: Any) -> None:
    if isinstance(fmt, str):
        for match in _WIDTH_IN_FORMAT.finditer(fmt):
            width = match.group(1) or match.group(2)
            if width and int(width) > MAX_WIDTH:
                raise SecurityError("format width too large")


_WIDE_STR_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "format", "format_map"})


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """transformers' template environment, with a per-render budget on time, iterations and sizes."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(count, int)
                    and len(seq) * count > MAX_VALUE_CHARS
                ):
                    raise SecurityError("template multiplied a value beyond the size limit")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256:
            raise SecurityError("exponent too large in a chat template")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        # The sandbox hands templates a wrapper around str.format; look through it to the bound method.
        target = getattr(__obj, "__wrapped__", __obj)
        name = getattr(target, "__name__", "")
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str) and name in _WIDE_STR_METHODS:
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, int) and arg > MAX_WIDTH:
                    raise SecurityError(f"str.{name} width too large")
            if name in ("format", "format_map"):
                _check_format_widths(owner)
        for arg in (*args, *kwargs.values()):
            _check_size(arg)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _guard_filter(name: str, func: Any) -> Any:
    """Wrap a Jinja filter: refuse huge widths up front and oversized results after."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if name in ("center", "indent", "wordwrap", "truncate"):
            for arg in (*args[1:], *kwargs.values()):
                if isinstance(arg, int) and not isinstance(arg, bool) and arg > MAX_WIDTH:
                    raise SecurityError(f"filter {name} width too large")
        if name == "format" and args:
            _check_format_widths(args[0])
        if name == "replace" and len(args) >= 3:
            subject, old, new = (str(a) for a in args[:3])
            hits = len(subject) + 1 if old == "" else subject.count(old)
            if hits * len(new) > MAX_VALUE_CHARS:
                raise SecurityError("filter replace result too large")
        return _check_size(func(*args, **kwargs))

    for attr in ("jinja_pass_arg",):
        if hasattr(func, attr):
            setattr(guarded, attr, getattr(func, attr))
    guarded.__name__ = getattr(func, "__name__", name)
    return guarded


def _make_environment() -> _ChatSandbox:
    env = _ChatSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, func) for name, func in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals["range"] = _BudgetedRange
    return env


_ENV = _make_environment()
_CACHE: OrderedDict[str, jinja2.Template] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64


def template_sha256(text: str) -> str:
    """The sha256 of a template's UTF-8 text: the pin a config records and the runtime checks."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def compile_template(text: str) -> jinja2.Template:
    """Compile a template in the sandbox (cached by content). Raises TemplateError."""
    if not isinstance(text, str):
        raise TemplateError(f"chat template must be a string, got {type(text).__name__}")
    size = len(text.encode("utf-8"))
    if size > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"chat template is {size} bytes, over the {MAX_TEMPLATE_BYTES}-byte limit")
    key = template_sha256(text)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            _CACHE.move_to_end(key)
            return cached
    try:
        compiled = _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as exc:
        raise TemplateError(f"chat template does not compile: {_one_line(exc)}") from None
    with _CACHE_LOCK:
        _CACHE[key] = compiled
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return compiled


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types: rich objects (images, arrays) become inert names."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return _plain(item())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TemplateError(f"chat messages must be objects, got {type(message).__name__}")
        # transformers drops None-valued keys (OpenAI clients send content=None with tool calls).
        plain = _plain({key: value for key, value in message.items() if value is not None})
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        prepared.append(plain)
    return prepared


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
    **kwargs: Any,
) -> str:
    """Render a chat template as transformers would, inside the budgeted sandbox.

    `variables` are the special tokens (bos_token, eos_token, …); `kwargs` (e.g. enable_thinking)
    override them, as in transformers. Raises TemplateError with a one-line message.
    """
    compiled = compile_template(template)
    context: dict[str, Any] = {**_plain(dict(variables or {})), **_plain(kwargs)}
    context.update(
        messages=_prepare_messages(messages),
        tools=_plain(list(tools)) if tools is not None else None,
        documents=_plain(list(documents)) if documents is not None else None,
        add_generation_prompt=add_generation_prompt,
    )
    token = _BUDGET.set(_Budget(deadline=time.monotonic() + deadline_s))
    try:
        pieces: list[str] = []
        size = 0
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise SecurityError(f"rendered prompt exceeds {MAX_OUTPUT_CHARS} characters")
            _tick()
            pieces.append(piece)
        return "".join(pieces)
    except TemplateError:
        raise
    except SecurityError as exc:
        raise TemplateError(f"chat template blocked by the sandbox: {_one_line(exc)}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"chat template raised an error: {_one_line(exc)}") from None
    except RecursionError:
        raise TemplateError("chat template recursed too deeply") from None
    except MemoryError:
        raise TemplateError("chat template ran out of memory") from None
    except Exception as exc:  # any Python error inside template code is the template's fault
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {_one_line(exc)}") from None
    finally:
        _BUDGET.reset(token)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


# Probe conversations, rendered at import and validation time.
PROBE_TEXT: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]
PROBE_TEXT_NO_SYSTEM: list[dict[str, Any]] = PROBE_TEXT[1:]
PROBE_IMAGE: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}],
    }
]
