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


# ----- issue #11 item 3: size bombs, at compile time (Jinja's constant folding) and at render time -----
HUGE = 999_999_999


@pytest.mark.parametrize(
    ("template", "why"),
    [
        # printf-style `%`, as an operator and as the `format` filter: width, precision, `*`, many fields
        (f"{{{{ '%{HUGE}s' % 'a' }}}}", "format width too large"),
        (f"{{{{ '%.{HUGE}d' % 1 }}}}", "format width too large"),
        (f"{{{{ '%*s' % ({HUGE}, 'a') }}}}", "format width too large"),
        ("{{ '" + "%99999s" * 400 + "' % (('a',) * 400) }}", "'%' formatting would build a value larger"),
        (f"{{{{ '%.{HUGE}f' | format(1.0) }}}}", "format width too large"),
        (f"{{{{ '%(a){HUGE}s' % {{'a': 1}} }}}}", "format width too large"),
        (f"{{{{ '%{HUGE}s'.encode() % ('a'.encode(),) }}}}", "format width too large"),
        # str.format / format_map: widths, precisions and nested widths resolved at format time
        (f"{{{{ '{{:>{HUGE}}}'.format('a') }}}}", "format width too large"),
        (f"{{{{ '{{:{{}}}}'.format('a', {HUGE}) }}}}", "format width too large"),
        (f"{{{{ '{{:.{HUGE}f}}'.format(1.0) }}}}", "format width too large"),
        (f"{{{{ '{{a:>{HUGE}}}'.format_map({{'a': 1}}) }}}}", "format width too large"),
        # repetition, concatenation, numbers
        ("{{ 'a' * 10**9 }}", "'[*]' would build a value larger"),
        ("{{ [0] * 10**9 }}", "'[*]' would build a value larger"),
        ("{% set a = 'x' * 30000000 %}{{ (a ~ a ~ a ~ a) | length }}", "'~' would build a value larger"),
        (
            "{% set ns = namespace(x=10) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
            "number larger than",
        ),
        # padding, indenting, wrapping, joining, replacing: filters and str methods
        (f"{{{{ 'a' | center({HUGE}) }}}}", "filter center width too large"),
        ("{{ ('" + "\\n" * 20000 + "') | indent(99999, true, true) }}", "filter indent would build"),
        ("{{ ('" + "\\n" * 20000 + "') | indent('" + "x" * 50000 + "', true, true) }}", "filter indent"),
        ("{{ ('" + "a " * 50000 + "') | wordwrap(1, true, '" + "x" * 50000 + "') }}", "filter wordwrap"),
        ("{{ range(100000) | join('" + "x" * 50000 + "') }}", "filter join would build"),
        ("{{ ('a' * 100000) | replace('a', '" + "b" * 50000 + "') }}", "filter replace would build"),
        (f"{{{{ [1] | batch({HUGE}, 'x') | list }}}}", "filter batch width too large"),
        (f"{{{{ [1] | slice({HUGE}) | list | length }}}}", "filter slice width too large"),
        ("{{ ([[[[[[1]]]]]] * 1000) | tojson(indent=99999) }}", "filter tojson would build"),
        ("{{ ([[1]] * 100000) | sum(start=[]) | length }}", "filter sum"),
        (f"{{{{ 'a'.ljust({HUGE}) }}}}", "str.ljust width too large"),
        (f"{{{{ 'a'.encode().center({HUGE}) }}}}", "str.center width too large"),
        ("{{ ('" + "\\t" * 50000 + "').expandtabs(99999) }}", "str.expandtabs would build"),
        ("{{ ('a' * 100000).replace('a', '" + "b" * 50000 + "') }}", "str.replace would build"),
        ("{{ '" + "x" * 50000 + "'.join(range(100000) | map('string')) }}", "str.join would build"),
        ("{{ ('a' * 100000).translate({97: '" + "b" * 50000 + "'}) }}", "str.translate would build"),
        (f"{{{{ lipsum({HUGE}) }}}}", "lipsum width too large"),
        # blocks: a macro's, caller's or {% set %} block's output is joined under the same cap
        (
            "{% set a = 'x' * 30000000 %}{% macro m() %}{{ a }}{{ a }}{% endmacro %}{% set r = m() %}",
            "block larger than the size limit",
        ),
        # loops over long strings tick the budget like range() does
        ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "iterations"),
        # Python's own compiler limits are a template error, not a crash
        ("{{ " + "(" * 300 + "1" + ")" * 300 + " }}", "does not compile"),
    ],
)
def test_size_bombs_are_refused_before_they_build(template: str, why: str) -> None:
    with pytest.raises(TemplateError, match=why) as info:
        render_chat(template, PROBE_TEXT)
    assert "\n" not in str(info.value)


