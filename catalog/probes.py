"""What a config's chat template and stop set show: the template probes and the stop-set rule (for validate).

Templates are compiled and rendered on the probe conversations in the sandbox (plus an image probe for
mlx-vlm configs, which must show the image marker), once per (template sha256, variables, probe kind): a
catalog of thousands of entries built on a handful of templates renders each only once.

The stop-set rule, without guessing from token text: a token is *declared* when the tokenizer names it
(`eos_token`, which the template also sees) or the config records a declared end-of-turn token
(`tokenizer_config.json:eot_token` among a stop token's sources, or in the stop decision's evidence).
Every declared token must be in the stop set. The rendered probe then shows what follows the assistant's
turn: if that starts with a stop token, the set covers the end of a turn; if it starts with a declared
token missing from the set, that is an error; if it starts with anything else, nothing declares it, so it
is a warning for a reviewer, never a guess.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any

from gallery.chat_template import (
    PROBE_IMAGE,
    PROBE_TEXT,
    PROBE_TEXT_NO_SYSTEM,
    TemplateError,
    compile_template,
    render_chat,
)
from gallery.config import ModelConfig

_ASSISTANT_PROBE_TEXT = next(m["content"] for m in PROBE_TEXT if m["role"] == "assistant")
_USER_PROBE_TEXTS = [m["content"] for m in PROBE_TEXT if m["role"] == "user"]
_IMAGE_PROBE_TEXT_ONLY: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}]}
]


# ----------------------------------------------------------------------------------------------- templates
@dataclasses.dataclass(frozen=True)
class TemplateVerdict:
    """What rendering one template on the probes showed: problems (code, where, message) and the text render."""

    problems: tuple[tuple[str, tuple[str, ...], str], ...]
    text_render: str | None


_VERDICTS: OrderedDict[tuple[Any, ...], TemplateVerdict] = OrderedDict()
_VERDICTS_LOCK = threading.Lock()
_VERDICTS_MAX = 512


def template_verdict(
    text: str,
    sha256: str,
    variables: dict[str, str],
    supports_system: bool,
    image_probe: bool,
    marker: str | None,
) -> TemplateVerdict:
    """Compile and render a template on the probes, cached by everything the result depends on."""
    key = (sha256, tuple(sorted(variables.items())), supports_system, image_probe, marker)
    with _VERDICTS_LOCK:
        cached = _VERDICTS.get(key)
        if cached is not None:
            _VERDICTS.move_to_end(key)
            return cached
    verdict = render_probes(text, variables, supports_system, image_probe, marker)
    with _VERDICTS_LOCK:
        _VERDICTS[key] = verdict
        while len(_VERDICTS) > _VERDICTS_MAX:
            _VERDICTS.popitem(last=False)
    return verdict


def render_probes(
    text: str, variables: dict[str, str], supports_system: bool, image_probe: bool, marker: str | None
) -> TemplateVerdict:
    """Compile a template and render it on the probes (uncached): its problems and the text render."""
    problems: list[tuple[str, tuple[str, ...], str]] = []
    where = ("mlx", "chat_template", "text")
    try:
        compile_template(text)
    except TemplateError as exc:
        return TemplateVerdict(
            ((("template-error", where, f"the chat template does not compile: {exc}"),)), None
        )
    rendered: str | None = None
    probe = PROBE_TEXT if supports_system else PROBE_TEXT_NO_SYSTEM
    try:
        rendered = render_chat(text, probe, variables=variables)
    except TemplateError as exc:
        hint = ""
        if supports_system:
            try:
                render_chat(text, PROBE_TEXT_NO_SYSTEM, variables=variables)
                hint = (
                    " (it renders without the system message: set mlx.chat_template.supports_system: false)"
                )
            except TemplateError:
                pass
        problems.append(("template-error", where, f"the chat template fails the text probe: {exc}{hint}"))
    if rendered is not None:
        missing = [text for text in _USER_PROBE_TEXTS if text not in rendered]
        if missing:
            problems.append(
                (
                    "template-error",
                    where,
                    f"the rendered text probe lacks the user's message {missing[0]!r}: "
                    "the template drops conversation content",
                )
            )
    if image_probe:
        problems.extend(_image_probe(text, variables, marker))
    return TemplateVerdict(tuple(problems), rendered)


def _image_probe(
    text: str, variables: dict[str, str], marker: str | None
) -> list[tuple[str, tuple[str, ...], str]]:
    where = ("mlx", "chat_template", "text")
    try:
        with_image = render_chat(text, PROBE_IMAGE, variables=variables)
        text_only = render_chat(text, _IMAGE_PROBE_TEXT_ONLY, variables=variables)
    except TemplateError as exc:
        return [("template-image", where, f"the chat template fails the image probe: {exc}")]
    if marker is None:
        return [
            (
                "template-image",
                ("mlx", "media"),
                "an mlx-vlm config must record the image marker "
                "(mlx.media.marker or mlx.media.image_token) so the image probe can prove images reach the prompt",
            )
        ]
    if with_image.count(marker) <= text_only.count(marker):
        return [
            (
                "template-image",
                where,
                f"the image probe does not show the image marker {marker!r}: "
                "images would be dropped silently",
            )
        ]
    return []


# ----------------------------------------------------------------------------------------------- stop set
def declared_end_tokens(config: ModelConfig) -> list[tuple[str, str]]:
    """(what, token text) for every declared end token: the tokenizer's eos_token and any declared end-of-turn."""
    declared: list[tuple[str, str]] = []
    eos = config.mlx.chat_template.variables.get("eos_token")
    if eos:
        declared.append(("the tokenizer's eos_token", eos))
    for token in config.mlx.stop_tokens:
        if token.text and any(source.endswith(":eot_token") for source in token.sources):
            declared.append(("the declared end-of-turn token", token.text))
    decision = config.mlx.decisions.get("stop_tokens")
    for evidence in decision.evidence if decision else []:
        if evidence.field == "eot_token" and evidence.value:
            declared.append(
                (f"the declared end-of-turn token (per {evidence.source}:eot_token)", evidence.value)
            )
    seen: set[str] = set()
    unique = []
    for what, text in declared:
        if text not in seen:
            seen.add(text)
            unique.append((what, text))
    return unique


