"""Load-time options: LocalAI's `key:value` strings (ModelOptions.Options, or stdio `load` options).

One table (OPTIONS) defines every key, its type and what it does; the parser, the error messages and
the README table all come from it. Unknown keys are reported back (LocalAI users keep options for other
backends in the same YAML), never silently applied; a known key with a bad value fails the load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from gallery.errors import RequestError
from gallery.kv_quant import kv_problem


class OptionError(RequestError):
    """A load option with a value of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option key: its value type, default and meaning."""

    kind: str  # "int" | "float" | "bool" | "str" | "list"
    default: Any
    help: str
    minimum: float | None = None


MiB = 1024 * 1024

OPTIONS: dict[str, OptionSpec] = {
    "max_active": OptionSpec(
        "int",
        None,
        "requests decoded at once (one continuous batch; more wait in the queue); default 64 on a GPU, 32 on a "
        "CPU",
        1,
    ),
    "max_queue": OptionSpec("int", 256, "requests waiting beyond max_active; more are refused (busy)", 0),
    "batching": OptionSpec(
        "bool", True, "decode text requests in one continuous batch (off: one token each, in turn)"
    ),
    "solo": OptionSpec(
        "bool",
        True,
        "decode a text request that runs alone at single-sequence speed; it joins the batch, exactly where it "
        "is, when another request arrives (off: always through the batch)",
    ),
    "dequantize": OptionSpec(
        "bool",
        None,
        "serve a quantized text model on its weights dequantized to 16 bits (about 3.5x a 4-bit model's "
        "memory): MLX CUDA's quantized matmul grows with the batch, a 16-bit one barely; default: on with MLX "
        "CUDA when the 16-bit weights fit in half the GPU's memory, off elsewhere",
    ),
    "prefill_step": OptionSpec(
        "int",
        None,
        "prompt tokens processed per step (a cancel or shutdown waits at most one, and so does a request "
        "arriving behind a long prompt); default 2048 on a GPU, 16 on a CPU",
        16,
    ),
    "prefill_batch": OptionSpec("int", 8, "prompts processed together in one step", 1),
    "prefix_cache": OptionSpec(
        "bool", True, "reuse the longest cached prefix of a prompt (multi-turn chats, shared system prompts)"
    ),
    "prefix_cache_entries": OptionSpec("int", 32, "most prompt caches kept", 0),
    "prefix_cache_mb": OptionSpec("float", 1024.0, "most memory the kept prompt caches may use, in MiB", 0),
    "media_batching": OptionSpec(
        "bool",
        True,
        "decode requests with images, audio or video in one continuous batch (off: one generator each, in turn)",
    ),
    "vision_cache_entries": OptionSpec(
        "int", 32, "most tower outputs kept in the media feature cache (by content hash; 0: off)", 0
    ),
    "vision_cache_mb": OptionSpec("float", 512.0, "most memory the feature cache may use, in MiB", 0),
    "max_kv_size": OptionSpec(
        "int", None, "rotating KV cache of this many tokens (older ones are dropped)", 16
    ),
    "kv_bits": OptionSpec(
        "float",
        None,
        "quantize the KV cache to this many bits: 2-8 whole (uniform), or 1-8 in steps of 0.5 with "
        "kv_quant_scheme turboquant (text requests then run one by one)",
        1,
    ),
    "kv_quant_scheme": OptionSpec(
        "str",
        None,
        "uniform (MLX's group-wise) or turboquant (mlx-vlm's TurboQuant: mlx-vlm configs only; text requests "
        "then take the mlx-vlm route); default: the config's mlx.kv_cache, else uniform",
    ),
    "kv_group_size": OptionSpec("int", 64, "group size of the quantized KV cache: 32, 64 or 128", 32),
    "quantized_kv_start": OptionSpec("int", 0, "tokens kept unquantized before the KV cache is quantized", 0),
    "num_draft_tokens": OptionSpec(
        "int", None, "tokens the draft model proposes per step (speculative decoding)", 1
    ),
    "distributed_strategy": OptionSpec(
        "str",
        None,
        "distributed runs: pipeline, tensor or auto (default: the config's distributed.strategy, else auto)",
    ),
    "layer_split": OptionSpec(
        "str", None, "distributed pipeline runs: layers per rank, rank 0 first, e.g. 20,12 (default: even)"
    ),
    "allow_download": OptionSpec("bool", False, "download missing weights at the pinned revision"),
    "strict": OptionSpec("bool", False, "refuse a config without a usable chat template"),
    "allow_remote_media": OptionSpec("bool", False, "accept http(s) URLs for media (fetched by the runtime)"),
    "allow_local_media": OptionSpec(
        "bool", None, "accept local file paths for media (default: stdio yes, gRPC no)"
    ),
    "max_media_items": OptionSpec("int", 16, "most images/audio/video inputs in one request", 0),
    "max_media_mb": OptionSpec("float", 32.0, "largest single media input, in MiB", 0),
    "max_request_bytes": OptionSpec(
        "int", 4 * MiB, "largest prompt + messages + tools text of one request", 1
    ),
    "max_tokens_limit": OptionSpec("int", 32768, "largest max_tokens a request may ask for", 1),
    "grammar_budget_s": OptionSpec(
        "float",
        0.5,
        "most seconds building a structured-output grammar's matcher may take (the worker repeats that work)",
        0.001,
    ),
    "context_size": OptionSpec(
        "int", None, "the model's context size (prompt + answer); longer prompts are refused", 1
    ),
    "trust_remote_code": OptionSpec("bool", False, "let transformers run the repo's own tokenizer code"),
    "catalog": OptionSpec("str", None, "catalog index to look model names up in"),
    "revision": OptionSpec(
        "str",
        None,
        "the commit (or branch, tag) to load: a repo is read at it (from the cache when there, offline too); "
        "a config or entry pinned to another commit is refused",
    ),
    "model_identity": OptionSpec("list", (), "extra names a request's ModelIdentity may use (repeatable)"),
    "enable_thinking": OptionSpec("bool", None, "default thinking switch for requests that do not set it"),
    "temperature": OptionSpec("float", None, "default temperature (stdio requests that omit it)", 0),
    "top_p": OptionSpec("float", None, "default top_p", 0),
    "top_k": OptionSpec("int", None, "default top_k", 0),
    "min_p": OptionSpec("float", None, "default min_p", 0),
    "repeat_penalty": OptionSpec("float", None, "default repetition penalty", 0),
    "max_tokens": OptionSpec("int", None, "default max new tokens", 1),
    "seed": OptionSpec("int", None, "default random seed"),
}
# Other spellings people use for the same keys (LocalAI's mlx backend uses `temp`).
ALIASES = {"temp": "temperature", "repetition_penalty": "repeat_penalty"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclasses.dataclass
class LoadOptions:
    """Parsed options: known values by key, plus the keys that were not understood."""

    values: dict[str, Any]
    unknown: list[str]

    def get(self, key: str) -> Any:
        """The value of a key (its default when not given)."""
        return self.values.get(key, OPTIONS[key].default)

    def given(self, key: str) -> bool:
        """Whether the key was set explicitly."""
        return key in self.values


def _convert(key: str, raw: Any, spec: OptionSpec) -> Any:
    text = str(raw).strip()
    try:
        if spec.kind == "bool":
            if isinstance(raw, bool):
                return raw
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if spec.kind == "int":
            if isinstance(raw, bool):
                raise ValueError
            value: Any = int(raw) if isinstance(raw, int) else int(text)
        elif spec.kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw) if isinstance(raw, (int, float)) else float(text)
        else:
            return text
    except ValueError:
        want = {"bool": "true or false", "int": "an integer", "float": "a number"}[spec.kind]
        raise OptionError(f"option {key}: expected {want}, got {text!r}") from None
    if spec.minimum is not None and value < spec.minimum:
        raise OptionError(f"option {key}: must be at least {spec.minimum:g}, got {value}")
    return value


def parse_options(options: Iterable[str] | Mapping[str, Any] | None) -> LoadOptions:
    """Parse `key:value` strings (or a mapping) into LoadOptions. Raises OptionError on a bad value."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(options, Mapping):
        pairs = [(str(k), v) for k, v in options.items()]
    else:
        for item in options or []:
            if not isinstance(item, str):
                raise OptionError(f"option {item!r}: must be a 'key:value' string")
            key, sep, value = item.partition(":")
            if not sep:
                raise OptionError(f"option {item!r}: must be written key:value")
            pairs.append((key, value))
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for raw_key, raw_value in pairs:
        key = raw_key.strip().lower().replace("-", "_")
        key = ALIASES.get(key, key)
        spec = OPTIONS.get(key)
        if spec is None:
            unknown.append(raw_key.strip())
            continue
        if spec.kind == "list":
            items = raw_value if isinstance(raw_value, (list, tuple)) else [raw_value]
            values[key] = (*values.get(key, ()), *(str(i).strip() for i in items if str(i).strip()))
            continue
        values[key] = _convert(key, raw_value, spec)
    if "kv_bits" in values or "kv_quant_scheme" in values:
        # Checked as a pair (3.5 is a TurboQuant width only); the backend's part is checked at load.
        problem = kv_problem(values.get("kv_bits"), values.get("kv_quant_scheme"))
        if problem:
            raise OptionError(f"option {problem}")
        if "kv_bits" not in values:
            # The options replace the config's mlx.kv_cache as a whole: a scheme alone would drop its bits.
            raise OptionError("option kv_quant_scheme needs kv_bits (the load options replace mlx.kv_cache)")
    return LoadOptions(values=values, unknown=unknown)


def options_table() -> str:
    """The options as a Markdown table (for the README)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, spec in OPTIONS.items():
        default = "" if spec.default in (None, ()) else str(spec.default).lower()
        rows.append(f"| `{key}` | {spec.kind} | {default} | {spec.help} |")
    return "\n".join(rows)
