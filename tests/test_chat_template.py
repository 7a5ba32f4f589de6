"""The sandboxed renderer: byte-identical to transformers on every fixture template, and contained."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gallery.chat_template import (
    PROBE_IMAGE,
    PROBE_TEXT,
    PROBE_TEXT_NO_SYSTEM,
    SPECIAL_TOKEN_NAMES,
    TemplateError,
    render_chat,
)

HUB = Path(__file__).resolve().parent.parent / "fixtures" / "hub"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": "sunny", "name": "get_weather"},
]


def _fixture_templates() -> list[tuple[str, str, dict[str, str]]]:
    found = []
    for repo in sorted(p for p in HUB.glob("*/*") if p.is_dir() and p.parent.name != "broken"):
        config = {}
        if (repo / "tokenizer_config.json").is_file():
            config = json.loads((repo / "tokenizer_config.json").read_text())
        variables = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                variables[name] = value
        homes = []
        if isinstance(config.get("chat_template"), str):
            homes.append(("tokenizer_config", config["chat_template"]))
        if (repo / "chat_template.jinja").is_file():
            homes.append(("jinja", (repo / "chat_template.jinja").read_text()))
        if (repo / "chat_template.json").is_file():
            homes.append(("json", json.loads((repo / "chat_template.json").read_text())["chat_template"]))
        for home, text in homes:
            found.append((f"{repo.parent.name}/{repo.name}:{home}", text, variables))
    return found


TEMPLATES = _fixture_templates()


@pytest.mark.parametrize(("label", "template", "variables"), TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_renders_exactly_like_transformers(label: str, template: str, variables: dict[str, str]) -> None:
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    cases = [
        (PROBE_TEXT, {}, None),
        (PROBE_TEXT_NO_SYSTEM, {}, None),
        (PROBE_TEXT_NO_SYSTEM, {"enable_thinking": False}, None),
        (PROBE_TEXT_NO_SYSTEM, {"enable_thinking": True}, None),
        (PROBE_IMAGE, {}, None),
        (TOOL_CHAT, {}, TOOLS),
    ]
    compared = 0
    for messages, kwargs, tools in cases:
        for generation_prompt in (True, False):
            try:
                ours = render_chat(
                    template,
                    messages,
                    add_generation_prompt=generation_prompt,
                    tools=tools,
                    variables=variables,
                    **kwargs,
                )
            except TemplateError:
                ours = None
            # apply_chat_template drops None-valued keys before rendering; do the same for the comparison
            cleaned = [{k: v for k, v in m.items() if v is not None} for m in messages]
            try:
                theirs = chat_utils.render_jinja_template(
                    [cleaned],
                    tools=tools,
                    chat_template=template,
                    add_generation_prompt=generation_prompt,
                    **variables,
                    **kwargs,
                )[0][0]
            except Exception:
                theirs = None
            assert ours == theirs, f"{label}: {messages[0]} {kwargs}"
            compared += ours is not None
    assert compared >= 4  # most probes render for every real template


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ cycler.__init__.__globals__ }}", "unsafe"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "iterations"),
        ("{{ range(10**7) | list | length }}", "too big"),
        ("{{ 'x' * 100000000 }}", "size limit"),
        ("{{ 'a' | center(1000000000) }}", "width"),
        ("{{ '%01000000000d' | format(1) }}", "width"),
        ("{{ '{:>9999999999}'.format(1) }}", "width"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed"),
        (
            "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
            "iterations|too long",
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "larger",
        ),
        ("{{ raise_exception('System message must be at the beginning') }}", "System message"),
        ("{% if %}", "syntax error"),
    ],
)
def test_malicious_templates_fail_fast_and_cleanly(template: str, why: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError, match=why) as info:
        render_chat(template, PROBE_TEXT, deadline_s=3.0)
    assert time.monotonic() - started < 10
    assert "\n" not in str(info.value)


def test_oversized_template_is_refused() -> None:
    with pytest.raises(TemplateError, match="over the"):
        render_chat("x" * (300 * 1024), PROBE_TEXT)


def test_inputs_are_plain_data_and_not_mutated() -> None:
    class Rich:
        def save(self, path: str) -> None:  # a dangerous method a template must never reach
            raise AssertionError("called")

    messages = [
        {"role": "user", "content": [{"type": "image", "image": Rich()}, {"type": "text", "text": "hi"}]}
    ]
    out = render_chat("{% for m in messages %}{{ m.content[0].image }}{% endfor %}", messages)
    assert out == "<Rich>"
    assert isinstance(messages[0]["content"][0]["image"], Rich)


def test_special_tokens_and_kwargs_reach_the_template() -> None:
    out = render_chat(
        "{{ bos_token }}{{ enable_thinking }}{{ strftime_now('%Y') | length }}",
        [],
        variables={"bos_token": "<s>"},
        enable_thinking=False,
    )
    assert out == "<s>False4"
