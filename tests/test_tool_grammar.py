"""The grammars that enforce tool_choice "required" and parallel_tool_calls false, per tool-call format.

Each grammar is compiled by llguidance against a real tokenizer (a fixture model's) and fed the token ids of
answers: a well-formed call in the format's syntax is accepted, prose is accepted only where a call is not
required, a second call only where parallel calls are allowed, and a call of a tool not offered never.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gallery.config import ToolCalls
from gallery.errors import RequestError
from runtime.tool_grammar import tool_call_grammar

pytestmark = pytest.mark.mlx
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"enum": ["C", "F"]}},
                "required": ["unit"],
                "additionalProperties": False,
            },
        },
    }
]


@pytest.fixture(scope="module")
def tokenizer(scripted_tool_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(scripted_tool_model))


def _accepts(
    tokenizer: Any, fmt: ToolCalls, text: str, *, required: bool, single: bool, template: str = ""
) -> bool:
    from llguidance import LLMatcher

    from backends.grammar import compile_grammar, llg_tokenizer, marker_lark

    lark = tool_call_grammar(
        fmt,
        TOOLS,
        required=required,
        single=single,
        template=template,
        marker=lambda marker: marker_lark(marker, tokenizer),
    )
    grammar = compile_grammar("lark", lark, llg_tokenizer(tokenizer))
    matcher = LLMatcher(llg_tokenizer(tokenizer), grammar)
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.consume_token(token):
            return False
    return matcher.is_accepting()


CALL = {"name": "get_weather", "arguments": {"unit": "C"}}


@pytest.mark.parametrize(
    ("fmt", "one", "two", "template"),
    [
        (
            ToolCalls(format="json_tools", start="<tool_call>", end="</tool_call>"),
            f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>",
            f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>\n<tool_call>\n{json.dumps(CALL)}\n</tool_call>",
            "",
        ),
        (
            ToolCalls(format="llama3_json"),
            json.dumps({"name": "get_weather", "parameters": {"unit": "C"}}),
            json.dumps({"name": "get_weather", "parameters": {"unit": "C"}})
            + "; "
            + json.dumps({"name": "get_weather", "parameters": {"unit": "F"}}),
            "",
        ),
        (
            ToolCalls(format="mistral", start="[TOOL_CALLS]"),
            f"[TOOL_CALLS][{json.dumps(CALL)}]",
            f"[TOOL_CALLS][{json.dumps(CALL)}, {json.dumps(CALL)}]",
            "",
        ),
        (
            ToolCalls(format="mistral", start="[TOOL_CALLS]"),
            '[TOOL_CALLS]get_weather[ARGS]{"unit": "C"}',
            '[TOOL_CALLS]get_weather[ARGS]{"unit": "C"}get_weather[ARGS]{"unit": "F"}',
            "{{ '[ARGS]' }}",
        ),
    ],
    ids=["json_tools", "llama3_json", "mistral-list", "mistral-args"],
)
def test_each_format_admits_exactly_the_allowed_calls(
    tokenizer: Any, fmt: ToolCalls, one: str, two: str, template: str
) -> None:
    assert _accepts(tokenizer, fmt, one, required=True, single=True, template=template)
    assert _accepts(tokenizer, fmt, two, required=True, single=False, template=template)
    assert not _accepts(
        tokenizer, fmt, two, required=True, single=True, template=template
    )  # one call at most
    assert not _accepts(
        tokenizer, fmt, "The weather is fine.", required=True, single=False, template=template
    )
    assert not _accepts(
        tokenizer, fmt, one.replace("get_weather", "get_time"), required=True, single=True, template=template
    )
    if not fmt.end:  # prose is allowed when a call is not required (parallel_tool_calls false, auto)
        assert _accepts(
            tokenizer, fmt, "The weather is fine.", required=False, single=True, template=template
        )


def test_formats_without_a_grammar_refuse_a_required_call_by_name() -> None:
    with pytest.raises(RequestError, match="cannot be enforced for the harmony") as caught:
        tool_call_grammar(
            ToolCalls(format="harmony", start="<|channel|>commentary", end="<|call|>"),
            TOOLS,
            required=True,
            single=True,
            template="",
            marker=json.dumps,
        )
    assert caught.value.field == "tool_choice"
