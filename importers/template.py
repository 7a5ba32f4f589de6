"""Find the chat template in every home, pick the one the runtime will pin, and render-check it.

Homes: `chat_template.jinja` (+ `additional_chat_templates/<name>.jinja`), `tokenizer_config.json`
`chat_template` (a string or a list of `{name, template}`), `chat_template.json` (the processor's) and
`processor_config.json`. The tokenizer side follows transformers (the .jinja file overrides the
tokenizer_config key); the processor side prefers .jinja, then chat_template.json, then
processor_config.json. A VLM config pins the processor's template (it knows about images); a text
config pins the tokenizer's. The pinned template is rendered in the sandbox on probe conversations.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Literal

from gallery.chat_template import (
    PROBE_IMAGE,
    PROBE_TEXT,
    PROBE_TEXT_NO_SYSTEM,
    SPECIAL_TOKEN_NAMES,
    TemplateError,
    compile_template,
    render_chat,
    template_sha256,
)
from gallery.config import ChatTemplate, Decision, Evidence, RenderCheck
from gallery.errors import BadMetadata
from importers.metadata import RepoMetadata, token_text

_MEDIA_MARKERS = (
    "<|image_pad|>",
    "<|vision_start|>",
    "<start_of_image>",
    "<|image|>",
    "<|image>",
    "<image>",
    "[IMG]",
    "<|image_1|>",
    "<image_soft_token>",
    "<|img|>",
    "<img>",
    "<|media_pad|>",
    "<fake_token_around_image>",
)


@dataclasses.dataclass
class TemplateCandidate:
    """A template found in one home."""

    text: str
    source: str
    name: str | None = None


@dataclasses.dataclass
class TemplateDecision:
    """The pinned template, the marker images render as, and the decision record."""

    template: ChatTemplate
    media_marker: str | None
    decision: Decision
    warnings: list[str]


def _named_list(value: list[Any], file: str) -> dict[str, str]:
    named: dict[str, str] = {}
    for index, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("template"), str)
        ):
            raise BadMetadata(
                f"{file}: chat_template[{index}] must be an object with string 'name' and 'template'"
            )
        named[item["name"]] = item["template"]
    return named


def _template_value(value: Any, file: str, key: str = "chat_template") -> dict[str, str]:
    """A chat_template field as {name: text}; a plain string is the 'default' template."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value} if value.strip() else {}
    if isinstance(value, list):
        return _named_list(value, file)
    raise BadMetadata(
        f"{file}: {key} must be a string or a list of named templates, got {type(value).__name__}"
    )


def tokenizer_templates(meta: RepoMetadata) -> dict[str, TemplateCandidate]:
    """The tokenizer's templates by name, with transformers' precedence applied."""
    found: dict[str, TemplateCandidate] = {}
    for name, text in _template_value(
        meta.tokenizer_config.get("chat_template"), "tokenizer_config.json"
    ).items():
        found[name] = TemplateCandidate(text, "tokenizer_config.json:chat_template", name)
    jinja = meta.snapshot.text("chat_template.jinja")
    if jinja is not None and jinja.strip():
        found["default"] = TemplateCandidate(jinja, "chat_template.jinja", "default")
    for path in sorted(meta.snapshot.files):
        if fnmatch.fnmatch(path, "additional_chat_templates/*.jinja"):
            name = path.rsplit("/", 1)[1][: -len(".jinja")]
            text = meta.snapshot.text(path) or ""
            if text.strip():
                found[name] = TemplateCandidate(text, path, name)
    return found


def processor_template(meta: RepoMetadata) -> TemplateCandidate | None:
    """The processor's template (image-aware in VLM repos), or None."""
    jinja = meta.snapshot.text("chat_template.jinja")
    if jinja is not None and jinja.strip():
        return TemplateCandidate(jinja, "chat_template.jinja", "default")
    for file in ("chat_template.json", "processor_config.json"):
        obj = meta.json_object(file)
        if obj is None or "chat_template" not in obj:
            continue
        named = _template_value(obj.get("chat_template"), file)
        if named:
            name = "default" if "default" in named else next(iter(named))
            return TemplateCandidate(named[name], f"{file}:chat_template", name)
    return None


