"""The remaining decisions: context size, quantization, sampling defaults, speculative decoding,
license, files with hashes, and media tokens — each with the field it came from."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from gallery.config import MAX_TOKEN_ID, Decision, Evidence, Parameters, Quantization, RepoFile, Speculative
from gallery.errors import BadMetadata
from importers.fetch import RepoSnapshot
from importers.metadata import RepoMetadata, optional_int, optional_number, optional_str

_CONTEXT_KEYS = (
    "max_position_embeddings",
    "max_sequence_length",
    "seq_length",
    "n_positions",
    "max_seq_len",
    "model_max_length",
)
# When a language config declares no position limit, transformers uses the config class's
# default. Only families whose default *is* the released models' context are listed (gemma3_text and
# gemma4_text default to 128K, as the 4B+ checkpoints that omit the key have); a family whose default
# is a placeholder (llama's 2048) is left unknown rather than guessed.
_CLASS_DEFAULT_CONTEXT = {
    "gemma3_text": ("Gemma3TextConfig", 131072),
    "gemma4_text": ("Gemma4TextConfig", 131072),
}
_MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers", "mtp_num_layers")


@dataclasses.dataclass
class Fact:
    """A value with its decision record."""

    value: Any
    decision: Decision


def decide_context(meta: RepoMetadata) -> Fact:
    """Context size: the language model's position limit (root or language sub-config)."""
    evidence: list[Evidence] = []
    chosen: int | None = None
    for path, node in meta.sub_configs():
        for key in _CONTEXT_KEYS:
            field = f"{path}.{key}" if path else key
            value = optional_int(node.get(key), "config.json", field)
            if value is not None and value > 0:
                evidence.append(Evidence(source="config.json", field=field, detail=str(value)))
                if chosen is None:
                    chosen = value
    if chosen is None:
        raw = meta.tokenizer_config.get("model_max_length")
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 < raw < 10_000_000:
            chosen = raw
            evidence.append(
                Evidence(source="tokenizer_config.json", field="model_max_length", detail=str(raw))
            )
    if chosen is None:
        for path, node in meta.sub_configs():
            default = _CLASS_DEFAULT_CONTEXT.get(str(node.get("model_type")))
            if default is not None:
                chosen = default[1]
                field = f"{path}.model_type" if path else "model_type"
                evidence.append(
                    Evidence(
                        source="config.json",
                        field=field,
                        detail=(
                            f"{node.get('model_type')}: no position limit declared; transformers' {default[0]} "
                            f"default max_position_embeddings is {chosen}"
                        ),
                    )
                )
                break
    shown = str(chosen) if chosen is not None else "unknown (no position limit declared)"
    return Fact(chosen, Decision(value=shown, evidence=evidence))


def model_vocab_size(meta: RepoMetadata) -> int | None:
    """The language model's vocabulary size: `vocab_size` at the root of config.json or in its language
    sub-config (text_config, llm_config, …; vision/audio towers skipped). None when undeclared or not a
    usable size (a wrongly typed or absurd value bounds nothing)."""
    for _path, node in meta.sub_configs():
        value = node.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_TOKEN_ID + 1:
            return value
    return None


def decide_quantization(meta: RepoMetadata) -> Fact:
    """Weight quantization as declared (`quantization` by MLX conversions, `quantization_config` by others)."""
    for key in ("quantization", "quantization_config"):
        block = meta.config.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise BadMetadata(f"config.json: {key} must be an object, got {type(block).__name__}")
        method = optional_str(block.get("quant_method"), "config.json", f"{key}.quant_method")
        quant = Quantization(
            bits=optional_int(block.get("bits"), "config.json", f"{key}.bits"),
            group_size=optional_int(block.get("group_size"), "config.json", f"{key}.group_size"),
            mode=optional_str(block.get("mode"), "config.json", f"{key}.mode")
            or method
            or ("affine" if key == "quantization" else None),
        )
        if quant.bits is None and quant.group_size is None and quant.mode is None:
            return Fact(
                None,
                Decision(
                    value=f"none usable ({key} is empty)",
                    evidence=[Evidence(source="config.json", field=key, detail="present but empty")],
                ),
            )
        detail = f"bits {quant.bits}, group size {quant.group_size}, mode {quant.mode}"
        conflicts = []
        if method and method not in ("mlx", "affine", "mxfp4", "nvfp4", "mxfp8"):
            conflicts.append(
                f"{key}.quant_method {method!r} is not an MLX quantization; mlx-lm may not load it"
            )
        return Fact(
            quant,
            Decision(
                value=detail,
                evidence=[Evidence(source="config.json", field=key, detail=detail)],
                conflicts=conflicts,
            ),
        )
    return Fact(None, Decision(value="none declared (full-precision weights)", evidence=[]))


