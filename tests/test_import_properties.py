"""Property-based: any metadata, however malformed, gives a valid config or one clean GalleryError."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallery.configfile import config_to_yaml, parse_config_text
from gallery.errors import GalleryError
from importers.build import build_config
from importers.fetch import FileMeta, HubFacts, RepoSnapshot
from importers.source import ModelSource

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300000) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
CONFIG_KEYS = [
    "model_type",
    "architectures",
    "eos_token_id",
    "max_position_embeddings",
    "vision_config",
    "audio_config",
    "text_config",
    "quantization",
    "quantization_config",
    "image_token_id",
    "num_nextn_predict_layers",
    "auto_map",
    "tie_word_embeddings",
]
TOKENIZER_KEYS = [
    "eos_token",
    "eot_token",
    "bos_token",
    "chat_template",
    "added_tokens_decoder",
    "image_token",
    "model_max_length",
    "pad_token",
]
GENERATION_KEYS = [
    "eos_token_id",
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "repetition_penalty",
    "min_p",
]
TEMPLATES = st.sampled_from(
    [
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "{{ raise_exception('nope') }}",
        "{% if %}",
        "{{ messages[0].content.upper() }}<think>",
        "",
    ]
)


def _object(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), JSON, max_size=len(keys))


@st.composite
def snapshots(draw: st.DrawFn) -> RepoSnapshot:
    files: dict[str, bytes] = {}
    config: Any = draw(_object(CONFIG_KEYS) | JSON)
    if draw(st.booleans()) and isinstance(config, dict):
        config["model_type"] = draw(
            st.sampled_from(["qwen3", "gemma3", "qwen2_vl", "llama", "whisper", "bert"])
        )
    files["config.json"] = draw(
        st.sampled_from([json.dumps(config).encode(), b"{not json", b"\xff\xfe", b"[]"])
    )
    if draw(st.booleans()):
        tok = draw(_object(TOKENIZER_KEYS))
        if draw(st.booleans()):
            tok["chat_template"] = draw(TEMPLATES)
        files["tokenizer_config.json"] = json.dumps(tok).encode()
    if draw(st.booleans()):
        files["generation_config.json"] = json.dumps(draw(_object(GENERATION_KEYS) | JSON)).encode()
    if draw(st.booleans()):
        files["chat_template.jinja"] = draw(TEMPLATES).encode()
    if draw(st.booleans()):
        files["chat_template.json"] = json.dumps({"chat_template": draw(JSON | TEMPLATES)}).encode()
    if draw(st.booleans()):
        files["model.safetensors.index.json"] = json.dumps(
            {
                "weight_map": draw(
                    st.dictionaries(
                        st.sampled_from(
                            ["vision_tower.x", "language_model.y", "mtp.z", "audio_tower.a", "lm_head.weight"]
                        ),
                        st.just("model.safetensors"),
                        max_size=4,
                    )
                    | JSON
                )
            }
        ).encode()
    listing = {path: FileMeta(path=path, size=len(data)) for path, data in files.items()}
    extra = draw(
        st.lists(
            st.sampled_from(
                [
                    "model.safetensors",
                    "model.gguf",
                    "model_index.json",
                    "preprocessor_config.json",
                    "tokenizer.json",
                ]
            ),
            max_size=3,
        )
    )
    for path in extra:
        listing.setdefault(path, FileMeta(path=path, size=draw(st.integers(0, 10**10))))
    facts = HubFacts(
        pipeline_tag=draw(
            st.sampled_from(
                [
                    None,
                    "text-generation",
                    "image-text-to-text",
                    "feature-extraction",
                    "any-to-any",
                    "text-to-image",
                ]
            )
        ),
        library_name=draw(st.sampled_from([None, "mlx", "transformers", "diffusers"])),
        tags=draw(
            st.lists(
                st.sampled_from(["mlx", "vision", "gguf", "sentence-transformers", "license:mit"]), max_size=3
            )
        ),
        card_data=draw(st.dictionaries(st.sampled_from(["license", "base_model"]), JSON, max_size=2)),
    )
    return RepoSnapshot(
        source=ModelSource(repo_id="org/model"),
        origin="hub",
        repo_id="org/model",
        commit="0" * 40,
        facts=facts,
        listing=listing,
        files=files,
        _head_reader=lambda path, start, end: b'{"added_tokens": [{"id": 7, "content": "<|im_end|>"}]}'[
            start : end + 1
        ],
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.sampled_from([None, None, "mlx", "mlx-vlm"]))
def test_importer_returns_a_valid_config_or_a_clean_error(
    snapshot: RepoSnapshot, backend: str | None
) -> None:
    try:
        result = build_config(snapshot, backend=backend)
    except GalleryError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        assert 1 < exc.exit_code < 20
        return
    config = result.config
    # whatever was decided survives the YAML round trip and the schema
    assert parse_config_text(config_to_yaml(config), filename="x") == config
    assert config.backend in ("mlx", "mlx-vlm")
    if config.mlx.chat_template.status == "pinned":
        assert config.mlx.chat_template.text
