"""Distributed VLMs are refused by name: the model type and the reason (issue 24, item 6).

mlx-vlm 0.7.10 defines no `shard()` / `pipeline()` for the fixture types (qwen2_vl, qwen3_5, gemma4); for the
types it can split, the runtime still cannot mirror media embeddings across ranks. Both are read from the
installed mlx-vlm package, recorded by the importer as evidence, and said by `plan_sharding` (validate, serve
and load all ask it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gallery.sharding import ShardingRefused, plan_sharding

pytestmark = pytest.mark.mlx


@pytest.mark.parametrize(
    ("fixture", "model_type"),
    [("vlm_model", "qwen2_vl"), ("mtp_vlm_model", "qwen3_5"), ("audio_vlm_model", "gemma4")],
)
def test_fixture_vlms_are_refused_naming_their_type(
    fixture: str, model_type: str, request: pytest.FixtureRequest
) -> None:
    from importers import import_model

    folder: Path = request.getfixturevalue(fixture)
    config = import_model(str(folder)).config
    decision = config.mlx.decisions["sharding"]
    assert decision.value == "not supported"
    assert decision.evidence[0].source == f"mlx_vlm/models/{model_type}/"
    assert f"has no sharding for model type {model_type}" in decision.evidence[0].detail
    with pytest.raises(ShardingRefused) as caught:
        plan_sharding(config, ranks=2)
    message = str(caught.value)
    assert (
        f"has no sharding for model type {model_type}" in message
        and "neither shard() nor pipeline()" in message
    )
    assert "\n" not in message


def test_a_type_mlx_vlm_can_split_is_still_refused_for_its_media(vlm_model: Path) -> None:
    from importers import import_model

    config = import_model(str(vlm_model)).config
    # qwen3_vl_moe's package defines Model.shard in mlx-vlm 0.7.10: the language model could be split.
    moe = config.model_copy(update={"mlx": config.mlx.model_copy(update={"model_type": "qwen3_vl_moe"})})
    with pytest.raises(
        ShardingRefused, match=r"media embeddings cannot be mirrored yet: mlx-vlm .* can split qwen3_vl_moe"
    ):
        plan_sharding(moe, ranks=2)
