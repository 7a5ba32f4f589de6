"""Pytest fixtures serving the recorded hub (fixtures/hub) over real HTTP on loopback.

- `hub`: a fresh RecordedHub per test; mutate it, inject faults, read its request stats freely.
- `hub_session`: one RecordedHub for the whole session; read-only use (no write_file/delete_file/inject), and
  do not rely on `requests` being empty, other tests share it.
- `hub_factory`: start hubs with custom options (latency, tokens, extra_repos); all stopped after the test.
- `hub_token`: the token the recorded hub accepts (gated repos need it).

Pass `endpoint=hub.url` to huggingface_hub explicitly (HfApi(endpoint=...), hf_hub_download(..., endpoint=...)):
the client reads HF_ENDPOINT only at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fixtures.hubserver import DEFAULT_TOKEN, RecordedHub


@pytest.fixture
def hub() -> Iterator[RecordedHub]:
    """A RecordedHub started for this test and stopped after it."""
    with RecordedHub() as server:
        yield server


@pytest.fixture(scope="session")
def hub_session() -> Iterator[RecordedHub]:
    """One RecordedHub shared by the whole session (read-only use)."""
    with RecordedHub() as server:
        yield server


@pytest.fixture
def hub_factory() -> Iterator[Callable[..., RecordedHub]]:
    """Start RecordedHubs with custom keyword arguments; every one is stopped when the test ends."""
    started: list[RecordedHub] = []

    def make(**kwargs: Any) -> RecordedHub:
        server = RecordedHub(**kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def hub_token() -> str:
    """The access token the recorded hub accepts."""
    return DEFAULT_TOKEN
