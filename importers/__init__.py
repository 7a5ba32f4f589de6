"""Import Hugging Face repos (or local folders) into pinned, explained ModelConfigs."""

from importers.build import ImportResult, build_config, import_model
from importers.source import ModelSource, parse_source

__all__ = ["ImportResult", "ModelSource", "build_config", "import_model", "parse_source"]
