"""Pytest plugin: the tiny real MLX models from ``fixtures/build_models.py`` as session fixtures.

``fixture_models`` builds (only if needed) and returns every model folder by name; one fixture per model
(``scripted_text_model``, ``vlm_model``, ``mtp_vlm_model``, ``audio_vlm_model``, ``smollm2_model``, ...)
returns a single folder and builds only that one. Each fixture skips, rather than fails, where MLX is not
installed, so the importer and catalog tests still run on any machine. Folders carry a ``fixture.json``; read it with :func:`fixture_info`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Model name -> fixture name. The random tiny VLM is plain ``vlm_model``; the rest follow their name.
MODEL_FIXTURES: dict[str, str] = {
    "text-qwen3": "text_qwen3_model",
    "text-qwen2": "text_qwen2_model",
    "scripted-text": "scripted_text_model",
    "scripted-think": "scripted_think_model",
    "scripted-textthink": "scripted_textthink_model",
    "scripted-tool": "scripted_tool_model",
    "scripted-toolloop": "scripted_toolloop_model",
    "text-notemplate": "text_notemplate_model",
    "vlm-qwen2vl": "vlm_model",
    "scripted-vlm": "scripted_vlm_model",
    "vlm-qwen35-mtp": "mtp_vlm_model",
    "vlm-gemma4-audio": "audio_vlm_model",
    "drafter-qwen35-dflash": "dflash_drafter_model",
    "drafter-gemma4-assistant": "gemma4_assistant_model",
    "smollm2": "smollm2_model",
}


def fixture_info(folder: Path) -> dict[str, Any]:
    """The ``fixture.json`` of a built model folder (what it is, and what a scripted one says)."""
    from fixtures.build_models import load_fixture_info

    return load_fixture_info(folder)


def _require_mlx(kind: str = "text") -> None:
    """Skip the requesting test unless MLX and the loader the model needs are importable."""
    pytest.importorskip("mlx")
    pytest.importorskip("mlx_lm")
    if kind in ("vlm", "drafter"):
        pytest.importorskip("mlx_vlm")


@pytest.fixture(scope="session")
def fixture_models() -> dict[str, Path]:
    """Every fixture model folder by name, built first if missing or stale."""
    _require_mlx("vlm")
    from fixtures.build_models import ensure_models

    return ensure_models()


def _model_fixture(name: str, fixture_name: str) -> Callable[[], Path]:
    """A session fixture returning the folder of model ``name`` (building just that model if needed)."""

    @pytest.fixture(scope="session", name=fixture_name)
    def _fixture() -> Path:
        from fixtures.build_models import SPECS, ensure_models

        _require_mlx(SPECS[name].kind)
        return ensure_models([name])[name]

    _fixture.__doc__ = f"Folder of the {name!r} fixture model (see fixtures/build_models.py)."
    return _fixture


# Plain module-level names: that is how pytest discovers a plugin's fixtures (and how readers grep them).
text_qwen3_model = _model_fixture("text-qwen3", "text_qwen3_model")
text_qwen2_model = _model_fixture("text-qwen2", "text_qwen2_model")
scripted_text_model = _model_fixture("scripted-text", "scripted_text_model")
scripted_think_model = _model_fixture("scripted-think", "scripted_think_model")
scripted_textthink_model = _model_fixture("scripted-textthink", "scripted_textthink_model")
scripted_tool_model = _model_fixture("scripted-tool", "scripted_tool_model")
scripted_toolloop_model = _model_fixture("scripted-toolloop", "scripted_toolloop_model")
text_notemplate_model = _model_fixture("text-notemplate", "text_notemplate_model")
vlm_model = _model_fixture("vlm-qwen2vl", "vlm_model")
scripted_vlm_model = _model_fixture("scripted-vlm", "scripted_vlm_model")
mtp_vlm_model = _model_fixture("vlm-qwen35-mtp", "mtp_vlm_model")
audio_vlm_model = _model_fixture("vlm-gemma4-audio", "audio_vlm_model")
dflash_drafter_model = _model_fixture("drafter-qwen35-dflash", "dflash_drafter_model")
gemma4_assistant_model = _model_fixture("drafter-gemma4-assistant", "gemma4_assistant_model")
smollm2_model = _model_fixture("smollm2", "smollm2_model")
