"""Decode media references (data URLs, base64, local paths, opt-in remote URLs) with clear errors.

Images become PIL images (decoded fully here, so a truncated or bogus file fails with a one-line
error before it reaches a model); audio and video are written to temporary files, which is what
mlx-vlm's loaders take. Sizes and counts are bounded.
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
import tempfile
from pathlib import Path
from typing import Any

from gallery.errors import RequestError
from runtime.messages import MediaItem

MAX_MEDIA_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
MAX_MEDIA_ITEMS = 16
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
        raise MediaError(f"{label}: larger than {max_bytes // (1024 * 1024)} MiB")
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
            raise MediaError(f"{label}: larger than {policy.max_bytes // (1024 * 1024)} MiB")
        return bytes(data)
    if not isinstance(data, str):
        raise MediaError(f"{label}: expected a data URL, base64 text or a path, got {type(data).__name__}")
    text = data.strip()
    match = _DATA_URL.match(text)
    if match:
        payload = text[match.end() :]
        if not match.group("b64"):
            from urllib.parse import unquote_to_bytes

            return unquote_to_bytes(payload)
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
        try:
            size = path.stat().st_size
            if size > policy.max_bytes:
                raise MediaError(f"{label}: {path} is larger than {policy.max_bytes // (1024 * 1024)} MiB")
            return path.read_bytes()
        except FileNotFoundError:
            raise MediaError(f"{label}: no such file {path}") from None
        except IsADirectoryError:
            raise MediaError(f"{label}: {path} is a folder") from None
        except OSError as exc:
            raise MediaError(f"{label}: cannot read {path} ({exc.strerror})") from None
    return _b64decode(text, label, policy.max_bytes)


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
                    raise MediaError(f"{label}: {url} is larger than {policy.max_bytes // (1024 * 1024)} MiB")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise MediaError(f"{label}: could not fetch {url} ({type(exc).__name__})") from None


def _decode_image_bytes(raw: bytes, label: str) -> Any:
    """Decode an image fully into an RGB PIL image. Raises MediaError."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise MediaError(f"{label}: empty")
    previous = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # decode now: a truncated file must fail here, not inside the model
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise MediaError(f"{label}: not a decodable image (PNG, JPEG, WebP, GIF, …)") from None
    except Image.DecompressionBombError:
        raise MediaError(f"{label}: image too large (over {MAX_IMAGE_PIXELS} pixels)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _audio_suffix(raw: bytes, hint: str | None) -> str:
    for magic, suffix in _AUDIO_MAGIC:
        if raw.startswith(magic):
            return suffix
    if hint and re.fullmatch(r"[a-z0-9]{1,5}", hint.lower()):
        return hint.lower()
    raise MediaError("audio: not a recognised audio file (WAV, MP3, FLAC, OGG)")


def decode_media(items: list[MediaItem], policy: MediaPolicy | None = None) -> DecodedMedia:
    """Decode every media item of a request. Raises MediaError naming the failing item."""
    policy = policy or MediaPolicy()
    if len(items) > policy.max_items:
        raise MediaError(f"too many media inputs ({len(items)} > {policy.max_items})")
    decoded = DecodedMedia(images=[], audio=[], video=[])
    counts = {"image": 0, "audio": 0, "video": 0}
    try:
        for item in items:
            counts[item.kind] += 1
            label = f"{item.kind} {counts[item.kind]}"
            raw = _read_bytes(item.data, label, policy)
            decoded.hashes.append(f"{item.kind}:{hashlib.sha256(raw).hexdigest()}")
            if item.kind == "image":
                decoded.images.append(_decode_image_bytes(raw, label))
                continue
            if not raw:
                raise MediaError(f"{label}: empty")
            if decoded._tmpdir is None:
                decoded._tmpdir = tempfile.TemporaryDirectory(prefix="gallery-media-")
            if item.kind == "audio":
                try:
                    suffix = _audio_suffix(raw, item.format)
                except MediaError as exc:
                    raise MediaError(f"{label}: {str(exc).split(': ', 1)[1]}") from None
            else:
                suffix = (item.format or "mp4").lower()
            path = Path(decoded._tmpdir.name) / f"{item.kind}{counts[item.kind]}.{suffix}"
            path.write_bytes(raw)
            (decoded.audio if item.kind == "audio" else decoded.video).append(str(path))
    except BaseException:
        decoded.cleanup()
        raise
    return decoded
