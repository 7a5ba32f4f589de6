"""Hostile input, second pass (issue 25, items 4, 8, 9): a clear 400 at once, never a 500, a hang or gigabytes.

Real servers on loopback with the tiny Gemma-4-layout VLM (vision and audio towers): JSON that breaks Python
far from where it arrives (a lone surrogate, 600-deep nesting, a 4,301-digit integer, a surrogate in the
model name) is refused by the field's name over HTTP (`param`) and stdio (error data `field`); media whose
header describes too much (an hour of sound at 8 Hz in 57 KB, an 8900x8900 PNG in 77 KB, images adding up
past the request's pixel budget, a percent-encoded data URL over max_media_mb) is refused from its header
before anything is decoded; a FIFO or /dev/zero as a local image fails at once instead of hanging or
exhausting memory. After each refusal the server still answers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.parse
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interfaces_support import HttpProcess, StdioProcess, running

pytestmark = pytest.mark.mlx
MODEL = "vlm-gemma4-audio"


def _deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


# Raw JSON text: `\ud800` escapes and a 4,301-digit number cannot be written by json.dumps from Python values.
HUGE = "9" * 4301
BAD_JSON: list[tuple[str, str, str]] = [
    ("surrogate in content", json.dumps(_chat()).replace('"hi"', '"a\\ud800b"'), "messages"),
    (
        "600-deep content",
        json.dumps(_chat(messages=[{"role": "user", "content": _deep(600)}])),
        "messages",
    ),
    (
        "600-deep chat_template_kwargs",
        json.dumps(_chat(chat_template_kwargs={"a": _deep(600)})),
        "chat_template_kwargs",
    ),
    ("4,301-digit top_k", json.dumps(_chat(top_k=1)).replace('"top_k": 1', f'"top_k": {HUGE}'), "top_k"),
    ("surrogate in the model name", json.dumps(_chat()).replace(f'"{MODEL}"', '"vlm\\udcffx"'), "model"),
]


def _wav(rate: int, seconds: float, width: int = 2) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(b"\0" * width * int(rate * seconds))
    return buffer.getvalue()


def _png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def _mp4(frames: int, width: int, height: int, fps: float) -> bytes:
    import tempfile

    import cv2
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        black = np.zeros((height, width, 3), np.uint8)
        for _ in range(frames):
            writer.write(black)
        writer.release()
        return path.read_bytes()


def _video_part(raw: bytes) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + _b64(raw)}}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _audio_part(raw: bytes) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": _b64(raw), "format": "wav"}}


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _with_media(*parts: dict[str, Any]) -> dict[str, Any]:
    return _chat(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}])


BAD_MEDIA: list[tuple[str, Any, str]] = [
    # 57 KB that declare an hour at 8 Hz: the loader would resample it to 57.6 M samples (+730 MB, 7-23 s).
    ("an hour of WAV at 8 Hz", lambda: _with_media(_audio_part(_wav(8, 3600))), "sample rate 8 Hz"),
    # A sane rate, but over the duration limit: 601 s of 8-bit mono at 4 kHz is 2.4 MB.
    ("601 s of WAV", lambda: _with_media(_audio_part(_wav(4000, 601, width=1))), "over the limit of 600 s"),
    (
        "an 8900x8900 PNG",
        lambda: _with_media(_image_part("data:image/png;base64," + _b64(_png(8900)))),
        "over the limit of 40,000,000 pixels per image",
    ),
    (
        "three 6000x6000 PNGs",
        lambda: _with_media(*[_image_part("data:image/png;base64," + _b64(_png(6000)))] * 3),
        "80,000,000 pixels per request",
    ),
    # 8 frames at 0.01 fps: a 1 KB file that declares 800 s.
    ("800 s of video", lambda: _with_media(_video_part(_mp4(8, 56, 56, 0.01))), "over the limit of 600 s"),
    # 730 KB whose 40 frames of 4000x3000 the loader would decode: +2.9 GB and 30 s before.
    (
        "40 frames of 4000x3000 video",
        lambda: _with_media(_video_part(_mp4(40, 4000, 3000, 2.0))),
        "over the limit of 400,000,000 pixels per request",
    ),
    (
        "a percent-encoded data URL over max_media_mb",
        lambda: _with_media(
            _image_part("data:image/png," + urllib.parse.quote(b"\x89PNG" + b"\0" * (4 << 20)))
        ),
        "larger than 4 MiB (load option max_media_mb)",
    ),
]


@pytest.fixture(scope="module")
def http(audio_vlm_model: Path) -> Iterator[HttpProcess]:
    """The tiny audio VLM behind the HTTP server, media capped at 4 MiB."""
    with running(HttpProcess(str(audio_vlm_model), "-o", "max_media_mb:4", "--quiet")) as process:
        yield process  # type: ignore[misc]


@pytest.fixture(scope="module")
def stdio(audio_vlm_model: Path) -> Iterator[StdioProcess]:
    """The tiny audio VLM behind stdio JSON-RPC (local media paths allowed, as stdio's default)."""
    with running(StdioProcess(str(audio_vlm_model))) as process:
        assert isinstance(process, StdioProcess)
        yield process


def _post(http: HttpProcess, body: str | dict[str, Any]) -> Any:
    import httpx

    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(
        f"{http.url}/v1/chat/completions",
        content=content.encode("utf-8", "surrogatepass"),
        headers={"content-type": "application/json"},
        timeout=120,
    )


def _still_serves(http: HttpProcess) -> None:
    answer = _post(http, _chat())
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(("case", "body", "field"), BAD_JSON, ids=[case for case, _, _ in BAD_JSON])
def test_json_that_breaks_python_is_a_400_naming_the_field_over_http(
    http: HttpProcess, case: str, body: str, field: str
) -> None:
    answer = _post(http, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and "internal" not in error["message"], error
    # The request model names the field; a server that bounds the whole body while parsing it (before any field
    # is known) may refuse first, and then names the bound instead.
    assert error["param"] == field or (
        error["param"] is None and re.search(r"surrogate|levels deep|number|digits", error["message"])
    ), error
    _still_serves(http)


@pytest.mark.parametrize(("case", "body", "field"), BAD_JSON, ids=[case for case, _, _ in BAD_JSON])
def test_json_that_breaks_python_is_an_invalid_params_error_naming_the_field_over_stdio(
    stdio: StdioProcess, case: str, body: str, field: str
) -> None:
    params = body  # the same raw JSON text, as the params of a chat request
    stdio.write(f'{{"jsonrpc": "2.0", "id": "bad", "method": "chat", "params": {params}}}\n')
    response, _, _ = stdio.collect("bad", timeout=60)
    assert response["error"]["code"] == -32602, response
    assert response["error"]["data"] == {"kind": "invalid_request", "field": field}, response
    assert stdio.call("chat", _chat(), timeout=60)["result"]["message"]["content"] is not None


@pytest.mark.parametrize(("case", "body", "needle"), BAD_MEDIA, ids=[case for case, _, _ in BAD_MEDIA])
def test_media_is_refused_from_its_header_before_decoding(
    http: HttpProcess, case: str, body: Any, needle: str
) -> None:
    answer = _post(http, body())
    assert answer.status_code == 400, answer.text[:300]
    assert needle in answer.json()["error"]["message"], answer.text[:300]
    _still_serves(http)


def test_media_within_the_limits_still_reaches_the_model(http: HttpProcess) -> None:
    answer = _post(
        http,
        _with_media(_audio_part(_wav(16000, 1.0)), _image_part("data:image/png;base64," + _b64(_png(64)))),
    )
    assert answer.status_code == 200, answer.text[:300]
    assert (
        answer.json()["usage"]["prompt_tokens"] > 20
    )  # the audio's and the image's tokens are in the prompt


def test_a_fifo_or_a_device_as_a_local_image_fails_at_once_over_stdio(
    stdio: StdioProcess, tmp_path: Path
) -> None:
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)  # no writer ever opens it: reading it would block forever
    for path in (str(fifo), "/dev/zero", f"file://{fifo}"):
        response = stdio.call("chat", _chat(images=[path]), timeout=30)
        assert response["error"]["code"] == -32602, response
        assert "not a regular file" in response["error"]["message"], response
    assert stdio.call("chat", _chat(), timeout=60)["result"]["message"]["content"] is not None


GRPC_BAD_JSON: list[tuple[dict[str, Any], str]] = [
    ({"Metadata": {"chat_template_kwargs": json.dumps({"a": _deep(600)})}}, "chat_template_kwargs"),
    ({"Metadata": {"chat_template_kwargs": '{"a": "x\\ud800"}'}}, "chat_template_kwargs"),
    (
        {
            "Tools": '[{"type": "function", "function": {"name": "f", "parameters": {"maxLength": '
            + HUGE
            + "}}}]"
        },
        "Tools",
    ),
    ({"LogitBias": '{"5": ' + HUGE + "}"}, "LogitBias"),
]


def test_json_fields_that_break_python_are_invalid_argument_over_grpc(audio_vlm_model: Path) -> None:
    import grpc

    from tests.interfaces_support import GrpcProcess, chat, rpc_error, wait_for_grpc_state

    with running(GrpcProcess("--model", str(audio_vlm_model))) as process:
        assert isinstance(process, GrpcProcess)
        assert wait_for_grpc_state(process.stub, "READY", timeout=120) == "READY"
        for fields, name in GRPC_BAD_JSON:
            error = rpc_error(
                lambda fields=fields: process.stub.Predict(chat("Hi", Tokens=2, **fields), timeout=60)
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
            assert name in error.details(), (name, error.details())
        assert process.stub.Predict(chat("Hi", Tokens=2), timeout=60).tokens >= 1


def test_a_lone_surrogate_in_a_stdio_id_or_method_is_refused_and_the_reply_stays_utf8(
    stdio: StdioProcess,
) -> None:
    stdio.write('{"jsonrpc": "2.0", "id": "a\\ud800", "method": "chat", "params": {"messages": []}}\n')
    response = stdio.next(timeout=30)  # the reader thread drops any line that is not valid UTF-8 JSON
    assert response["id"] is None and response["error"]["data"]["field"] == "id", response
    stdio.write('{"jsonrpc": "2.0", "id": 7, "method": "ch\\udfffat"}\n')
    response = stdio.next(timeout=30)
    assert response["error"]["data"]["field"] == "method", response
    assert not stdio.bad_lines
