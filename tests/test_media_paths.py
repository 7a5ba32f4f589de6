"""Audio and video reach their towers, like images, on every kind of request; media a config cannot take is
refused by name.

Real parts: tiny models built offline (`vlm-gemma4-audio`: Gemma 4's layout with vision and audio towers and its
real processor and chat template; `vlm-qwen2vl`: Qwen2-VL, which takes video through the same vision tower),
test media made here (WAV tones with the stdlib `wave` module, MP4 clips with OpenCV), and the LocalAI gRPC
service (Predict and PredictStream with `Audios` / `Videos`) served in this process on loopback, so a spy on
the tower class sees exactly what the model received. Each request sends media no other request sends, with
the prefix cache off, so every media input must show up at its tower exactly once.
"""

from __future__ import annotations

import array
import asyncio
import base64
import concurrent.futures
import contextlib
import io
import math
import re
import threading
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")

from runtime.proto import backend_pb2 as pb  # noqa: E402
from tests.interfaces_support import chat  # noqa: E402
from tests.plugins.models import fixture_info  # noqa: E402

pytestmark = [
    pytest.mark.mlx,
    # Gemma 4's real feature-extractor settings (128 mel bins from a 512-point FFT) make transformers warn on
    # every load of its processor; the real model gets the same warning.
    pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values:UserWarning"),
]

RATE = 16000
ASK = "What is in this?"


# ----------------------------------------------------------------------------------------------- test media
def _tone(seconds: float, hz: float) -> list[int]:
    """16-bit samples of a sine tone at RATE."""
    return [int(8000 * math.sin(2 * math.pi * hz * i / RATE)) for i in range(int(seconds * RATE))]


def _wav(samples: list[int]) -> bytes:
    """A mono 16-bit PCM WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(array.array("h", samples).tobytes())
    return buffer.getvalue()


def _mp4(tmp_path: Path, frames: int, size: int, fps: float = 4.0) -> bytes:
    """An MP4 clip of `frames` solid frames (a different colour each) of size x size pixels."""
    import cv2
    import numpy as np

    path = tmp_path / f"clip-{frames}-{size}.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    assert writer.isOpened()
    for index in range(frames):
        writer.write(np.full((size, size, 3), (index * 29 % 256, 90, 255 - index * 17 % 256), np.uint8))
    writer.release()
    return path.read_bytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.contextmanager
def _spy(module: Any) -> Iterator[list[tuple[Any, ...]]]:
    """Record the positional arguments of every call of `module`'s class (as numpy arrays / lists)."""
    import numpy as np

    calls: list[tuple[Any, ...]] = []
    cls = type(module)
    original = cls.__call__
    lock = threading.Lock()

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self is module:
            with lock:
                calls.append(tuple(np.array(a) if hasattr(a, "shape") else a for a in args))
        return original(self, *args, **kwargs)

    cls.__call__ = spy
    try:
        yield calls
    finally:
        cls.__call__ = original


