"""Read and write ModelConfig files (YAML or JSON), with schema errors that point at a file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gallery.config import ModelConfig
from gallery.errors import BadConfig
from gallery.yamlio import (
    YamlDocument,
    YamlError,
    atomic_write,
    dump_yaml,
    read_yaml_document,
    read_yaml_file,
)

MAX_CONFIG_BYTES = 8 * 1024 * 1024


def config_to_yaml(config: ModelConfig) -> str:
    """The config as deterministic YAML (schema key order, templates as block literals)."""
    return dump_yaml(config.to_data())


def config_to_json(config: ModelConfig) -> str:
    """The config as indented JSON in schema key order."""
    return json.dumps(config.to_data(), indent=2, ensure_ascii=False) + "\n"


def schema_errors(exc: ValidationError) -> list[tuple[tuple[Any, ...], str, str, Any]]:
    """(location, error type, message, input) per pydantic error, with pydantic's phrasing made plain."""
    found = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        kind = str(error.get("type", ""))
        text = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            text = "unknown key (typo?)"
        elif kind == "missing":
            text = "required key is missing"
        found.append((loc, kind, text, error.get("input")))
    return found


def config_from_document(doc: YamlDocument, *, filename: str, prefix: tuple[Any, ...] = ()) -> ModelConfig:
    """Validate a parsed document (or the mapping at `prefix` inside it) as a ModelConfig.

    Raises BadConfig naming the file, line and field of the first problem (and how many more there are).
    """
    if doc.duplicates:
        _key, line, message = doc.duplicates[0]
        raise BadConfig(message, file=filename, line=line)
    data = doc.data
    for key in prefix:
        data = data[key]
    if not isinstance(data, dict):
        raise BadConfig(
            f"a model config must be a mapping, got {type(data).__name__}",
            file=filename,
            line=doc.line(*prefix) if prefix else None,
        )
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems = schema_errors(exc)
        loc, _kind, text, _input = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        where = ".".join(str(part) for part in loc) or "(top level)"
        raise BadConfig(text + more, file=filename, line=doc.line(*prefix, *loc), field=where) from None


def parse_config_text(text: str, *, filename: str) -> ModelConfig:
    """Parse YAML (or JSON, which is YAML) text into a validated config."""
    try:
        doc = read_yaml_document(text)
    except YamlError as exc:
        raise BadConfig(str(exc), file=filename, line=exc.line) from None
    return config_from_document(doc, filename=filename)


def read_config(path: str | Path) -> ModelConfig:
    """Read a config file. Raises BadConfig for a missing, oversized, unreadable or invalid file."""
    return config_from_document(
        read_yaml_file(path, limit=MAX_CONFIG_BYTES, what="model config"), filename=str(path)
    )


def write_config(
    config: ModelConfig, path: str | Path, *, overwrite: bool = False, as_json: bool = False
) -> None:
    """Write a config atomically; never replaces an existing file unless overwrite (OutputExists)."""
    text = config_to_json(config) if as_json else config_to_yaml(config)
    atomic_write(Path(path), text, overwrite=overwrite)
