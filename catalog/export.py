"""`gallery export`: turn a catalog entry into a LocalAI model YAML that carries the pins.

LocalAI's model YAML has keys for most of what the config pins (backend, stop words, context size, use of the
tokenizer's template, use cases, sampling defaults); the revision has none, so it travels as a `key:value`
option (`revision:<commit>`), which LocalAI's MLX backends accept and ignore if unknown, and in a header
comment together with the template's sha256. Unknown keys are ignored by LocalAI, so nothing else is added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from catalog.index import Entry
from gallery.yamlio import dump_yaml

ExportFormat = Literal["localai"]


def localai_data(entry: Entry, *, model_path: Path | None = None) -> dict[str, Any]:
    """The LocalAI model config for an entry; `model_path` (an installed folder) replaces the repo id."""
    config = entry.config
    source = config.mlx.source
    parameters = {key: value for key, value in config.parameters.model_dump().items() if value is not None}
    parameters["model"] = (
        str(model_path) if model_path is not None else (source.repo or config.parameters.model)
    )
    options = list(config.options)
    if source.revision and not any(option.startswith("revision:") for option in options):
        options.append(f"revision:{source.revision}")
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
        "options": options,
    }
    return {key: value for key, value in data.items() if value not in (None, [], {})}


def export_entry(entry: Entry, output: ExportFormat = "localai", *, model_path: Path | None = None) -> str:
    """The entry exported in `output` format, as text."""
    if output != "localai":  # the CLI restricts the choice; a library caller gets a clear error
        raise ValueError(f"unknown export format {output!r}")
    source = entry.config.mlx.source
    template = entry.config.mlx.chat_template
    header = [f"# LocalAI model config for {entry.name}, exported by mlx-gallery."]
    if source.repo and source.revision:
        header.append(f"# Pinned: {source.repo}@{source.revision}")
    if template.sha256:
        header.append(
            f"# Chat template sha256: {template.sha256} (the tokenizer's template at that revision)"
        )
    return "\n".join(header) + "\n" + dump_yaml(localai_data(entry, model_path=model_path))
