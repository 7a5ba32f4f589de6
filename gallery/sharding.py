"""Whether a config can be served across several processes, and how: one check for validate, serve and load.

mlx-lm splits a model one of two ways, and only for the classes that implement it: pipeline (each rank
holds a contiguous run of layers: `model.model.pipeline(group)`) or tensor (each rank holds a slice of
every layer's matrices: `model.shard(group)`, which divides the attention heads). The importer records
which methods the class has (`mlx.sharding`); everything here works from that record and the
`distributed:` section, without importing MLX.
"""

from __future__ import annotations

import dataclasses

from gallery.config import ModelConfig
from gallery.errors import UnsupportedModel
from gallery.families import library_version, sharding_methods

STRATEGIES = ("auto", "pipeline", "tensor")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How one model is split: the strategy, the number of ranks and (pipeline) the layers per rank."""

    strategy: str  # "pipeline" or "tensor"
    ranks: int
    layer_split: tuple[int, ...] | None = None  # rank 0 first; None: mlx-lm's even split


class ShardingRefused(UnsupportedModel):
    """A config cannot be served with the distributed settings asked for; the message says why (exit 10)."""


def parse_split(text: str) -> tuple[int, ...]:
    """Layers per rank from '3,1' (rank 0 first). Raises ShardingRefused on anything else."""
    try:
        split = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        raise ShardingRefused(
            f"layer split {text!r} must be whole numbers separated by commas, e.g. 12,12"
        ) from None
    return split


def vlm_refusal(config: ModelConfig) -> str:
    """Why an mlx-vlm config cannot be served across processes, naming its model type and the reason.

    mlx-vlm 0.7's own sharded load splits a VLM only where its classes define `shard` / `pipeline`; where they
    do, the towers would still run on every rank and the media embeddings would have to reach the other
    ranks' batches, which this runtime does not do yet.
    """
    kind = config.mlx.model_type or "unknown"
    methods = sharding_methods({"model_type": kind}, "mlx-vlm") if config.mlx.model_type else None
    version = library_version("mlx-vlm")
    where = f"mlx-vlm {version}" if version else "mlx-vlm"
    if methods is None or not (methods.pipeline or methods.tensor):
        source = f" ({methods.source} defines neither shard() nor pipeline())" if methods else ""
        return (
            f"{config.name}: {where} has no sharding for model type {kind}{source}: serve it on one machine"
        )
    return (
        f"{config.name}: media embeddings cannot be mirrored yet: {where} can split {kind}'s language model, "
        "but this runtime does not run the towers on rank 0 and send their embeddings to the other ranks; "
        "serve it on one machine"
    )


def plan_sharding(
    config: ModelConfig,
    *,
    ranks: int | None,
    strategy: str = "auto",
    layer_split: tuple[int, ...] | None = None,
) -> ShardPlan:
    """The plan for serving config on `ranks` processes (None: not known yet). Raises ShardingRefused."""
    name = config.name
    if strategy not in STRATEGIES:
        raise ShardingRefused(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if config.backend != "mlx":
        raise ShardingRefused(vlm_refusal(config))
    sharding = config.mlx.sharding
    if sharding is None:
        raise ShardingRefused(
            f"{name} does not record whether mlx-lm can shard it (imported before distributed serving): "
            "re-import it with `gallery import`"
        )
    kind = config.mlx.model_type or "this model type"
    where = f"mlx-lm{' ' + sharding.library if sharding.library else ''}"
    if strategy == "auto":
        if sharding.pipeline:
            strategy = "pipeline"
        elif sharding.tensor:
            strategy = "tensor"
        else:
            raise ShardingRefused(
                f"{name}: {where}'s {kind} class supports neither pipeline nor tensor sharding"
            )
    elif strategy == "pipeline" and not sharding.pipeline:
        alternative = " (it supports tensor: strategy tensor)" if sharding.tensor else ""
        raise ShardingRefused(f"{name}: {where}'s {kind} class has no pipeline() method{alternative}")
    elif strategy == "tensor" and not sharding.tensor:
        alternative = " (it supports pipeline: strategy pipeline)" if sharding.pipeline else ""
        raise ShardingRefused(f"{name}: {where}'s {kind} class has no shard() method{alternative}")
    if strategy == "tensor" and layer_split:
        raise ShardingRefused("layer_split is for the pipeline strategy; tensor mode splits every layer")
    if ranks is not None:
        if ranks < 2:
            raise ShardingRefused(f"distributed serving needs at least 2 ranks, got {ranks}")
        if strategy == "tensor":
            for label, heads in (
                ("attention heads", sharding.attention_heads),
                ("key/value heads", sharding.kv_heads),
            ):
                if heads is not None and heads % ranks:
                    raise ShardingRefused(
                        f"{name}: tensor mode divides the {label} across ranks, and {heads} is not divisible "
                        f"by {ranks}" + (" (pipeline works)" if sharding.pipeline else "")
                    )
        if strategy == "pipeline":
            layers = sharding.layers
            if layers is not None and layers < ranks:
                raise ShardingRefused(f"{name} has {layers} layers: too few for {ranks} pipeline ranks")
            if layer_split is not None:
                if len(layer_split) != ranks:
                    raise ShardingRefused(f"layer_split has {len(layer_split)} entries for {ranks} ranks")
                if any(count <= 0 for count in layer_split):
                    raise ShardingRefused(
                        f"layer_split {list(layer_split)}: every rank needs at least one layer"
                    )
                if layers is not None and sum(layer_split) != layers:
                    raise ShardingRefused(
                        f"layer_split {list(layer_split)} sums to {sum(layer_split)}, but {name} has {layers} layers"
                    )
    return ShardPlan(strategy=strategy, ranks=ranks or 0, layer_split=layer_split)


def configured_plan(config: ModelConfig, ranks: int | None = None) -> ShardPlan | None:
    """The plan the config's own `distributed:` section asks for (None when it has none)."""
    section = config.distributed
    if section is None:
        return None
    if ranks is None and section.hosts:
        ranks = len(section.hosts)
    split = tuple(section.layer_split) if section.layer_split else None
    return plan_sharding(config, ranks=ranks, strategy=section.strategy, layer_split=split)
