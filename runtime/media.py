"""Decode media references (data URLs, base64, local paths, opt-in remote URLs) with clear errors.

Images become PIL images (decoded fully here, so a truncated or bogus file fails with a one-line
error before it reaches a model); audio and video are written to temporary files, which is what
mlx-vlm's loaders take. Sizes and counts are bounded, and so is what the bytes expand to: a small file
can describe a huge image or hours of sound, so an image's pixels and an audio file's sample rate,
channels and duration are read from its header and refused before anything is decoded or resampled.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import io
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from gallery.errors import RequestError
from runtime.messages import MediaItem

MAX_MEDIA_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # one image (an 8K photo is 33 M)
MAX_REQUEST_PIXELS = 80_000_000  # all images of one request together
MAX_MEDIA_ITEMS = 16
MAX_AUDIO_SECONDS = 600.0  # all audio of one request together
AUDIO_SAMPLE_RATES = (4_000, 384_000)  # Hz: telephony's 8 kHz to studio rates, with room either side
MAX_AUDIO_CHANNELS = 8
MAX_VIDEO_SECONDS = 600.0  # all video of one request together
MAX_VIDEO_PIXELS = 400_000_000  # the frames the loader samples, all videos of a request together (1.2 GB RGB)
# mlx-vlm's load_video samples 2 frames a second, at least 4 and at most 768 (DEFAULT_VIDEO_SAMPLING).
_VIDEO_FPS, _VIDEO_MIN_FRAMES, _VIDEO_MAX_FRAMES = 2.0, 4, 768
_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I
)
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_AUDIO_MAGIC = (
    (b"RIFF", "wav"),
    (b"ID3", "mp3"),
    (b"\xff\xfb", "mp3"),
    (b"\xff\xf3", "mp3"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
)


class MediaError(RequestError):
    """Media that cannot be decoded or is not allowed."""


@dataclasses.dataclass
class MediaPolicy:
    """What media sources a runtime accepts."""

    allow_local_paths: bool = True
    allow_remote_urls: bool = False
    max_items: int = MAX_MEDIA_ITEMS
    max_bytes: int = MAX_MEDIA_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_request_pixels: int = MAX_REQUEST_PIXELS
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    max_video_seconds: float = MAX_VIDEO_SECONDS
    max_video_pixels: int = MAX_VIDEO_PIXELS


@dataclasses.dataclass
class DecodedMedia:
    """Decoded inputs for one request: PIL images, and paths of temporary audio/video files."""

    images: list[Any]
    audio: list[str]
    video: list[str]
    hashes: list[str] = dataclasses.field(default_factory=list)  # sha256 of each input's bytes, in order
    _tmpdir: tempfile.TemporaryDirectory[str] | None = None

    def cleanup(self) -> None:
        """Delete the temporary files (safe to call twice)."""
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                self._tmpdir.cleanup()
            self._tmpdir = None

    @property
    def count(self) -> int:
        """How many media inputs in total."""
        return len(self.images) + len(self.audio) + len(self.video)


def _b64decode(text: str, label: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())
    if len(compact) * 3 // 4 > max_bytes:
        raise MediaError(f"{label}: larger than {_mib(max_bytes)} (load option max_media_mb)")
    try:
        padded = compact + "=" * (-len(compact) % 4)
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{label}: not valid base64") from None


def _read_bytes(data: Any, label: str, policy: MediaPolicy) -> bytes:
    """Bytes behind a media reference."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > policy.max_bytes:
            raise MediaError(f"{label}: larger than {_mib(policy.max_bytes)} (load option max_media_mb)")
        return bytes(data)
    if not isinstance(data, str):
        raise MediaError(f"{label}: expected a data URL, base64 text or a path, got {type(data).__name__}")
    text = data.strip()
    match = _DATA_URL.match(text)
    if match:
        payload = text[match.end() :]
        if not match.group("b64"):
            from urllib.parse import unquote_to_bytes

            # Percent-encoding only shrinks (3 characters per escaped byte), so the text bounds the bytes:
            # refuse on the text first, then on the exact count (no multi-MiB decode just to throw it away).
            if len(payload) > 3 * policy.max_bytes:
                raise MediaError(f"{label}: larger than {_mib(policy.max_bytes)} (load option max_media_mb)")
            raw = unquote_to_bytes(payload)
            if len(raw) > policy.max_bytes:
                raise MediaError(f"{label}: larger than {_mib(policy.max_bytes)} (load option max_media_mb)")
            return raw
        return _b64decode(payload, label, policy.max_bytes)
    if text.startswith(("http://", "https://")):
        if not policy.allow_remote_urls:
            raise MediaError(
                f"{label}: remote URLs are disabled (send the bytes as a data URL or base64, "
                "or load the model with the option allow_remote_media:true, e.g. `-o allow_remote_media:true`)"
            )
        return _fetch_remote(text, label, policy)
    # Base64 may start with "/" (every JPEG does: "/9j/"), so only text that cannot be base64 is a path:
    # long base64-looking text is base64, a file:// URL or path-looking text is a path, and short text is a
    # path when such a file exists (`red.png`), else base64.
    looks_b64 = len(text) >= 64 and _BASE64_TEXT.fullmatch(text) is not None
    looks_path = text.startswith(("/", "./", "../", "~")) or os.sep in text or _is_file(text)
    if text.startswith("file://") or (not looks_b64 and looks_path):
        if not policy.allow_local_paths:
            raise MediaError(f"{label}: local file paths are disabled for this runtime")
        path = Path(text[len("file://") :] if text.startswith("file://") else text).expanduser()
        return _read_local(path, label, policy)
    return _b64decode(text, label, policy.max_bytes)


