"""Requests the drafting tests share (bundled MTP layers and separate drafters): text, or text with an image."""

from __future__ import annotations

import base64
import io
from typing import Any


def png(color: tuple[int, int, int], size: int = 64) -> str:
    """A one-colour PNG as a data URL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request(text: str, image: str | None = None, **fields: Any):  # type: ignore[no-untyped-def]
    """A one-turn chat request, greedy and 24 tokens unless `fields` say otherwise."""
    from runtime.request import GenerationRequest

    content: Any = text
    if image is not None:
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
    fields.setdefault("max_tokens", 24)
    fields.setdefault("temperature", 0.0)
    return GenerationRequest(messages=[{"role": "user", "content": content}], **fields)