def _largest_constant(code: object) -> int:
    """The longest string constant anywhere in a compiled template's code (folded values end up there)."""
    consts = getattr(code, "co_consts", ())
    sizes = [len(c) for c in consts if isinstance(c, (str, bytes))]
    sizes += [_largest_constant(c) for c in consts if hasattr(c, "co_consts")]
    return max(sizes, default=0)


@pytest.mark.parametrize(
    "bomb",
    [
        "'%5000000s' % 'a'",
        "'%.5000000d' % 1",
        "'%5000000s' | format('a')",
        "'a' * 5000000",
        "'a' | center(99999)",
        "'x\\ny\\n' | indent(99999, true, true)",
        "('ab' ~ 'cd') | wordwrap(1, true, '" + "w" * 40000 + "')",
        "['" + "j" * 1000 + "'] | batch(99999, 'padding') | list",
    ],
)
def test_constant_folding_cannot_build_a_bomb_at_compile_time(bomb: str) -> None:
    """Jinja evaluates constant expressions while compiling, even inside `{% if false %}` (the issue's 26 s and
    3.9 GB at import, validate and load): nothing larger than MAX_FOLDED_CHARS may be folded into the code."""
    from gallery.chat_template import MAX_FOLDED_CHARS, compile_template

    template = "{% if false %}{{ " + bomb + " }}{% endif %}ok"
    compiled = compile_template(template)
    assert _largest_constant(compiled.root_render_func.__code__) <= MAX_FOLDED_CHARS
    assert render_chat(template, PROBE_TEXT) == "ok"  # the dead branch never runs


def test_budget_keeps_real_template_features_working() -> None:
    """The guards change no answer: loops with loop.*, `~`, `%` and str.format with widths, padding, tojson with
    indent, join, macros and blocks render exactly as transformers renders them."""
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    template = (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ '|' if not loop.last }}"
        "{{ m.role ~ ':' ~ m.content[:5] }}{% endfor %}"
        "{{ '%-6s|%5.2f|%*d' % ('ab', 3.14159, 4, 7) }}{{ '{:>4}{:{}}'.format(7, 'z', 3) }}"
        "{{ 'x' | center(5) }}{{ 'a\\nb' | indent(2, true) }}{{ 'a b c' | wordwrap(2) }}"
        "{{ {'a': [1, 2]} | tojson(indent=2) }}{{ ['a', 'b'] | join(', ') }}{{ [[1], [2]] | sum(start=[]) }}"
        "{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m('y') }}{{ '%(k)s' % {'k': 'v'} }}"
        "{% set block %}{% for c in 'abc' %}{{ c | upper }}{% endfor %}{% endset %}{{ block }}"
        "{{ 'a-b'.replace('-', '+') }}{{ '+'.join(['p', 'q']) }}{{ 2 ** 10 }}{{ 'ab' * 3 }}"
    )
    ours = render_chat(template, PROBE_TEXT)
    theirs = chat_utils.render_jinja_template([PROBE_TEXT], chat_template=template)[0][0]
    assert ours == theirs
    assert "4/4user:And o" in ours and "ABC" in ours