def _read_local(path: Path, label: str, policy: MediaPolicy) -> bytes:
    """A local media file's bytes: regular files only (a FIFO, device or socket fails at once, never blocks)."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once (then fstat refuses it) instead of hanging.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MediaError(f"{label}: no such file {path}") from None
    except IsADirectoryError:
        raise MediaError(f"{label}: {path} is a folder") from None
    except OSError as exc:
        raise MediaError(f"{label}: cannot read {path} ({exc.strerror})") from None
    except ValueError:  # a NUL byte, or a lone surrogate no file system can name
        raise MediaError(f"{label}: not a usable file path") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise MediaError(f"{label}: {path} is a folder")
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(
                f"{label}: {path} is not a regular file (a device, FIFO or socket cannot be media)"
            )
        if info.st_size > policy.max_bytes:
            raise MediaError(
                f"{label}: {path} is larger than {_mib(policy.max_bytes)} (load option max_media_mb)"
            )
        try:
            os.set_blocking(handle.fileno(), True)
            data = handle.read(policy.max_bytes + 1)  # bounded even if the file grows meanwhile
        except OSError as exc:
            raise MediaError(f"{label}: cannot read {path} ({exc.strerror})") from None
    if len(data) > policy.max_bytes:
        raise MediaError(
            f"{label}: {path} is larger than {_mib(policy.max_bytes)} (load option max_media_mb)"
        )
    return data


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and "\x00" not in text and Path(text).expanduser().is_file()
    except OSError:
        return False


def _fetch_remote(url: str, label: str, policy: MediaPolicy) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=True) as response:
            if response.status_code != 200:
                raise MediaError(f"{label}: {url} answered HTTP {response.status_code}")
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > policy.max_bytes:
                    raise MediaError(
                        f"{label}: {url} is larger than {_mib(policy.max_bytes)} (load option max_media_mb)"
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise MediaError(f"{label}: could not fetch {url} ({type(exc).__name__})") from None


def _open_image(raw: bytes, label: str, max_pixels: int) -> Any:
    """An image opened lazily (header read, pixels not decoded), refused over max_pixels. Raises MediaError."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise MediaError(f"{label}: empty")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; the size is checked here instead, exactly.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))  # reads the header only: the size is known, nothing decoded
    except Image.DecompressionBombError:
        raise MediaError(f"{label}: image too large (over {max_pixels:,} pixels per image)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise MediaError(f"{label}: not a decodable image (PNG, JPEG, WebP, GIF, …)") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise MediaError(
            f"{label}: image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} pixels per image"
        )
    return image


