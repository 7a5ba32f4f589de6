"""`gallery export`: a catalog entry as another tool's model file, carrying the pins.

- `localai`: LocalAI's model YAML. LocalAI has keys for most of what the config pins (backend, stop words,
  context size, use of the tokenizer's template, use cases, sampling defaults); the revision has none, so it
  travels as a `key:value` option (`revision:<commit>`), as do the tool-call and reasoning parsers LocalAI's own
  MLX importer sets (`tool_parser:…`, `reasoning_parser:…`, in LocalAI's vocabulary).
- `localai_gallery_data`: the whole catalog as a LocalAI gallery index (`catalog/localai-gallery.yaml`). LocalAI
  downloads each entry's `files` into its models folder by `filename` and writes `config_file` beside them, so
  every file is named `NAME/<file>` (one folder per entry: no two entries share a path) and
  `parameters.model` is that folder; the revision travels as the `revision:` option, which the runtime checks
  against the catalog entry pinned at that commit (whose sha256s LocalAI verified on download).
- `lmstudio`: LM Studio's `model.yaml` (model, base with a Hugging Face source, metadataOverrides with vision,
  reasoning, tool use and context length, config with sampling and load fields, and a thinking switch as a
  custom field that sets the template variable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from catalog.entry import Entry
from gallery.config import ModelConfig
from gallery.yamlio import dump_yaml

ExportFormat = Literal["localai", "lmstudio"]
EXPORT_FORMATS: tuple[str, ...] = ("localai", "lmstudio")

# The config's tool-call syntax (named after mlx-lm's parsers) in LocalAI's parser vocabulary (vLLM's names,
# as in LocalAI's core/config/parser_defaults.json). Syntaxes LocalAI has no parser for get no option.
_LOCALAI_TOOL_PARSERS = {
    "gemma4": "gemma4",
    "glm47": "glm47",
    "harmony": "openai",
    "json_tools": "hermes",
    "kimi_k2": "kimi_k2",
    "llama3_json": "llama3_json",
    "minimax_m2": "minimax_m2",
    "mistral": "mistral",
    "pythonic": "pythonic",
    "qwen3_coder": "qwen3_xml",
}


def localai_reasoning_parser(config: ModelConfig) -> str | None:
    """LocalAI's reasoning parser for the config's reasoning markers (None when it does not reason)."""
    reasoning = config.mlx.reasoning
    if not reasoning.supported or not reasoning.start:
        return None
    start, model_type = reasoning.start, (config.mlx.model_type or "").lower()
    if start == "<think>":
        return "qwen3" if model_type.startswith("qwen3") else "deepseek_r1"
    if start.startswith("<|channel>"):
        return "gemma4"
    if start == "[THINK]":
        return "mistral"
    if start.startswith("<|channel|>") or config.mlx.tool_calls.format == "harmony":
        return "openai_gptoss"
    return None


def localai_options(config: ModelConfig) -> list[str]:
    """The config's options plus the revision and the parsers, as LocalAI `key:value` strings."""
    options = list(config.options)
    keys = {option.split(":", 1)[0] for option in options}
    source = config.mlx.source
    if source.revision and "revision" not in keys:
        options.append(f"revision:{source.revision}")
    tool_parser = _LOCALAI_TOOL_PARSERS.get(config.mlx.tool_calls.format or "")
    if tool_parser and "tool_parser" not in keys:
        options.append(f"tool_parser:{tool_parser}")
    reasoning_parser = localai_reasoning_parser(config)
    if reasoning_parser and "reasoning_parser" not in keys:
        options.append(f"reasoning_parser:{reasoning_parser}")
    return options


def localai_data(entry: Entry, *, model_path: Path | None = None) -> dict[str, Any]:
    """The LocalAI model config for an entry; `model_path` (an installed folder) replaces the repo id."""
    config = entry.config
    source = config.mlx.source
    parameters = {key: value for key, value in config.parameters.model_dump().items() if value is not None}
    parameters["model"] = (
        str(model_path) if model_path is not None else (source.repo or config.parameters.model)
    )
    data: dict[str, Any] = {
        "name": config.name,
        "backend": config.backend,
        "description": entry.meta.description or config.description,
        "license": config.license,
        "context_size": config.context_size,
        "parameters": parameters,
        "stopwords": list(config.stopwords),
        "template": {"use_tokenizer_template": True},
        "known_usecases": list(config.known_usecases),
        "options": localai_options(config),
    }
    return {key: value for key, value in data.items() if value not in (None, [], {})}


LOCALAI_GALLERY_FILE = "localai-gallery.yaml"
LOCALAI_GALLERY_HEADER = (
    "# A LocalAI gallery of this catalog, generated from index.yaml by `python -m fixtures.catalog_seed` (do not\n"
    "# edit). LocalAI puts each entry's files in <models>/<name>/ and loads them with the mlx / mlx-vlm backend at\n"
    "# the pinned revision. Add it to LocalAI as a gallery (README: The catalog).\n"
)


