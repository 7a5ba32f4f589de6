"""Read reasoning and tool-call conventions off the pinned template and the special-token vocabulary.

Reasoning: the markers (`<think>`…`</think>`, Gemma 4 `<|channel>thought`…`<channel|>`, Mistral
`[THINK]`…`[/THINK]`, harmony channels), the template variable that switches it, and whether it is
on when not told — found by rendering the template with the switch unset, on and off and comparing.
Tool calls: the syntax, named like mlx-lm's tool parsers where one fits.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from gallery.chat_template import TemplateError, render_chat
from gallery.config import Decision, Evidence, Reasoning, ToolCalls
from importers.vocab import SpecialVocab

# (start, end, start probe, end alone is proof) marker pairs, checked in this order; the first found wins.
# An end marker alone identifies its pair only where it is distinctive (`</think>` is; harmony's `<|end|>`
# also ends Phi-3 turns, so it is not).
_MARKERS: tuple[tuple[str, str, str, bool], ...] = (
    ("<think>", "</think>", "<think>", True),
    ("<|channel>thought", "<channel|>", "<|channel>", True),
    ("[THINK]", "[/THINK]", "[THINK]", True),
    ("<longcat_think>", "</longcat_think>", "<longcat_think>", True),
    ("<|think:start|>", "<|think:end|>", "<|think:start|>", True),
    ("<|channel|>analysis<|message|>", "<|end|>", "<|channel|>analysis", False),
)
_SWITCHES = ("enable_thinking", "reasoning_effort", "enable_reasoning", "thinking")
_PROBE_USER = [{"role": "user", "content": "Hello"}]
# A past assistant turn with a reasoning block: templates that strip or re-wrap reasoning show it here.
_PROBE_HISTORY = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi.", "reasoning_content": "The user greets me."},
    {"role": "user", "content": "Bye"},
]


@dataclasses.dataclass
class ReasoningDecision:
    """Reasoning and tool-call settings with their decision records."""

    reasoning: Reasoning
    tool_calls: ToolCalls
    reasoning_decision: Decision
    tool_decision: Decision
    warnings: list[str] = dataclasses.field(default_factory=list)


def _render(
    template: str, messages: list[dict[str, Any]], variables: dict[str, str], **kwargs: Any
) -> str | None:
    try:
        return render_chat(template, messages, variables=variables, deadline_s=2.0, **kwargs)
    except TemplateError:
        return None


def _switch_by_rendering(template: str, variables: dict[str, str]) -> tuple[str | None, str]:
    """The template variable that switches reasoning: the first candidate the template mentions whose
    value changes the rendered prompt (a mention alone proves nothing)."""
    for name in _SWITCHES:
        if not re.search(rf"\b{name}\b", template):
            continue
        on, off = (
            ("high", "low") if name == "reasoning_effort" else (True, False)
        )  # reasoning_effort takes a level, the others a boolean
        first = _render(template, _PROBE_USER, variables, add_generation_prompt=True, **{name: on})
        second = _render(template, _PROBE_USER, variables, add_generation_prompt=True, **{name: off})
        if first is not None and second is not None and first != second:
            return name, f"rendering with {name}={on!r} and {name}={off!r} gives different prompts"
    return None, "no variable the template reads changes the rendered prompt"


def _default_enabled(
    template: str, switch: str | None, start: str, variables: dict[str, str]
) -> tuple[bool | None, str]:
    """Render with the switch unset / on / off and see which the default matches."""
    try:
        unset = render_chat(template, _PROBE_USER, variables=variables)
        if switch is None:
            opens = unset.rstrip().endswith(start)
            return (
                (True, "the generation prompt opens the reasoning block")
                if opens
                else (None, "no switch in the template")
            )
        if switch == "reasoning_effort":
            return True, "reasoning_effort only sets how much it reasons"
        switched: dict[str, Any] = {switch: True}
        on = render_chat(template, _PROBE_USER, variables=variables, **switched)
        switched[switch] = False
        off = render_chat(template, _PROBE_USER, variables=variables, **switched)
    except TemplateError as exc:
        return None, f"could not render the probes ({exc})"
    if on == off:
        return None, f"{switch} does not change the rendered prompt"
    if unset == on:
        return True, f"the prompt without {switch} equals {switch}=true"
    if unset == off:
        return False, f"the prompt without {switch} equals {switch}=false"
    return None, f"the prompt without {switch} matches neither setting"


def _rendered_probes(template: str, variables: dict[str, str]) -> str:
    """Every probe rendering joined: markers a template writes (generation prompt, history) show here even
    when its source builds them from pieces."""
    out = []
    for messages in (_PROBE_USER, _PROBE_HISTORY):
        for kwargs in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            text = _render(template, messages, variables, add_generation_prompt=True, **kwargs)
            if text:
                out.append(text)
    return "\n".join(out)


def _find_markers(
    template: str, vocab: SpecialVocab, variables: dict[str, str]
) -> tuple[tuple[str, str] | None, list[Evidence]]:
    """The reasoning marker pair and where it was found: the template's text, the tokenizer's added tokens
    (special or not), or the template's rendered output."""
    rendered: str | None = None
    for start, end, probe, end_alone in _MARKERS:
        places: list[str] = []
        if probe in template:
            places.append("the chat template writes the start marker")
        elif end_alone and end in template:
            places.append(f"the chat template handles the end marker {end!r}")
        opener = probe.split("thought")[0]
        if vocab.contains_text(opener) and vocab.contains_text(end):
            places.append("the tokenizer has both as added tokens")
        if not places and template:
            rendered = _rendered_probes(template, variables) if rendered is None else rendered
            if probe in rendered or (end_alone and end in rendered):
                places.append("the rendered template writes them")
        if not places:
            continue
        evidence = [
            Evidence(
                source="chat template" if "template" in place else "tokenizer",
                detail=f"{place}: {start!r} … {end!r}",
            )
            for place in places
        ]
        special = [vocab.is_special(opener), vocab.is_special(end)]
        if all(flag is True for flag in special):
            how = "special tokens (also matched as text at runtime)"
        elif any(flag is True for flag in special):
            how = "partly special tokens; matched as text at runtime"
        else:
            state = (
                "added tokens, not special"
                if all(flag is False for flag in special)
                else "not special tokens"
            )
            how = f"{state}: plain text, matched as text at runtime with hold-back"
        evidence.append(
            Evidence(
                source="tokenizer",
                field="added tokens",
                detail=f"markers are {how}",
                value=how.split(";")[0].split(" (")[0],
            )
        )
        return (start, end), evidence
    return None, []