def _decode_image(image: Any, label: str) -> Any:
    """Decode an opened image fully into an RGB PIL image (a truncated file fails here, not inside the model)."""
    try:
        with image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise MediaError(f"{label}: not a decodable image (PNG, JPEG, WebP, GIF, …)") from None


def _audio_seconds(raw: bytes, suffix: str, label: str) -> float:
    """An audio file's duration from its header, refusing absurd sample rates and channel counts. Raises MediaError.

    A few bytes can declare an hour at 8 Hz, which the loader would resample to tens of millions of samples
    at the model's rate (gigabytes): nothing is decoded until the header says the sound is sane.
    """
    import miniaudio

    probes = {
        "wav": miniaudio.wav_get_info,
        "mp3": miniaudio.mp3_get_info,
        "flac": miniaudio.flac_get_info,
        "ogg": miniaudio.vorbis_get_info,
    }
    probe = probes.get(suffix)
    if probe is None:
        raise MediaError(
            f"{label}: {suffix} audio cannot be checked before decoding; send WAV, MP3, FLAC or OGG Vorbis"
        )
    try:
        info = probe(raw)
    except (miniaudio.MiniaudioError, ValueError, OSError):
        raise MediaError(f"{label}: not a decodable {suffix.upper()} file") from None
    low, high = AUDIO_SAMPLE_RATES
    if not low <= info.sample_rate <= high:
        raise MediaError(
            f"{label}: sample rate {info.sample_rate} Hz is outside {low:,}-{high:,} Hz (the audio limit)"
        )
    if not 1 <= info.nchannels <= MAX_AUDIO_CHANNELS:
        raise MediaError(f"{label}: {info.nchannels} channels; at most {MAX_AUDIO_CHANNELS} are accepted")
    return float(info.num_frames) / info.sample_rate


def _audio_suffix(raw: bytes, hint: str | None) -> str:
    for magic, suffix in _AUDIO_MAGIC:
        if raw.startswith(magic):
            return suffix
    if hint and re.fullmatch(r"[a-z0-9]{1,5}", hint.lower()):
        return hint.lower()
    raise MediaError("audio: not a recognised audio file (WAV, MP3, FLAC, OGG)")


