"""Agent conversations render as transformers renders them, on every template this project ships or tests.

Conversations are generated the way agent frameworks send them (OpenAI shape: `content: null` on the turn that
calls, `arguments` as a JSON string, results with `tool_call_id`, parallel calls, several results, reasoning sent
back or not) and go through the runtime's whole prompt path (runtime.prompt: normalize, then render in the
sandbox). The reference is transformers' own renderer given what vLLM hands it (arguments as a mapping, the
result's function name); where transformers cannot render the conversation (templates that call string methods
on a missing content), the runtime must still answer, with vLLM's empty-string content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallery.chat_template import TemplateError, render_chat
from gallery.configfile import read_config
from runtime.messages import normalize_messages
from tests.test_chat_template import TEMPLATES as HUB_TEMPLATES
from tests.test_http_openai_shapes import CALL_TURN

ROOT = Path(__file__).resolve().parents[1]
CITIES = ["Paris", "Oslo", "Lima"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for name in ("get_weather", "get_time")
]


def _catalog_templates() -> list[tuple[str, str, dict[str, str]]]:
    found = []
    for path in sorted((ROOT / "catalog" / "entries").glob("*.yaml")):
        template = read_config(path).mlx.chat_template
        if template.text:
            found.append((f"catalog/{path.stem}", template.text, dict(template.variables)))
    return found


def _fixture_model_templates() -> list[tuple[str, str, dict[str, str]]]:
    from fixtures.build_models import QWEN2VL_TEXT_TEMPLATE, QWEN3_CHAT_TEMPLATE, TEXT_THINK_CHAT_TEMPLATE

    return [
        ("fixtures/qwen3", QWEN3_CHAT_TEMPLATE, {}),
        ("fixtures/qwen2vl-text", QWEN2VL_TEXT_TEMPLATE, {}),
        ("fixtures/textthink", TEXT_THINK_CHAT_TEMPLATE, {}),
    ]


TEMPLATES = [*HUB_TEMPLATES, *_catalog_templates(), *_fixture_model_templates()]


@st.composite
def agent_conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """user → (assistant calls → results)+ → assistant answer, as clients send it."""
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": "You are terse."})
    messages.append({"role": "user", "content": "What is the weather?"})
    for round_index in range(draw(st.integers(1, 2))):
        calls = [
            {
                "id": f"call_{round_index}_{i}",
                "type": "function",
                "function": {
                    "name": draw(st.sampled_from(["get_weather", "get_time"])),
                    "arguments": json.dumps({"city": draw(st.sampled_from(CITIES))}),
                },
            }
            for i in range(draw(st.integers(1, 3)))
        ]
        turn: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
        if draw(st.booleans()):
            turn["reasoning_content"] = "I should call a tool."
        messages.append(turn)
        for call in calls:
            result = draw(st.sampled_from(["18C", "sunny", '{"temp": 18}']))
            content: Any = result if draw(st.booleans()) else [{"type": "text", "text": result}]
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
    if draw(st.booleans()):
        messages.append({"role": "assistant", "content": "It is 18C and sunny."})
        messages.append({"role": "user", "content": "Thanks!"})
    return messages


def _as_vllm_passes(messages: list[dict[str, Any]], empty_content: bool) -> list[dict[str, Any]]:
    """The conversation as vLLM hands it to transformers' renderer (what the template author tested)."""
    names = {}
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call["function"], arguments=json.loads(call["function"]["arguments"]))
                names[call["id"]] = function["name"]
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        if message["role"] == "tool":
            message["name"] = names[message["tool_call_id"]]
        if isinstance(message.get("content"), list):
            message["content"] = "\n".join(part["text"] for part in message["content"])
        if message.get("content") is None:
            if empty_content:
                message["content"] = ""
            else:
                del message["content"]
        out.append(message)
    return out


def _transformers(template: str, messages: list[dict[str, Any]], variables: dict[str, str]) -> str | None:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        return render_jinja_template(
            [messages], tools=TOOLS, chat_template=template, add_generation_prompt=True, **variables
        )[0][0]
    except Exception:
        return None


def _ours(template: str, messages: list[dict[str, Any]], variables: dict[str, str]) -> str | None:
    from runtime.prompt import _render

    chat = normalize_messages(
        messages, supports_developer="'developer'" in template or '"developer"' in template
    )
    try:
        return _render(template, chat, tools=TOOLS, variables=variables, kwargs={})
    except Exception:
        return None


@pytest.mark.parametrize(("label", "template", "variables"), TEMPLATES, ids=[t[0] for t in TEMPLATES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=agent_conversations())
def test_agent_conversations_render_like_transformers(
    label: str, template: str, variables: dict[str, str], conversation: list[dict[str, Any]]
) -> None:
    pytest.importorskip("transformers")
    ours = _ours(template, conversation, variables)
    theirs = _transformers(template, _as_vllm_passes(conversation, empty_content=False), variables)
    if theirs is not None:
        assert ours == theirs, label
        return
    # transformers cannot render it (a template that calls a method on a missing content): vLLM's way.
    vllm = _transformers(template, _as_vllm_passes(conversation, empty_content=True), variables)
    assert ours == vllm, label


def test_the_issue_conversation_renders_on_every_template() -> None:
    """The curl from the bug report: the second turn of a tool loop, on every template that can render it."""
    conversation = CALL_TURN
    rendered = 0
    for label, template, variables in TEMPLATES:
        vllm = _transformers(template, _as_vllm_passes(conversation, empty_content=True), variables)
        if vllm is None:
            continue  # the template refuses tool turns outright (e.g. a system-role assertion)
        theirs = _transformers(template, _as_vllm_passes(conversation, empty_content=False), variables)
        assert _ours(template, conversation, variables) == (theirs if theirs is not None else vllm), label
        rendered += 1
    assert rendered >= len(TEMPLATES) // 2


def test_tool_messages_get_their_call_name_and_arguments_become_a_mapping() -> None:
    chat = normalize_messages(
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                    {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "one"}]},
            {"role": "tool", "tool_call_id": "b", "content": "two"},
            {"role": "developer", "content": "be brief"},
        ]
    )
    assistant = chat.messages[2]
    assert chat.messages[0] == {"role": "system", "content": "be brief"}
    assert assistant["content"] is None
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert assistant["tool_calls"][1]["function"]["arguments"] == "not json"  # a broken call stays as sent
    assert chat.messages[3] == {"role": "tool", "tool_call_id": "a", "content": "one", "name": "f"}
    assert chat.messages[4]["name"] == "g"
    kept = normalize_messages(
        [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}], supports_developer=True
    )
    assert kept.messages[0]["role"] == "developer"


def test_a_template_error_is_still_a_request_error() -> None:
    from gallery.errors import RequestError
    from runtime.prompt import _render

    chat = normalize_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(RequestError, match="rejected this conversation"):
        _render("{{ raise_exception('no') }}", chat, tools=None, variables={}, kwargs={})
    with pytest.raises(TemplateError):
        render_chat("{{ raise_exception('no') }}", chat.messages)