def template_variables(meta: RepoMetadata) -> dict[str, str]:
    """Special tokens the template sees as variables, as transformers passes them."""
    variables: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = token_text(meta.tokenizer_config.get(name), "tokenizer_config.json", name)
        if value is None:
            value = token_text(meta.special_tokens_map.get(name), "special_tokens_map.json", name)
        if value is not None:
            variables[name] = value
    return variables


def media_marker_candidates(meta: RepoMetadata, image_token_text: str | None) -> list[str]:
    """Strings that show an image part reached the prompt, most specific first."""
    candidates = []
    if image_token_text:
        candidates.append(image_token_text)
    for key in ("image_token", "boi_token"):
        value = meta.tokenizer_config.get(key)
        if isinstance(value, str) and value:
            candidates.append(value)
    candidates.extend(_MEDIA_MARKERS)
    return list(dict.fromkeys(candidates))


@dataclasses.dataclass
class ProbeResult:
    """What rendering the probes showed about a template."""

    check: RenderCheck
    supports_system: bool = True
    content_format: Literal["string", "parts"] = "string"
    marker: str | None = None


def _as_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
        for m in messages
    ]


def _text_probe(text: str, variables: dict[str, str], messages: list[dict[str, Any]]) -> tuple[str, bool]:
    """Render the text probe (falling back to no system message). Returns (prompt, system accepted)."""
    try:
        return render_chat(text, messages, variables=variables), True
    except TemplateError:
        no_system = [m for m in messages if m["role"] != "system"]
        return render_chat(text, no_system, variables=variables), False


def _render_checks(text: str, variables: dict[str, str], *, vlm: bool, markers: list[str]) -> ProbeResult:
    """Render the probes: the conversation must render and keep its text; for VLMs an image part must show."""
    result = ProbeResult(check=RenderCheck())
    check = result.check
    try:
        compile_template(text)
    except TemplateError as exc:
        check.text_probe = "error"
        check.errors.append(str(exc))
        return result
    failures: list[str] = []
    # Plain-string content first (what transformers' tokenizer templates take); some processor templates only
    # render list-of-parts content and silently drop string content (llava-1.5), so try that form too.
    formats: tuple[tuple[Literal["string", "parts"], list[dict[str, Any]]], ...] = (
        ("string", PROBE_TEXT),
        ("parts", _as_parts(PROBE_TEXT)),
    )
    for content_format, messages in formats:
        try:
            prompt, supports_system = _text_probe(text, variables, messages)
        except TemplateError as exc:
            failures.append(str(exc))
            continue
        if all(m["content"] in prompt for m in PROBE_TEXT if m["role"] == "user"):
            check.text_probe = "ok"
            result.supports_system, result.content_format = supports_system, content_format
            if not supports_system:
                check.errors.append(
                    "system messages are rejected; the runtime folds them into the first user turn"
                )
            break
        failures.append(f"the rendered prompt drops the user's text when content is a {content_format}")
    else:
        check.text_probe = "error"
        check.errors.append(failures[0] if len(set(failures)) == 1 else "; ".join(dict.fromkeys(failures)))
    if vlm:
        question = {"type": "text", "text": "What is in this image?"}
        try:
            with_image = render_chat(text, PROBE_IMAGE, variables=variables)
            text_only = render_chat(text, [{"role": "user", "content": [question]}], variables=variables)
            result.marker = next((m for m in markers if with_image.count(m) > text_only.count(m)), None)
            if with_image == text_only:
                check.image_probe = "error"
                check.errors.append(
                    "the template drops image parts: a rendered image message equals the text-only one"
                )
            else:
                check.image_probe = "ok"
        except TemplateError as exc:
            check.image_probe = "error"
            check.errors.append(f"image probe: {exc}")
    return result


def _checked_named(
    tok: dict[str, TemplateCandidate],
    chosen: TemplateCandidate,
    variables: dict[str, str],
    warnings: list[str],
) -> dict[str, str]:
    """The other named templates worth pinning: each must compile and render the text probe in the sandbox."""
    named: dict[str, str] = {}
    for name, cand in tok.items():
        if cand.text == chosen.text:
            continue
        try:
            render_chat(cand.text, PROBE_TEXT_NO_SYSTEM, variables=variables)
        except TemplateError as exc:
            warnings.append(f"named template {name!r} in {cand.source} not pinned: {exc}")
            continue
        named[name] = cand.text
    return named