def stop_problems(config: ModelConfig, rendered: str | None) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(severity, code, where, message) for the stop set: non-empty, consistent, covering the declared end tokens."""
    problems: list[tuple[str, str, tuple[str, ...], str]] = []
    tokens = config.mlx.stop_tokens
    if not tokens and not config.stopwords:
        return [
            (
                "error",
                "stop-set",
                ("mlx", "stop_tokens"),
                "the stop set is empty: generation would run to max_tokens (mlx.stop_tokens and stopwords)",
            )
        ]
    if not tokens:
        problems.append(
            (
                "warning",
                "stop-set",
                ("stopwords",),
                "no stop token ids (mlx.stop_tokens): the runtime can only stop on strings",
            )
        )
    vocab = config.mlx.vocab_size
    for token in tokens:
        if vocab is not None and token.id >= vocab:
            problems.append(
                (
                    "error",
                    "stop-set",
                    ("mlx", "stop_tokens"),
                    f"stop token id {token.id} is outside the vocabulary (mlx.vocab_size {vocab}): the model "
                    "can never generate it",
                )
            )
        if token.text and token.text not in config.stopwords:
            problems.append(
                (
                    "error",
                    "stopwords",
                    ("stopwords",),
                    f"stopwords lacks {token.text!r} (stop token {token.id}): LocalAI stops on stopwords",
                )
            )
    stop_texts = {t.text for t in tokens if t.text} | set(config.stopwords)
    for what, text in declared_end_tokens(config):
        if text not in stop_texts:
            kind, _, origin = what.partition(" (")
            origin = f" ({origin}" if origin else ""
            problems.append(
                (
                    "error",
                    "stop-set",
                    ("mlx", "stop_tokens"),
                    f"{kind} {text!r}{origin} is not in the stop set: generation would run past the end "
                    "of the turn",
                )
            )
    if rendered is not None:
        at = rendered.find(_ASSISTANT_PROBE_TEXT)
        after = rendered[at + len(_ASSISTANT_PROBE_TEXT) :].lstrip(" \t\r\n") if at >= 0 else ""
        declared = {text for _, text in declared_end_tokens(config)}
        if (
            after
            and not any(after.startswith(s) for s in stop_texts if s)
            and not any(after.startswith(d) for d in declared)
        ):
            problems.append(
                (
                    "warning",
                    "stop-set",
                    ("mlx", "stop_tokens"),
                    f"assistant turns end with {after[:24]!r}, which no stop token or declared eos/eot "
                    "matches: check that the stop set covers the end of a turn",
                )
            )
    return problems
