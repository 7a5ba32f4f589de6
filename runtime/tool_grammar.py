"""Tool calls the answer must make, as a grammar over the config's own tool-call syntax.

`tool_choice: "required"` (or a named function) and `parallel_tool_calls: false` are promises about the answer
that rendering the template cannot keep: a model free to choose may answer in prose, or call twice. Here the
pinned tool-call format becomes a Lark grammar (llguidance syntax, compiled and applied by backends.grammar)
that admits exactly the calls allowed: one of the offered functions, with arguments matching its parameters
schema, once or several times. No library writes these (llguidance's struct tags cover trigger-in-text, not
"the answer is calls"), so the few shapes the formats use are written here.

Formats with a grammar: `json_tools` and the other `<start>{"name": …, "arguments": …}<end>` formats,
`llama3_json` (a bare JSON object with `parameters`), `mistral` (`[TOOL_CALLS]` then a JSON list, or
`name[ARGS]{…}` where the template says so). Others are refused by name rather than left unenforced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gallery.config import ToolCalls
from gallery.errors import RequestError

# Formats whose calls are `<start>` + {"name": …, "arguments": {…}} + `<end>`, one per marker pair.
_MARKED_JSON = frozenset({"json_tools", "hermes", "qwen"})
# The separators the templates of these formats show the model (Qwen's: `{"name": <function-name>, …}`).
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def strict_schema(schema: Mapping[str, Any], where: str) -> dict[str, Any]:
    """OpenAI's strict semantics on a JSON schema: objects admit no keys beyond their properties. One that asks for
    extra keys (`additionalProperties` other than false) is refused by name."""

    def strict(node: Any) -> Any:
        if isinstance(node, list):
            return [strict(item) for item in node]
        if not isinstance(node, Mapping):
            return node
        if node.get("additionalProperties") not in (None, False) and (
            node.get("type") == "object" or "properties" in node
        ):
            raise RequestError(
                f"{where}: strict mode needs additionalProperties false (or absent) on every object",
                field=where.split(".")[0],
            )
        out = {key: strict(value) for key, value in node.items()}
        is_object = out.get("type") == "object" or (
            isinstance(out.get("type"), list) and "object" in out["type"]
        )
        if (is_object or "properties" in out) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out

    return dict(strict(dict(schema)))


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    function = tool.get("function", tool)
    return function if isinstance(function, Mapping) else {}


def _parameters(tool: Mapping[str, Any], index: int) -> dict[str, Any]:
    function = _function(tool)
    parameters = function.get("parameters")
    if parameters is None:
        return {"type": "object"}
    if not isinstance(parameters, Mapping):
        raise RequestError(f"tools[{index}].function.parameters must be a JSON schema object", field="tools")
    if function.get("strict") is True:
        return strict_schema(parameters, f"tools[{index}].function.parameters")
    return dict(parameters)


def _call_schema(tools: Sequence[Mapping[str, Any]], arguments_key: str) -> dict[str, Any]:
    """One call of any offered tool: {"name": <its name>, "<arguments_key>": <its parameters>}, in that order."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": _function(tool).get("name")},
                arguments_key: _parameters(tool, index),
            },
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for index, tool in enumerate(tools)
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": _JSON_STYLE}


def _calls(call: str, separator: str, single: bool) -> str:
    return f"calls: {call}\n" if single else f"calls: {call} ({separator} {call})*\n"


def tool_call_grammar(
    tool_calls: ToolCalls,
    tools: Sequence[Mapping[str, Any]],
    *,
    required: bool,
    single: bool,
    template: str,
    marker: Callable[[str], str],
) -> str:
    """The Lark grammar (llguidance dialect) whose sentences are the allowed answers in this format.

    required: the answer is calls and nothing else; otherwise it is calls or prose (prose that cannot start a
    call). single: at most one call. `marker` turns a marker string into its Lark form (a special token by id,
    or a quoted string). Raises RequestError naming tool_choice when the format has no grammar here.
    """
    fmt = tool_calls.format
    if not tools:
        raise RequestError("tool_choice requires a call but the request offers no tools", field="tool_choice")
    # Prose is any text; where a call is a bare JSON object, prose must not start like one.
    prose = "PROSE: /(.|\\n)*/\n"
    if fmt in _MARKED_JSON or (fmt and tool_calls.start and tool_calls.end and fmt.endswith("json")):
        assert tool_calls.start and tool_calls.end
        schema = json.dumps(_call_schema(tools, "arguments"))
        call = f'{marker(tool_calls.start)} "\\n" %json {schema} "\\n" {marker(tool_calls.end)}'
        rules = _calls("call", '"\\n"', single) + f"call: {call}\n"
    elif fmt == "llama3_json":
        schema = json.dumps(_call_schema(tools, "parameters"))
        rules = _calls("call", '"; "', single) + f"call: %json {schema}\n"
        prose = "PROSE: /([^{ \\t\\n](.|\\n)*)?/\n"
    elif fmt == "mistral":
        start = marker(tool_calls.start or "[TOOL_CALLS]")
        if "[ARGS]" in template:
            options = [
                f"({json.dumps(_function(tool).get('name'))} {marker('[ARGS]')} %json {json.dumps(_parameters(tool, i))})"
                for i, tool in enumerate(tools)
            ]
            rules = f"calls: {start} call{'' if single else ' call*'}\ncall: {' | '.join(options)}\n"
        else:
            item = json.dumps(_call_schema(tools, "arguments"))
            items = f"%json {item}" if single else f'%json {item} (", " %json {item})*'
            rules = f'calls: {start} "[" {items} "]"\n'
    else:
        raise RequestError(
            f"tool_choice: a required call cannot be enforced for the {fmt or 'unknown'} tool-call format "
            '(enforced formats: json_tools, llama3_json, mistral); use tool_choice "auto"',
            field="tool_choice",
        )
    if required:
        return "start: calls\n" + rules
    return "start: calls | PROSE\n" + rules + prose


def needs_grammar_for_single_call(tool_calls: ToolCalls) -> bool:
    """Whether `parallel_tool_calls: false` needs the grammar: formats whose calls have no end marker to stop at
    (with an end marker, the engine ends the answer after the first call instead)."""
    return not tool_calls.end
