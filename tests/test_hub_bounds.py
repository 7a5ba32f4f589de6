"""Hub and catalog bounds (issue 25, item 11): the documented timeout holds for model info, an outage while a
model is imported on the fly is a retryable 503 / -32007 (not a 400), and `gallery validate` stays linear in a
long `stopwords` list.

Real parts: the loopback recorded Hub (fixtures/hubserver.py) with faults injected, the real huggingface_hub
client behind gallery.hub, the runtime as a real HTTP and stdio process, and the real validator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.hubserver import RecordedHub
from gallery.errors import NetworkFailure
from tests.interfaces_support import HttpProcess, StdioProcess, running, runtime_env

ROOT = Path(__file__).resolve().parents[1]


def test_model_info_waits_the_api_timeout_not_the_download_timeout(hub_env: RecordedHub, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from gallery.hub import model_info

    # The Hub answers model info only after 8 s; API answers may take 1 s (HF_HUB_ETAG_TIMEOUT), file bodies
    # 60 s. Model info is an API answer: the call fails after its 1 s instead of waiting the answer out.
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "60")
    monkeypatch.setenv("GALLERY_HTTP_ATTEMPTS", "1")
    hub_env.inject(r"^/api/models/", delay=8, count=1)
    with pytest.raises(NetworkFailure, match="did not answer in time"):
        model_info("Qwen/Qwen3-4B", None, token=None)
    assert model_info("Qwen/Qwen3-4B", None, token=None).id == "Qwen/Qwen3-4B"  # answered in time: fine


def _outage_env(hub: RecordedHub, home: Path) -> dict[str, str]:
    hub.inject(r".", status=503, count=10_000, headers={"Retry-After": "0"})
    return runtime_env(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(home),
        GALLERY_HTTP_ATTEMPTS="2",
        GALLERY_HTTP_BACKOFF="0.01",
    )


@pytest.mark.mlx
def test_a_hub_outage_during_an_any_model_import_is_a_retryable_503(
    hub: RecordedHub, scripted_text_model: Path, tmp_path: Path
) -> None:
    import httpx

    env = _outage_env(hub, tmp_path)
    with running(HttpProcess(str(scripted_text_model), "--any-model", "--quiet", env=env)) as process:
        assert isinstance(process, HttpProcess)
        answer = httpx.post(
            f"{process.url}/v1/chat/completions",
            json={"model": "Qwen/Qwen3-4B", "messages": [{"role": "user", "content": "hi"}]},
            timeout=120,
        )
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "hub_unavailable" and answer.headers["retry-after"]
        assert "503" in answer.json()["error"]["message"]
        served = httpx.post(
            f"{process.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert served.status_code == 200, served.text  # the served model is unaffected


def test_a_hub_outage_during_a_stdio_load_is_unavailable(hub: RecordedHub, tmp_path: Path) -> None:
    with running(StdioProcess(env=_outage_env(hub, tmp_path))) as process:
        assert isinstance(process, StdioProcess)
        response = process.call("load", {"model": "Qwen/Qwen3-4B"}, timeout=120)
        assert response["error"]["code"] == -32007, response
        assert response["error"]["data"]["kind"] == "hub_unavailable", response


def test_validate_is_linear_in_a_long_stopwords_list(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from catalog import index
    from catalog.validate import validate_paths

    doc: dict[str, Any] = yaml.safe_load((ROOT / "catalog/entries/gemma-3-4b-it-text-4bit.yaml").read_text())
    count = 2000
    doc["stopwords"] = [*doc["stopwords"], *range(count)]  # each a schema error, each on its own line
    path = tmp_path / "long-stopwords.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    comparisons = 0
    equal = index.Problem.__eq__

    def counting(self: Any, other: Any) -> Any:
        nonlocal comparisons
        comparisons += 1
        return equal(self, other)

    # Counted, not timed: deduplicating by comparing each problem with every earlier one was quadratic
    # (15,000 entries: 112 M comparisons, a minute); with a set each problem is compared a bounded number of times.
    monkeypatch.setattr(index.Problem, "__eq__", counting)
    report = validate_paths([path])
    errors = [p for p in report.problems if p.severity == "error"]
    assert len(errors) == count and all("stopwords." in p.message for p in errors)
    assert len({p.line for p in errors}) == count  # each at its own line
    assert comparisons < 4 * count, comparisons


def test_a_hub_outage_during_a_grpc_load_model_names_the_retryable_fault(
    hub: RecordedHub, tmp_path: Path
) -> None:
    from runtime.proto import backend_pb2 as pb
    from tests.interfaces_support import GrpcProcess

    with running(GrpcProcess(env=_outage_env(hub, tmp_path))) as process:
        assert isinstance(process, GrpcProcess)
        # LocalAI's LoadModel answers failures as success=false; the fault kind travels in trailing metadata.
        result, call = process.stub.LoadModel.with_call(pb.ModelOptions(Model="Qwen/Qwen3-4B"), timeout=120)
        assert not result.success and "503" in result.message, result
        assert ("x-gallery-fault", "hub_unavailable") in tuple(call.trailing_metadata()), (
            call.trailing_metadata()
        )
