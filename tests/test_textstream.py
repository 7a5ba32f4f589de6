"""The streaming text pipeline and request normalization, without MLX: any chunking gives the same answer."""

from __future__ import annotations

import base64
import io
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import tool_parser
from gallery.errors import RequestError
from runtime.media import MediaError, MediaPolicy, decode_media
from runtime.messages import MediaItem, normalize_messages
from runtime.textstream import ReasoningSplitter, StopStringMatcher, ToolCallExtractor


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab<|>/ ", max_size=40),
    st.lists(st.integers(0, 60), max_size=10),
    st.lists(st.text(alphabet="ab<|>", min_size=1, max_size=4), max_size=3),
)
def test_stop_strings_cut_at_the_first_match_whatever_the_chunking(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    matcher = StopStringMatcher(stops)
    sent = []
    for chunk in _chunks(text, cuts):
        sent.append(matcher.feed(chunk))
        if matcher.stopped:
            break
    sent.append(matcher.flush())
    out = "".join(sent)
    hits = [text.find(s) for s in stops if s and s in text]
    expected = text[: min(hits)] if hits else text
    assert out == expected
    if hits:  # nothing of the stop string itself was ever sent
        assert matcher.stopped


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="xy ", max_size=15),
    st.text(alphabet="xy ", max_size=15),
    st.text(alphabet="xy ", max_size=15),
    st.lists(st.integers(0, 80), max_size=12),
    st.booleans(),
)
def test_reasoning_split_is_independent_of_chunking(
    before: str, thought: str, after: str, cuts: list[int], thinking: bool
) -> None:
    text = f"{before}<think>{thought}</think>{after}"
    splitter = ReasoningSplitter("<think>", "</think>", thinking=thinking)
    pieces = []
    for chunk in _chunks(text, cuts):
        pieces += splitter.feed(chunk)
    pieces += splitter.flush()
    content = "".join(p.text for p in pieces if p.kind == "content")
    reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
    assert "<think>" not in content and "</think>" not in content and "<" not in content
    assert content == before + after.lstrip()
    assert reasoning == (thought.lstrip() if thinking else "")


def test_reasoning_opened_by_the_prompt() -> None:
    splitter = ReasoningSplitter("<think>", "</think>", thinking=True, starts_inside=True)
    pieces = splitter.feed("\nplan</think>\n\nanswer") + splitter.flush()
    assert [(p.kind, p.text) for p in pieces] == [("reasoning", "plan"), ("content", "answer")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 120), max_size=12))
def test_tool_calls_are_extracted_whatever_the_chunking(cuts: list[int]) -> None:
    text = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    extractor = ToolCallExtractor(
        "json_tools", "<tool_call>", "</tool_call>", tools=[], library=tool_parser("json_tools")
    )
    content, calls = "", []
    for chunk in _chunks(text, cuts):
        out, new = extractor.feed(chunk)
        content += out
        calls += new
    out, new = extractor.flush()
    content += out
    calls += new
    assert content == "Sure. "
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]


def test_malformed_tool_call_is_kept_as_text() -> None:
    extractor = ToolCallExtractor(
        "json_tools", "<tool_call>", "</tool_call>", tools=[], library=tool_parser("json_tools")
    )
    out, calls = extractor.feed("<tool_call>{not json</tool_call> ok")
    tail, more = extractor.flush()
    assert calls == [] and more == [] and "{not json" in out + tail


def test_llama3_style_calls_without_markers() -> None:
    extractor = ToolCallExtractor("llama3_json", None, None, tools=[])
    out, _ = extractor.feed('{"name": "f", "parameters": {"x": 1}}')
    tail, calls = extractor.flush()
    assert out + tail == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"x": 1}')]


def test_normalization_accepts_every_media_shape_and_attribute_objects() -> None:
    from types import SimpleNamespace

    messages = [
        SimpleNamespace(
            role="user",
            content=[
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                {"type": "input_image", "image_url": "data:image/png;base64,BBB"},
                SimpleNamespace(type="image", image="/tmp/x.png"),
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "video_url", "video_url": {"url": "file:///tmp/v.mp4"}},
                {"type": "input_text", "text": "describe"},
            ],
        ),
    ]
    chat = normalize_messages(messages)
    assert [m.kind for m in chat.media] == ["image", "image", "image", "audio", "video"]
    assert chat.media[3].format == "wav"
    assert [p["type"] for p in chat.messages[0]["content"]] == [
        "image",
        "image",
        "image",
        "audio",
        "video",
        "text",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "hi",
        {"role": "user"},
        [],
        [{"content": "x"}],
        [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": [{"type": "hologram"}]}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
    ],
)
def test_broken_messages_are_request_errors(bad: object) -> None:
    with pytest.raises(RequestError):
        normalize_messages(bad)