def _card_markers(card: str | None) -> tuple[str, str] | None:
    """A distinctive marker pair the model card writes (both ends), for a template that switches reasoning but
    names no marker: weak evidence, since a card may mention markers it does not emit."""
    if not card:
        return None
    for start, end, _, end_alone in _MARKERS:
        if end_alone and start in card and end in card:
            return start, end
    return None


def decide_reasoning(
    template: str | None,
    vocab: SpecialVocab,
    variables: dict[str, str],
    card: Callable[[], str | None] | None = None,
) -> ReasoningDecision:
    """Find the reasoning markers, switch and default, and the tool-call format.

    `card` reads the model card lazily; it is read only when the template has a switch and no stronger
    source names the markers.
    """
    text = template or ""
    evidence: list[Evidence] = []
    warnings: list[str] = []
    reasoning = Reasoning()
    markers, marker_evidence = _find_markers(text, vocab, variables)
    evidence.extend(marker_evidence)
    switch, switch_why = _switch_by_rendering(text, variables) if text else (None, "")
    from_card = _card_markers(card()) if markers is None and switch and card is not None else None
    if from_card:
        markers = from_card
        evidence.append(
            Evidence(
                source="README.md",
                detail=f"the model card writes {from_card[0]!r} … {from_card[1]!r}",
                strength="weak",
            )
        )
        warnings.append(
            f"the reasoning markers {from_card[0]} … {from_card[1]} come from the model card only (weak "
            "evidence: neither the template nor the tokenizer names them); check an answer before relying on it"
        )
    if markers:
        reasoning = Reasoning(supported=True, start=markers[0], end=markers[1])
    if reasoning.supported and text:
        reasoning.switch = switch
        if switch:
            evidence.append(Evidence(source="chat template", field=switch, detail=switch_why))
        default, why = _default_enabled(text, switch, reasoning.start or "", variables)
        reasoning.default_enabled = default
        evidence.append(Evidence(source="chat template", field="render probe", detail=why))
    elif switch:
        warnings.append(
            f"the chat template has a reasoning switch ({switch}: {switch_why}) but no reasoning markers were "
            "found in it, in the tokenizer, in its rendered prompts or in the model card: reasoning is not "
            "split from content"
        )
        evidence.append(
            Evidence(source="chat template", field=switch, detail=f"{switch_why}; no markers found")
        )
    if reasoning.supported:
        state = {True: "on", False: "off", None: "unknown"}[reasoning.default_enabled]
        value = f"{reasoning.start} … {reasoning.end}; default {state}; switch {reasoning.switch or 'none'}"
    else:
        value = "no reasoning markers"
    special_texts = vocab.known_texts()
    tools, tool_evidence = _tool_format(text, special_texts)
    tool_value = (
        f"{tools.format} ({tools.start} … {tools.end})" if tools.format else "no tool-call syntax found"
    )
    return ReasoningDecision(
        reasoning=reasoning,
        tool_calls=tools,
        reasoning_decision=Decision(value=value, evidence=evidence),
        tool_decision=Decision(value=tool_value, evidence=tool_evidence),
        warnings=warnings,
    )