def decide_template(meta: RepoMetadata, *, vlm: bool, image_token_text: str | None) -> TemplateDecision:
    """Pick the template to pin (processor's for VLMs, tokenizer's for text), pin its text and sha256, render-check it."""
    tok = tokenizer_templates(meta)
    proc = processor_template(meta)
    evidence: list[Evidence] = []
    conflicts: list[str] = []
    warnings: list[str] = []
    for name, cand in tok.items():
        evidence.append(
            Evidence(
                source=cand.source.split(":")[0],
                field=cand.source.partition(":")[2] or None,
                detail=f"tokenizer template {name!r} ({len(cand.text)} chars)",
            )
        )
    if proc is not None and proc.source != "chat_template.jinja":
        evidence.append(
            Evidence(
                source=proc.source.split(":")[0],
                field="chat_template",
                detail=f"processor template ({len(proc.text)} chars)",
            )
        )
    tok_default = tok.get("default")
    chosen: TemplateCandidate | None
    if vlm:
        chosen = proc or tok_default
        why = (
            "the processor's template (it knows about images)"
            if proc
            else "the tokenizer's (no processor template)"
        )
        if proc is None and tok_default is not None:
            warnings.append(
                "VLM without a processor chat template: pinned the tokenizer's, which may not render images"
            )
    else:
        chosen = tok_default or proc
        why = (
            "the tokenizer's template" if tok_default else "the processor's template (the tokenizer has none)"
        )
    if chosen is None and tok:
        # Named templates but no 'default' (transformers refuses these without a name): pin the first.
        first = next(iter(tok.values()))
        chosen, why = first, f"named template {first.name!r} (no 'default' among {sorted(tok)})"
        warnings.append(
            f"the tokenizer has named templates {sorted(tok)} but no 'default': pinned {first.name!r}"
        )
    if tok_default is not None and proc is not None and tok_default.text != proc.text:
        loser = tok_default if chosen is proc else proc
        conflicts.append(
            f"{loser.source} has a different template; pinned {chosen.source if chosen else '-'} for {'mlx-vlm' if vlm else 'mlx'}"
        )
    variables = template_variables(meta)

    if chosen is None:
        warnings.append(
            "no chat template anywhere (tokenizer_config.json, chat_template.jinja/json, processor_config.json): "
            "chat requests cannot be rendered as the model expects"
        )
        template = ChatTemplate(status="missing", variables=variables)
        decision = Decision(
            value="missing: no chat template in any home", evidence=evidence, conflicts=conflicts
        )
        return TemplateDecision(template=template, media_marker=None, decision=decision, warnings=warnings)

    markers = media_marker_candidates(meta, image_token_text)
    probes = _render_checks(chosen.text, variables, vlm=vlm, markers=markers)
    check = probes.check
    named = _checked_named(tok, chosen, variables, warnings)
    if any(err.startswith("chat template is") and "limit" in err for err in check.errors) or (
        check.text_probe == "error"
        and any("syntax error" in err or "does not compile" in err for err in check.errors)
    ):
        warnings.append(f"the chat template in {chosen.source} cannot be used: {check.errors[0]}")
        template = ChatTemplate(
            status="rejected", source=chosen.source, name=chosen.name, variables=variables, render_check=check
        )
        decision = Decision(
            value=f"rejected: {chosen.source}: {check.errors[0]}", evidence=evidence, conflicts=conflicts
        )
        return TemplateDecision(template=template, media_marker=None, decision=decision, warnings=warnings)
    for err in check.errors:
        if not err.startswith("system messages are rejected"):
            warnings.append(f"chat template render check: {err}")
    template = ChatTemplate(
        status="pinned",
        source=chosen.source,
        name=chosen.name if chosen.name != "default" else None,
        text=chosen.text,
        sha256=template_sha256(chosen.text),
        named=named,
        variables=variables,
        render_check=check,
        supports_system=probes.supports_system,
        content_format=probes.content_format,
    )
    value = f"pinned from {chosen.source}: {why}"
    return TemplateDecision(
        template=template,
        media_marker=probes.marker,
        decision=Decision(value=value, evidence=evidence, conflicts=conflicts),
        warnings=warnings,
    )