def test_system_folded_when_the_template_rejects_it() -> None:
    chat = normalize_messages(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], supports_system=False
    )
    assert chat.messages == [{"role": "user", "content": "S\n\nU"}]


def _png_b64() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_media_decoding_limits_and_errors(tmp_path) -> None:
    good = _png_b64()
    decoded = decode_media([MediaItem("image", good), MediaItem("image", "data:image/png;base64," + good)])
    assert len(decoded.images) == 2 and decoded.images[0].size == (8, 8)
    jpeg_like = "/9j/" + "A" * 100  # base64 that starts with "/" is not a path
    with pytest.raises(MediaError, match="not a decodable image"):
        decode_media([MediaItem("image", jpeg_like)])
    with pytest.raises(MediaError, match="too many"):
        decode_media([MediaItem("image", good)] * 3, MediaPolicy(max_items=2))
    with pytest.raises(MediaError, match="larger than"):
        decode_media([MediaItem("image", "A" * 4_000_000)], MediaPolicy(max_bytes=1024 * 1024))
    with pytest.raises(MediaError, match="local file paths are disabled"):
        decode_media([MediaItem("image", str(tmp_path / "x.png"))], MediaPolicy(allow_local_paths=False))
    with pytest.raises(MediaError, match="audio 1: not a recognised audio file"):
        decode_media([MediaItem("audio", base64.b64encode(b"hello").decode())])
    # A RIFF header with no format chunk: its rate and length cannot be read, so it is never decoded.
    with pytest.raises(MediaError, match="audio 1: not a decodable WAV file"):
        decode_media([MediaItem("audio", base64.b64encode(b"RIFF0000WAVE").decode())])
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:  # 0.1 s of 16 kHz silence: a header within every audio bound
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\0\0" * 1600)
    wav = decode_media([MediaItem("audio", base64.b64encode(buffer.getvalue()).decode())])
    path = wav.audio[0]
    assert path.endswith(".wav")
    wav.cleanup()
    import os

    assert not os.path.exists(path)


def test_string_content_as_parts_for_templates_that_need_it() -> None:
    chat = normalize_messages([{"role": "user", "content": "hi"}], content_as_parts=True)
    assert chat.messages == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["content", "reasoning", "both", "call", "logprob"]),
            st.text(min_size=1, max_size=4),
        ),
        max_size=12,
    )
)
def test_coalescing_pending_pieces_keeps_every_piece_in_order(pieces: list[tuple[str, str]]) -> None:
    """Pieces merged for a consumer that fell behind carry the same text, calls and logprobs in the same order."""
    from runtime.async_bridge import _plain_kind, coalesce
    from runtime.request import Event, TokenLogprob, Usage

    events = []
    for index, (kind, text) in enumerate(pieces):
        if kind == "content":
            events.append(Event(content=text))
        elif kind == "reasoning":
            events.append(Event(reasoning=text))
        elif kind == "both":
            events.append(Event(reasoning=text, content=text))
        elif kind == "call":
            events.append(Event(tool_calls=[{"name": text, "arguments": "{}"}]))  # type: ignore[list-item]
        else:
            events.append(Event(content=text, logprobs=[TokenLogprob(text, index, -1.0)]))
    events.append(Event(content="end", done=True, finish_reason="stop", usage=Usage()))
    merged = coalesce(events)

    def flat(stream: list[Event]) -> list[tuple[str, str]]:  # reasoning before content within one piece
        return [(k, ch) for e in stream for k, text in (("r", e.reasoning), ("c", e.content)) for ch in text]

    assert flat(merged) == flat(events)
    assert [c for e in merged for c in e.tool_calls] == [c for e in events for c in e.tool_calls]
    assert [p for e in merged for p in e.logprobs] == [p for e in events for p in e.logprobs]
    assert merged[-1] is events[-1] and sum(e.done for e in merged) == 1
    kinds = [_plain_kind(e) for e in merged]
    assert all(a is None or a != b for a, b in itertools.pairwise(kinds))  # each run of one kind is one piece