def localai_gallery_entry(entry: Entry) -> dict[str, Any]:
    """One LocalAI gallery entry: the index fields, the files under `NAME/`, the model YAML pointing there."""
    meta = entry.meta
    data: dict[str, Any] = {"name": entry.name}
    for key in ("description", "license", "icon"):
        value = getattr(meta, key)
        if value:
            data[key] = value
    for key in ("tags", "urls"):
        value = getattr(meta, key)
        if value:
            data[key] = list(value)
    data["files"] = [
        {"filename": f"{entry.name}/{file.filename}", "sha256": file.sha256, "uri": file.uri}
        for file in meta.files
    ]
    data["config_file"] = localai_data(entry, model_path=Path(entry.name))
    return data


def localai_gallery_data(entries: list[Entry]) -> list[dict[str, Any]]:
    """A LocalAI gallery index of the entries (see the module docstring)."""
    return [localai_gallery_entry(entry) for entry in entries]


def localai_gallery_text(entries: list[Entry]) -> str:
    """The LocalAI gallery index as the text of `catalog/localai-gallery.yaml`."""
    return LOCALAI_GALLERY_HEADER + dump_yaml(localai_gallery_data(entries))


def lmstudio_data(entry: Entry) -> dict[str, Any]:
    """LM Studio's model.yaml for an entry (its documented core fields only)."""
    config = entry.config
    source = config.mlx.source
    repo = source.repo or config.parameters.model
    user, _, name = repo.partition("/")
    metadata: dict[str, Any] = {
        "domain": "llm",
        "architectures": [config.mlx.model_type] if config.mlx.model_type else [],
        "compatibilityTypes": ["safetensors"],
        "minMemoryUsageBytes": config.mlx.total_size,
        "contextLengths": [config.context_size] if config.context_size else [],
        "vision": bool(config.mlx.media.image),
        "reasoning": bool(config.mlx.reasoning.supported),
        "trainedForToolUse": bool(config.mlx.tool_calls.format),
    }
    params = config.parameters
    operation: list[dict[str, Any]] = []
    if params.temperature is not None:
        operation.append({"key": "llm.prediction.temperature", "value": params.temperature})
    if params.top_k is not None:
        operation.append({"key": "llm.prediction.topKSampling", "value": params.top_k})
    if params.top_p is not None:
        operation.append(
            {"key": "llm.prediction.topPSampling", "value": {"checked": True, "value": params.top_p}}
        )
    if params.min_p is not None:
        operation.append(
            {"key": "llm.prediction.minPSampling", "value": {"checked": True, "value": params.min_p}}
        )
    load = [{"key": "llm.load.contextLength", "value": config.context_size}] if config.context_size else []
    data: dict[str, Any] = {
        "model": f"{user}/{config.name}" if name else config.name,
        "base": [
            {"key": repo.lower(), "sources": [{"type": "huggingface", "user": user, "repo": name or repo}]}
        ],
        "metadataOverrides": {k: v for k, v in metadata.items() if v not in (None, [])},
        "config": {
            key: {"fields": fields} for key, fields in (("operation", operation), ("load", load)) if fields
        },
    }
    reasoning = config.mlx.reasoning
    if reasoning.supported and reasoning.switch:
        data["customFields"] = [
            {
                "key": "enableThinking",
                "displayName": "Enable Thinking",
                "description": "Whether the model reasons before it answers",
                "type": "boolean",
                "defaultValue": reasoning.default_enabled is not False,
                "effects": [{"type": "setJinjaVariable", "variable": reasoning.switch}],
            }
        ]
    if not data["config"]:
        del data["config"]
    return data


def export_entry(entry: Entry, output: ExportFormat = "localai", *, model_path: Path | None = None) -> str:
    """The entry exported in `output` format, as text."""
    source = entry.config.mlx.source
    template = entry.config.mlx.chat_template
    if output == "lmstudio":
        header = [f"# LM Studio model.yaml for {entry.name}, exported by mlx-gallery."]
        if source.repo and source.revision:
            header.append(
                f"# Pinned: {source.repo}@{source.revision} (LM Studio downloads the default branch)"
            )
        return "\n".join(header) + "\n" + dump_yaml(lmstudio_data(entry))
    if output != "localai":  # the CLI restricts the choice; a library caller gets a clear error
        raise ValueError(f"unknown export format {output!r}")
    header = [f"# LocalAI model config for {entry.name}, exported by mlx-gallery."]
    if source.repo and source.revision:
        header.append(f"# Pinned: {source.repo}@{source.revision}")
    if template.sha256:
        header.append(
            f"# Chat template sha256: {template.sha256} (the tokenizer's template at that revision)"
        )
    return "\n".join(header) + "\n" + dump_yaml(localai_data(entry, model_path=model_path))
