"""Test-wide set-up: an isolated Hugging Face home, and the shared fixtures (recorded hub, tiny models)."""

from __future__ import annotations

import os
import signal
import tempfile

# huggingface_hub reads its environment at import time, so isolate it before anything imports it:
# no test may touch the user's cache or token, or reach the real Hub.
_HF_HOME = tempfile.mkdtemp(prefix="gallery-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_ENDPOINT", None)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_ETAG_TIMEOUT"] = "5"
# The user-level catalog (`gallery add`/`pull` without --catalog) goes here, never into the real home.
os.environ["GALLERY_HOME"] = tempfile.mkdtemp(prefix="gallery-tests-home-")
os.environ.pop("GALLERY_CATALOG", None)
os.environ.pop("GALLERY_MODELS_DIR", None)

# A suite started in the background (`cmd &`, nohup) inherits SIGINT ignored, and so would every child the
# tests start: the Ctrl-C tests would then test nothing. Children get the default action back on exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["tests.plugins.hub", "tests.plugins.models"]


import pytest  # noqa: E402


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Point the importer at a fresh loopback hub with an empty Hugging Face cache of its own."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("GALLERY_HTTP_BACKOFF", "0.01")
    return hub
