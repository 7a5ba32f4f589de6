"""The sharding decision: whether mlx-lm can split this model across processes, pipeline or tensor.

Evidence is the installed mlx-lm class itself (the method exists or not) plus the layer and head counts
that the strategies divide; `validate` and `serve --hosts` refuse what this record rules out.
"""

from __future__ import annotations

from gallery.config import Decision, Evidence, Sharding
from gallery.families import library_version, sharding_methods
from importers.facts import Fact
from importers.metadata import RepoMetadata, optional_int


def _shape(meta: RepoMetadata) -> tuple[int | None, int | None, int | None]:
    """(layers, attention heads, key/value heads) of the language model, from the first config that has them."""
    for path, node in meta.sub_configs():
        prefix = f"{path}." if path else ""
        layers = optional_int(node.get("num_hidden_layers"), "config.json", f"{prefix}num_hidden_layers")
        heads = optional_int(node.get("num_attention_heads"), "config.json", f"{prefix}num_attention_heads")
        if layers is None and heads is None:
            continue
        kv = optional_int(node.get("num_key_value_heads"), "config.json", f"{prefix}num_key_value_heads")
        return layers, heads, kv if kv is not None else heads
    return None, None, None


def _vlm_decision(meta: RepoMetadata, model_type: str | None) -> Decision:
    """Not supported, with what mlx-vlm's package for the type offers (the runtime refuses VLMs either way)."""
    methods = sharding_methods(meta.config, "mlx-vlm") if model_type else None
    version = library_version("mlx-vlm")
    where = f"mlx-vlm {version}" if version else "mlx-vlm"
    if methods is None:
        detail = f"{where} has no model package for {model_type or 'this model'}"
        source = "mlx-vlm"
    elif methods.pipeline or methods.tensor:
        kinds = " and ".join(
            k for k, ok in (("pipeline()", methods.pipeline), ("shard()", methods.tensor)) if ok
        )
        detail = (
            f"{where} has {kinds} for {model_type}'s language model, but media embeddings cannot be mirrored "
            "across ranks yet (the runtime serves VLMs on one machine)"
        )
        source = methods.source
    else:
        detail = f"{where} has no sharding for model type {model_type}: neither shard() nor pipeline()"
        source = methods.source
    return Decision(
        value="not supported", evidence=[Evidence(source=source, detail=detail, strength="decisive")]
    )


def decide_sharding(meta: RepoMetadata, backend: str, model_type: str | None) -> Fact:
    """Sharding support for a text config (None for mlx-vlm configs: the runtime serves VLMs on one machine)."""
    if backend != "mlx":
        return Fact(None, _vlm_decision(meta, model_type))
    methods = sharding_methods(meta.config) if model_type else None
    version = library_version("mlx-lm")
    if methods is None:
        detail = (
            "mlx-lm is not installed"
            if version is None
            else f"mlx-lm {version} has no module for {model_type}"
        )
        return Fact(None, Decision(value="unknown", evidence=[Evidence(source="mlx-lm", detail=detail)]))
    layers, heads, kv = _shape(meta)
    sharding = Sharding(
        pipeline=methods.pipeline,
        tensor=methods.tensor,
        library=version,
        layers=layers if layers and layers > 0 else None,
        attention_heads=heads if heads and heads > 0 else None,
        kv_heads=kv if kv and kv > 0 else None,
    )
    evidence = [
        Evidence(
            source=methods.source,
            field="pipeline",
            detail=("has" if methods.pipeline else "has no")
            + " model.pipeline(group) (pipeline parallelism)",
        ),
        Evidence(
            source=methods.source,
            field="Model.shard",
            detail=("has" if methods.tensor else "has no") + " Model.shard(group) (tensor parallelism)",
        ),
    ]
    if layers or heads:
        evidence.append(
            Evidence(
                source="config.json",
                field="num_hidden_layers",
                detail=f"{layers} layers, {heads} attention heads, {kv} key/value heads",
            )
        )
    kinds = [kind for kind, ok in (("pipeline", methods.pipeline), ("tensor", methods.tensor)) if ok]
    return Fact(sharding, Decision(value=", ".join(kinds) or "none", evidence=evidence))