def _tool_format(template: str, special_texts: set[str]) -> tuple[ToolCalls, list[Evidence]]:
    """The tool-call syntax, named after mlx-lm's parser for it where one exists."""
    rules: tuple[tuple[str, bool, str | None, str | None], ...] = (
        ("minimax_m2", "<minimax:tool_call>" in template, "<minimax:tool_call>", "</minimax:tool_call>"),
        ("gemma4", "<|tool_call>" in template and "<tool_call|>" in template, "<|tool_call>", "<tool_call|>"),
        (
            "function_gemma",
            "<start_function_call>" in template,
            "<start_function_call>",
            "<end_function_call>",
        ),
        ("glm47", "<arg_key>" in template, "<tool_call>", "</tool_call>"),
        (
            "pythonic",
            "<|tool_call_start|>" in template or "<|tool_list_start|>" in template,
            "<|tool_call_start|>",
            "<|tool_call_end|>",
        ),
        (
            "qwen3_coder",
            "<tool_call>\n<function=" in template or "<tool_call>\\n<function=" in template,
            "<tool_call>",
            "</tool_call>",
        ),
        (
            "kimi_k2",
            "<|tool_calls_section_begin|>" in template,
            "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>",
        ),
        ("mistral", "[TOOL_CALLS]" in template, "[TOOL_CALLS]", None),
        ("json_tools", "<tool_call>" in template and "tool_call" in template, "<tool_call>", "</tool_call>"),
        (
            "harmony",
            "<|call|>" in template or "to=functions." in template,
            "<|channel|>commentary",
            "<|call|>",
        ),
        (
            "llama3_json",
            "<|python_tag|>" in template or ("ipython" in template and "parameters" in template),
            None,
            None,
        ),
    )
    for name, hit, start, end in rules:
        if hit:
            return ToolCalls(format=name, start=start, end=end), [
                Evidence(source="chat template", detail=f"tool-call syntax {name} ({start or 'JSON object'})")
            ]
    if "<|tool_call_start|>" in special_texts and "<|tool_call_end|>" in special_texts:
        return ToolCalls(format="pythonic", start="<|tool_call_start|>", end="<|tool_call_end|>"), [
            Evidence(
                source="special tokens", detail="tool-call tokens <|tool_call_start|> … <|tool_call_end|>"
            )
        ]
    return ToolCalls(), []
