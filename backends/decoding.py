"""The decoders the engine drives, one step at a time, on its one MLX thread (one import for all of them).

The interface and its types are in backends.decoder; the text decoders (continuous batch, per-request
streams) in backends.text_decoders; the mlx-vlm decoder in backends.vlm_decoder; the text prefix cache in
backends.prefix_cache.
"""

from __future__ import annotations

from backends.decoder import (
    CacheStats,
    Decoder,
    DecoderStats,
    DecodeSpec,
    FinishReason,
    Logprob,
    PrefillAborted,
    Started,
    StopIds,
    TextCodec,
    TokenEvent,
)
from backends.prefix_cache import PrefixCache, check_kv_quantization
from backends.text_decoders import TextBatcher, TextStreams
from backends.vlm_decoder import VlmStreams

__all__ = [
    "CacheStats",
    "DecodeSpec",
    "Decoder",
    "DecoderStats",
    "FinishReason",
    "Logprob",
    "PrefillAborted",
    "PrefixCache",
    "Started",
    "StopIds",
    "TextBatcher",
    "TextCodec",
    "TextStreams",
    "TokenEvent",
    "VlmStreams",
    "check_kv_quantization",
]