# ----------------------------------------------------------------------------------------------- the service
class InProcessGrpc:
    """The LocalAI gRPC Backend service of this runtime, served from this process on a loopback port."""

    def __init__(self) -> None:
        from runtime.grpc_server import build_server
        from runtime.host import ModelHost
        from runtime.proto import backend_pb2_grpc

        self.host = ModelHost(interface="grpc")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test", daemon=True)
        self.thread.start()

        async def start() -> tuple[Any, Any, int]:
            server, executor, _servicer = build_server(self.host, token=None)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, executor, port

        self.server, self.executor, port = self._run(start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = backend_pb2_grpc.BackendStub(self.channel)

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def load(self, folder: Path, *options: str) -> Any:
        """Load a model folder (with load options) and return its engine."""
        result = self.stub.LoadModel(pb.ModelOptions(Model=str(folder), Options=list(options)), timeout=120)
        assert result.success, result.message
        assert self.host.engine is not None
        return self.host.engine

    def close(self) -> None:
        """Stop the server and the engine."""
        self.channel.close()
        self.host.close(cancel=True)
        self._run(self.server.stop(0))
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def service() -> Iterator[InProcessGrpc]:
    server = InProcessGrpc()
    yield server
    server.close()


def _predict(stub: Any, options: Any) -> tuple[str, Any]:
    reply = stub.Predict(options, timeout=300)
    return reply.message.decode(), reply


def _predict_stream(stub: Any, options: Any) -> tuple[str, Any]:
    replies = list(stub.PredictStream(options, timeout=300))
    return "".join(r.message.decode() for r in replies), replies[-1]


CALLS: dict[str, Callable[[Any, Any], tuple[str, Any]]] = {
    "Predict": _predict,
    "PredictStream": _predict_stream,
}


def _run_all(stub: Any, jobs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Send every (call, options) at once; their answers in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(CALLS[call], stub, options) for call, options in jobs]
        return [future.result() for future in futures]


# ----------------------------------------------------------------------------------------------- importer
def test_the_importer_decides_each_tower_from_config_processor_and_weights(
    audio_vlm_model: Path, vlm_model: Path, mtp_vlm_model: Path, text_qwen3_model: Path
) -> None:
    from importers import import_model

    gemma = import_model(str(audio_vlm_model)).config
    assert gemma.backend == "mlx-vlm"
    media = gemma.mlx.media
    assert (media.image, media.audio, media.video) == (True, True, True)
    assert (media.audio_token, media.video_token, media.marker) == ("<|audio|>", "<|video|>", "<|image|>")
    evidence = {(e.source, e.field): e.detail for e in gemma.mlx.decisions["backend"].evidence}
    assert evidence[("config.json", "audio_config")] == "audio tower sub-config present"
    counted = re.match(
        r"(\d+) vision and (\d+) audio tower tensors among \d+",
        evidence[("model.safetensors.index.json", "weight_map")],
    )
    assert counted and int(counted[1]) > 0 and int(counted[2]) > 0
    assert (
        "an audio feature extractor"
        in evidence[("processor_config.json", "feature_extractor.feature_extractor_type")]
    )

    for folder in (vlm_model, mtp_vlm_model):  # Qwen VLMs: video through the vision tower, no audio tower
        qwen = import_model(str(folder)).config.mlx.media
        assert (qwen.image, qwen.audio, qwen.video) == (True, False, True), folder.name
        assert qwen.audio_token is None and qwen.video_token == "<|video_pad|>"
    text = import_model(str(text_qwen3_model)).config
    assert text.backend == "mlx" and not (
        text.mlx.media.image or text.mlx.media.audio or text.mlx.media.video
    )


# ----------------------------------------------------------------------------------------------- audio
def test_audio_reaches_the_audio_tower_streaming_and_not_alone_and_in_a_batch(
    service: InProcessGrpc, audio_vlm_model: Path
) -> None:
    import numpy as np

    engine = service.load(audio_vlm_model, "prefix_cache:false")
    info = fixture_info(audio_vlm_model)
    assert info["audio_sampling_rate"] == RATE
    extractor = engine.loaded.primary.processor.feature_extractor
    stub = service.stub
    # Five sounds of different lengths (so each tower call tells which one it got) and pitches.
    sounds = {seconds: _tone(seconds, 220.0 + 200 * seconds) for seconds in (0.4, 0.6, 0.8, 1.0, 1.2)}

    def features(seconds: float) -> Any:
        samples = np.asarray(sounds[seconds], dtype=np.float32) / 32768.0
        return np.asarray(extractor([samples], sampling_rate=RATE)["input_features"])

    def ask(seconds: float) -> Any:
        return chat(ASK, Tokens=6, Audios=[_b64(_wav(sounds[seconds]))])

    text_only = stub.Predict(chat(ASK, Tokens=6), timeout=120)
    tower = engine.loaded.primary.model.audio_tower
    with _spy(tower) as calls:
        alone = {0.4: _predict(stub, ask(0.4)), 0.6: _predict_stream(stub, ask(0.6))}
        jobs = [("PredictStream", ask(0.8)), ("Predict", ask(1.0)), ("PredictStream", ask(1.2))]
        jobs += [("Predict", chat("hi", Tokens=6)), ("PredictStream", chat("and you?", Tokens=6))]
        batch = _run_all(stub, jobs)
        in_batch_again = _run_all(
            stub, [("Predict", ask(0.4)), ("PredictStream", ask(0.6)), ("Predict", ask(1.0))]
        )

    # The tower ran once per audio request (never for the text-only ones) with exactly that audio's features.
    assert len(calls) == 8
    seen = sorted((call[0] for call in calls), key=lambda got: got.shape[1])
    sent = sorted((0.4, 0.6, 0.8, 1.0, 1.2, 0.4, 0.6, 1.0))
    for got, seconds in zip(seen, sent, strict=True):
        want = features(seconds)
        assert got.shape == want.shape, seconds
        np.testing.assert_allclose(got, want, atol=1e-4)
    # Each audio's tokens reached the prompt: one per 40 ms, between the begin/end-of-audio tokens.
    answers = {**alone, 0.8: batch[0], 1.0: batch[1], 1.2: batch[2]}
    for seconds, (_text, reply) in answers.items():
        audio_tokens = math.ceil(seconds * 1000 / info["audio_ms_per_token"])
        assert reply.prompt_tokens == text_only.prompt_tokens + audio_tokens + 2, seconds
    # The same audio gives the same (greedy) answer alone and inside a batch, streamed or not.
    assert in_batch_again[0][0] == alone[0.4][0] and in_batch_again[1][0] == alone[0.6][0]
    assert in_batch_again[2][0] == batch[1][0]
    assert len({text for text, _ in answers.values()}) > 1  # and the answer depends on the sound


# ----------------------------------------------------------------------------------------------- video
def test_video_reaches_the_vision_tower_as_frames_streaming_and_not_alone_and_in_a_batch(
    service: InProcessGrpc, vlm_model: Path, tmp_path: Path
) -> None:
    from PIL import Image

    engine = service.load(vlm_model, "prefix_cache:false")
    stub = service.stub
    # mlx-vlm samples 2 frames a second: 2 s at 4 fps -> 4 frames -> 2 temporal patches of 4x4 (56 px), 3 s
    # -> 3 temporal patches, which the processor shrinks to 2x2 to stay within its pixel budget.
    clips = {
        "short": (_mp4(tmp_path, frames=8, size=56), (2, 4, 4)),
        "long": (_mp4(tmp_path, frames=12, size=56), (3, 2, 2)),
    }

    def ask(name: str) -> Any:
        return chat(ASK, Tokens=6, Videos=[_b64(clips[name][0])])

    image = io.BytesIO()
    Image.new("RGB", (56, 56), (10, 200, 30)).save(image, "PNG")
    text_only = stub.Predict(chat(ASK, Tokens=6), timeout=120)
    tower = engine.loaded.primary.model.vision_tower
    with _spy(tower) as calls:
        alone = {"short": _predict(stub, ask("short")), "long": _predict_stream(stub, ask("long"))}
        batch = _run_all(
            stub,
            [
                ("PredictStream", ask("short")),
                ("Predict", ask("long")),
                ("Predict", chat(ASK, Tokens=6, Images=[_b64(image.getvalue())])),
                ("PredictStream", chat("hi", Tokens=6)),
            ],
        )

    grids = sorted(tuple(int(x) for x in call[1].reshape(-1)) for call in calls)
    # Both clips twice, as frames (temporal patches > 1); the image once, as one frame; nothing for text.
    assert grids == sorted([(2, 4, 4), (2, 4, 4), (3, 2, 2), (3, 2, 2), (1, 4, 4)])
    for name, (_text, reply) in alone.items():
        t, h, w = clips[name][1]
        # the clip's tokens (2x2 patches merged into one) between <|vision_start|> and <|vision_end|>
        assert reply.prompt_tokens == text_only.prompt_tokens + t * h * w // 4 + 2, name
    assert batch[0][0] == alone["short"][0] and batch[1][0] == alone["long"][0]
    assert batch[0][1].prompt_tokens == alone["short"][1].prompt_tokens


def test_openai_style_audio_and_video_parts_reach_the_towers(
    audio_vlm_model: Path, vlm_model: Path, tmp_path: Path
) -> None:
    """The part shapes OpenAI clients send (`input_audio`, `video_url` data URLs), through the engine."""
    from importers import import_model
    from runtime.engine import Engine
    from runtime.request import GenerationRequest

    wav = _wav(_tone(0.5, 330.0))
    clip = _mp4(tmp_path, frames=8, size=56)
    for folder, part, tower_name in (
        (
            audio_vlm_model,
            {"type": "input_audio", "input_audio": {"data": _b64(wav), "format": "wav"}},
            "audio",
        ),
        (
            vlm_model,
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + _b64(clip)}},
            "vision",
        ),
    ):
        engine = Engine(import_model(str(folder)).config).start()
        try:
            messages = [{"role": "user", "content": [part, {"type": "text", "text": ASK}]}]
            with _spy(getattr(engine.loaded.primary.model, f"{tower_name}_tower")) as calls:
                whole = engine.generate(GenerationRequest(messages=messages, max_tokens=4, temperature=0.0))
                streamed = list(
                    engine.submit(GenerationRequest(messages=messages, max_tokens=4, temperature=0.0))
                )
            assert len(calls) >= 1 and whole.route == "mlx-vlm"
            assert "".join(e.content for e in streamed) == whole.content
        finally:
            engine.shutdown()


