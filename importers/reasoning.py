"""Read reasoning and tool-call conventions off the pinned template and the special-token vocabulary.

Reasoning: the markers (`<think>`…`</think>`, Gemma 4 `<|channel>thought`…`<channel|>`, Mistral
`[THINK]`…`[/THINK]`, harmony channels), the template variable that switches it, and whether it is
on when not told — found by rendering the template with the switch unset, on and off and comparing.
Tool calls: the syntax, named like mlx-lm's tool parsers where one fits.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from gallery.chat_template import TemplateError, render_chat
from gallery.config import Decision, Evidence, Reasoning, ToolCalls

# (start, end) marker pairs, checked in this order; the first whose start appears wins.
_MARKERS: tuple[tuple[str, str, str], ...] = (
    ("<think>", "</think>", "<think>"),
    ("<|channel>thought", "<channel|>", "<|channel>"),
    ("[THINK]", "[/THINK]", "[THINK]"),
    ("<longcat_think>", "</longcat_think>", "<longcat_think>"),
    ("<|think:start|>", "<|think:end|>", "<|think:start|>"),
    ("<|channel|>analysis<|message|>", "<|end|>", "<|channel|>analysis"),
)
_SWITCHES = ("enable_thinking", "reasoning_effort", "enable_reasoning", "thinking")
_PROBE_USER = [{"role": "user", "content": "Hello"}]


@dataclasses.dataclass
class ReasoningDecision:
    """Reasoning and tool-call settings with their decision records."""

    reasoning: Reasoning
    tool_calls: ToolCalls
    reasoning_decision: Decision
    tool_decision: Decision


def _switch_in(template: str) -> str | None:
    for name in _SWITCHES:
        if name == "thinking":
            if re.search(r"\{%-?\s*if\s+(not\s+)?thinking\b", template):
                return name
        elif re.search(rf"\b{name}\b", template):
            return name
    return None


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


def decide_reasoning(
    template: str | None, special_texts: set[str], variables: dict[str, str]
) -> ReasoningDecision:
    """Find the reasoning markers, switch and default, and the tool-call format."""
    text = template or ""
    evidence: list[Evidence] = []
    reasoning = Reasoning()
    for start, end, probe in _MARKERS:
        in_template = probe in text
        in_vocab = probe.split("thought")[0] in special_texts and end in special_texts
        if in_template or in_vocab:
            reasoning = Reasoning(supported=True, start=start, end=end)
            where = "chat template" if in_template else "special tokens"
            evidence.append(Evidence(source=where, detail=f"reasoning markers {start!r} … {end!r}"))
            break
    if reasoning.supported and text:
        switch = _switch_in(text)
        reasoning.switch = switch
        if switch:
            evidence.append(Evidence(source="chat template", field=switch, detail=f"template reads {switch}"))
        default, why = _default_enabled(text, switch, reasoning.start or "", variables)
        reasoning.default_enabled = default
        evidence.append(Evidence(source="chat template", field="render probe", detail=why))
    if reasoning.supported:
        state = {True: "on", False: "off", None: "unknown"}[reasoning.default_enabled]
        value = f"{reasoning.start} … {reasoning.end}; default {state}; switch {reasoning.switch or 'none'}"
    else:
        value = "no reasoning markers"
    tools, tool_evidence = _tool_format(text, special_texts)
    tool_value = (
        f"{tools.format} ({tools.start} … {tools.end})" if tools.format else "no tool-call syntax found"
    )
    return ReasoningDecision(
        reasoning=reasoning,
        tool_calls=tools,
        reasoning_decision=Decision(value=value, evidence=evidence),
        tool_decision=Decision(value=tool_value, evidence=tool_evidence),
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
