"""The chat-template renderer shared by the importer, the validator and the runtime.

Chat templates from the Hub are untrusted code. They render here exactly as transformers renders
them (an immutable sandboxed Jinja environment with `trim_blocks`, `lstrip_blocks`, loop controls,
the `{% generation %}` tag, transformers' `tojson`, `raise_exception`, `strftime_now`, `dict`,
`namespace`; special tokens as variables; None-valued message keys dropped; reasoning fields
aliased), so the prompt is byte-identical to `tokenizer.apply_chat_template(..., tokenize=False)`.

Every compile and every render runs inside the resource sandbox of `gallery/template_sandbox.py` (a
deadline, iteration and size budgets, sized operations); its limits are re-exported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError

from gallery.template_sandbox import (
    DEFAULT_DEADLINE_S,
    MAX_FOLDED_CHARS,
    MAX_INT_BITS,
    MAX_ITERATIONS,
    MAX_OUTPUT_CHARS,
    MAX_TEMPLATE_BYTES,
    MAX_VALUE_CHARS,
    MAX_WIDTH,
    budget,
    make_environment,
    tick,
)

__all__ = [
    "DEFAULT_DEADLINE_S",
    "MAX_FOLDED_CHARS",
    "MAX_INT_BITS",
    "MAX_ITERATIONS",
    "MAX_OUTPUT_CHARS",
    "MAX_TEMPLATE_BYTES",
    "MAX_VALUE_CHARS",
    "MAX_WIDTH",
    "PROBE_IMAGE",
    "PROBE_TEXT",
    "PROBE_TEXT_NO_SYSTEM",
    "SPECIAL_TOKEN_NAMES",
    "TemplateError",
    "compile_template",
    "render_chat",
    "template_sha256",
]

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


_ENV = make_environment()
_CACHE: OrderedDict[str, jinja2.Template] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64


def template_sha256(text: str) -> str:
    """The sha256 of a template's UTF-8 text: the pin a config records and the runtime checks."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def compile_template(text: str, *, deadline_s: float = DEFAULT_DEADLINE_S) -> jinja2.Template:
    """Compile a template in the sandbox (cached by content). Raises TemplateError.

    Compiling runs template code too (Jinja folds constant expressions), so it runs under the budget,
    with the smaller MAX_FOLDED_CHARS cap on what may be folded.
    """
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
        with budget(deadline_s, MAX_FOLDED_CHARS):
            compiled = _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None
    except RecursionError:
        raise TemplateError("chat template does not compile: nested too deeply") from None
    except (
        Exception
    ) as exc:  # Python's own compiler can fail on what Jinja generated (e.g. too many nested parentheses)
        raise TemplateError(
            f"chat template does not compile: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
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
        # transformers (5.x apply_chat_template) drops None-valued keys (OpenAI clients send content=None with
        # tool calls); a template that then fails on the missing content is retried by runtime.prompt.
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
    try:
        with budget(deadline_s, MAX_VALUE_CHARS):
            pieces: list[str] = []
            size = 0
            for piece in compiled.generate(**context):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise SecurityError(f"rendered prompt exceeds {MAX_OUTPUT_CHARS} characters")
                tick()
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