# ----------------------------------------------------------------------------------------------- refused
def test_media_a_config_cannot_take_is_refused_by_name(
    service: InProcessGrpc, vlm_model: Path, text_qwen3_model: Path, audio_vlm_model: Path, tmp_path: Path
) -> None:
    def refused(call: Callable[[], Any]) -> str:
        with pytest.raises(grpc.RpcError) as caught:
            result = call()
            if not isinstance(result, pb.Reply):
                list(result)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        return str(caught.value.details())

    wav = _b64(_wav(_tone(0.3, 440.0)))
    clip = _b64(_mp4(tmp_path, frames=4, size=56))
    service.load(vlm_model)
    name = service.host.engine.config.name  # type: ignore[union-attr]
    for call in (service.stub.Predict, service.stub.PredictStream):
        message = refused(lambda call=call: call(chat(ASK, Tokens=4, Audios=[wav]), timeout=60))
        assert f"{name} has no audio tower" in message and "image/video" in message
    assert service.stub.Predict(chat(ASK, Tokens=4, Videos=[clip]), timeout=120).prompt_tokens > 0

    service.load(text_qwen3_model)
    message = refused(
        lambda: service.stub.Predict(chat(ASK, Tokens=4, Audios=[wav], Videos=[clip]), timeout=60)
    )
    assert "cannot take audio/video input" in message

    # A raw prompt without the audio marker would leave the audio encoded but never seen: refused, naming it.
    service.load(audio_vlm_model)
    raw = pb.PredictOptions(Prompt="<bos>Describe the sound.", Tokens=4, Audios=[wav])
    message = refused(lambda: service.stub.Predict(raw, timeout=60))
    assert "1 audio input(s)" in message and "'<|audio|>' marker" in message
    marked = pb.PredictOptions(Prompt="<bos><|audio|>Describe the sound.", Tokens=4, Audios=[wav])
    assert service.stub.Predict(marked, timeout=120).prompt_tokens > 10