def _video_header(path: Path, label: str, max_frame_pixels: int) -> tuple[float, int]:
    """(seconds, pixels of the frames the loader will sample) from a video's container header. Raises MediaError.

    OpenCV is what mlx-vlm reads video with; opening a capture reads the container's header, not its frames.
    """
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise MediaError(f"{label}: not a decodable video (MP4, WebM, AVI, MOV, …)")
        frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        rate = capture.get(cv2.CAP_PROP_FPS) or 1.0
        width, height = (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    finally:
        capture.release()
    if frames <= 0 or width <= 0 or height <= 0:
        raise MediaError(f"{label}: not a decodable video (no frames or no frame size in its header)")
    if width * height > max_frame_pixels:
        raise MediaError(
            f"{label}: video frames are {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_frame_pixels:,} pixels per frame"
        )
    seconds = frames / rate
    sampled = min(max(seconds * _VIDEO_FPS, _VIDEO_MIN_FRAMES), _VIDEO_MAX_FRAMES, frames)
    return seconds, int(sampled) * width * height


def decode_media(items: list[MediaItem], policy: MediaPolicy | None = None) -> DecodedMedia:
    """Decode every media item of a request. Raises MediaError naming the failing item.

    Two passes: every item's header is checked first (pixels, sample rate, duration, and the request's totals),
    so a request over a bound is refused before any of its media is decoded.
    """
    policy = policy or MediaPolicy()
    if len(items) > policy.max_items:
        raise MediaError(f"too many media inputs ({len(items)} > {policy.max_items})")
    decoded = DecodedMedia(images=[], audio=[], video=[])
    counts = {"image": 0, "audio": 0, "video": 0}
    pixels, seconds = 0, 0.0  # what the request's images and audio add up to, against the per-request budgets
    video_seconds, video_pixels = 0.0, 0
    checked: list[tuple[str, str, Any, str]] = []  # (kind, label, opened image or raw bytes, file suffix)
    try:
        for item in items:
            counts[item.kind] += 1
            label = f"{item.kind} {counts[item.kind]}"
            raw = _read_bytes(item.data, label, policy)
            decoded.hashes.append(f"{item.kind}:{hashlib.sha256(raw).hexdigest()}")
            if item.kind == "image":
                image = _open_image(raw, label, policy.max_image_pixels)
                checked.append((item.kind, label, image, ""))
                width, height = image.size
                pixels += width * height
                if pixels > policy.max_request_pixels:
                    raise MediaError(
                        f"{label}: image is {width}x{height} pixels, which takes this request's images over the "
                        f"limit of {policy.max_request_pixels:,} pixels per request"
                    )
                continue
            if not raw:
                raise MediaError(f"{label}: empty")
            if item.kind == "audio":
                try:
                    suffix = _audio_suffix(raw, item.format)
                except MediaError as exc:
                    raise MediaError(f"{label}: {str(exc).split(': ', 1)[1]}") from None
                seconds += _audio_seconds(raw, suffix, label)
                if seconds > policy.max_audio_seconds:
                    raise MediaError(
                        f"{label}: {seconds:,.0f} s of audio in this request, over the limit of "
                        f"{policy.max_audio_seconds:g} s"
                    )
            else:
                suffix = (item.format or "mp4").lower()
                if not re.fullmatch(r"[a-z0-9]{1,5}", suffix):  # it names a file: never a path or odd text
                    suffix = "mp4"
                # OpenCV reads a container's header from a file: write it now, check it, decode nothing.
                if decoded._tmpdir is None:
                    decoded._tmpdir = tempfile.TemporaryDirectory(prefix="gallery-media-")
                path = Path(decoded._tmpdir.name) / f"video{counts['video']}.{suffix}"
                path.write_bytes(raw)
                length, frame_pixels = _video_header(path, label, policy.max_image_pixels)
                video_seconds += length
                video_pixels += frame_pixels
                if video_seconds > policy.max_video_seconds:
                    raise MediaError(
                        f"{label}: {video_seconds:,.0f} s of video in this request, over the limit of "
                        f"{policy.max_video_seconds:g} s"
                    )
                if video_pixels > policy.max_video_pixels:
                    raise MediaError(
                        f"{label}: the frames sampled from this request's video come to {video_pixels:,} "
                        f"pixels, over the limit of {policy.max_video_pixels:,} pixels per request"
                    )
                checked.append((item.kind, label, str(path), suffix))
                continue
            checked.append((item.kind, label, raw, suffix))
        for index, (kind, label, payload, suffix) in enumerate(checked):
            checked[index] = (kind, label, None, suffix)  # let each input's bytes go once it is decoded
            if kind == "image":
                decoded.images.append(_decode_image(payload, label))
                continue
            if kind == "video":
                decoded.video.append(payload)  # written and checked in the first pass
                continue
            if decoded._tmpdir is None:
                decoded._tmpdir = tempfile.TemporaryDirectory(prefix="gallery-media-")
            path = Path(decoded._tmpdir.name) / f"audio{len(decoded.audio) + 1}.{suffix}"
            path.write_bytes(payload)
            decoded.audio.append(str(path))
    except BaseException:
        for _kind, _label, payload, _suffix in checked:
            if payload is not None and hasattr(payload, "close"):
                payload.close()
        decoded.cleanup()
        raise
    return decoded