# The weight modes whose layers MLX can also run with quantized activations (nn.QQLinear: mlx-lm's and
# mlx-vlm's `quantize_activations`); MLX computes them that way on CUDA only.
ACTIVATION_QUANTIZATION_MODES = ("mxfp8", "nvfp4")


def decide_activation_quantization(quant: Quantization | None) -> Fact | None:
    """Pin activation quantization for mxfp8/nvfp4 checkpoints (None: the weights' mode does not take it)."""
    if quant is None or quant.mode not in ACTIVATION_QUANTIZATION_MODES:
        return None
    return Fact(
        True,
        Decision(
            value="on (CUDA only)",
            evidence=[
                Evidence(
                    source="config.json",
                    field="quantization.mode",
                    detail=f"{quant.mode} weights: MLX quantizes activations too (QQLinear) on NVIDIA GPUs",
                    value=quant.mode,
                    strength="strong",
                )
            ],
        ),
    )


def decide_sampling(meta: RepoMetadata, model_ref: str) -> Fact:
    """Sampling defaults from generation_config.json."""
    gen = meta.generation_config
    file = "generation_config.json"
    params = Parameters(
        model=model_ref,
        temperature=optional_number(gen.get("temperature"), file, "temperature"),
        top_p=optional_number(gen.get("top_p"), file, "top_p"),
        top_k=optional_int(gen.get("top_k"), file, "top_k"),
        min_p=optional_number(gen.get("min_p"), file, "min_p"),
        repeat_penalty=optional_number(gen.get("repetition_penalty"), file, "repetition_penalty"),
    )
    evidence = [
        Evidence(source=file, field=key, detail=str(gen[key]))
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample")
        if key in gen
    ]
    do_sample = gen.get("do_sample")
    if do_sample is False and params.temperature is None:
        params.temperature = 0.0  # greedy by the model's own declaration
    shown = {k: v for k, v in params.model_dump().items() if k != "model" and v is not None}
    return Fact(
        params,
        Decision(
            value=", ".join(f"{k} {v}" for k, v in shown.items()) or "library defaults", evidence=evidence
        ),
    )


def decide_speculative(meta: RepoMetadata, tensor_names: list[str] | None) -> Fact:
    """Speculative-decoding options the checkpoint carries (bundled multi-token-prediction layers)."""
    evidence: list[Evidence] = []
    for path, node in meta.sub_configs():
        for key in _MTP_KEYS:
            value = node.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                field = f"{path}.{key}" if path else key
                evidence.append(Evidence(source="config.json", field=field, detail=f"{value} MTP layer(s)"))
    mtp_tensors = [n for n in tensor_names or [] if re.match(r"^(model\.|language_model\.)?mtp[._]", n)]
    if mtp_tensors:
        evidence.append(
            Evidence(
                source="model.safetensors.index.json",
                field="weight_map",
                detail=f"{len(mtp_tensors)} mtp.* tensors bundled",
            )
        )
    # Declared layers only count when the weights carry them (conversions often strip MTP tensors).
    has_mtp = bool(mtp_tensors) or (tensor_names is None and bool(evidence))
    conflicts = []
    if evidence and tensor_names is not None and not mtp_tensors:
        conflicts.append(
            "config declares MTP layers but the weights have no mtp.* tensors (stripped by the conversion)"
        )
    spec = Speculative(mtp=has_mtp, draft_kind="mtp" if has_mtp else None)
    value = "bundled MTP layers (self-speculative decoding)" if has_mtp else "none"
    return Fact(spec, Decision(value=value, evidence=evidence, conflicts=conflicts))


def decide_license(snapshot: RepoSnapshot) -> Fact:
    """License from the Hub card data, else from a `license:` tag."""
    facts = snapshot.facts
    if facts is not None:
        card_license = facts.card_data.get("license")
        if isinstance(card_license, str) and card_license:
            return Fact(
                card_license,
                Decision(
                    value=card_license,
                    evidence=[Evidence(source="hub", field="cardData.license", detail=card_license)],
                ),
            )
        for tag in facts.tags:
            if tag.startswith("license:"):
                value = tag.split(":", 1)[1]
                return Fact(
                    value, Decision(value=value, evidence=[Evidence(source="hub", field="tags", detail=tag)])
                )
    return Fact(None, Decision(value="unknown", evidence=[]))


def repo_files(snapshot: RepoSnapshot) -> tuple[list[RepoFile], int | None]:
    """Every file of the pinned revision with its size and hashes, and the total size."""
    files = []
    total = 0
    sizes_known = True
    for path in sorted(snapshot.listing):
        meta = snapshot.listing[path]
        sha256 = meta.sha256 if meta.sha256 and re.fullmatch(r"[0-9a-f]{64}", meta.sha256) else None
        files.append(RepoFile(path=path, size=meta.size, sha256=sha256, blob_id=meta.blob_id))
        if meta.size is None:
            sizes_known = False
        else:
            total += meta.size
    return files, (total if sizes_known and files else None)
