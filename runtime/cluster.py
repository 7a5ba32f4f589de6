"""Serving one model from several processes: rank 0 leads, every other rank repeats its engine's steps.

`mlx.launch` starts the same command on every rank (runtime.launch builds that command). Rank 0 owns the
interface (gRPC, HTTP or stdio) and the engine; the other ranks run `Follower.run`, which owns no
interface and never reads stdin. All of them join MLX's group (backends.distributed), and rank 0 sends
JSON messages the followers act on, in order:

- `load`: the config (as rank 0 resolved it), the shard plan and the batch settings; every rank loads its
  shard of the weights, then all ranks exchange a status line, so a rank that cannot load fails the load
  on rank 0 with that rank's reason;
- `step`: the changes to the batch since the last step (requests added, with their prompt tokens and
  sampling inputs — a `Recipe` —, and requests dropped) and how many prefix-cache entries rank 0 evicted,
  then one step of the batch on every rank. Samplers are keyed by seed and position, so every rank picks
  the same tokens; rank 0 alone turns them into text (stop strings, reasoning, tool calls);
- `beat` (rank 0 idle, every second: a dead rank is noticed without traffic), `free`, `exit`.

Every message and every model step is a collective, so a rank that dies makes the next one fail on the
others: rank 0 fails its requests with `ClusterLost`, reports unhealthy, and refuses new work; a follower
whose leader is gone exits. (mlx.launch then stops the remaining ranks.) A rank that hangs without dying
makes no collective fail — MLX's have no timeout —, so every wait on the other ranks is bounded by
runtime.cluster_watch: past `rank_timeout`, rank 0 declares the cluster lost and exits, and a follower that
hears nothing from rank 0 while a model is loaded exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from backends import memory_stats, release_memory
from backends.decoder import DecoderStats, DecodeSpec, Started, TokenEvent
from backends.distributed import ClusterError, Group, pipeline_layers
from backends.mlx_lm_backend import Shard
from backends.text_decoders import TextBatcher
from gallery.config import ModelConfig
from gallery.errors import GalleryError
from gallery.sharding import ShardingRefused, ShardPlan, parse_split, plan_sharding
from runtime.cluster_watch import DEFAULT_RANK_TIMEOUT_S, IDLE_BOUND_S, RankZeroWatch, Watchdog, exit_now
from runtime.controls import BatchSettings, Guarded, Recipe, new_batcher, new_prefix_cache, text_controls
from runtime.errors import ClusterLost, LoadFailed
from runtime.loader import LoadedModel, load

log = logging.getLogger("runtime")

HEARTBEAT_S = 1.0  # rank 0 pings the followers this often while idle


class Cluster:
    """This process's place in the group, and rank 0's messages to the others."""

    def __init__(
        self, group: Group, *, rank_timeout: float = DEFAULT_RANK_TIMEOUT_S, load_timeout: float = 600.0
    ) -> None:
        self.group = group
        self.failure: str | None = None
        self.rank_timeout = rank_timeout  # a step or message (cluster_watch)
        self.load_timeout = load_timeout  # the load handshake: every rank reads its weights first
        self.expect_beats = False  # a follower: rank 0 has a model loaded, so it sends a step or beat often
        self.watch = RankZeroWatch(lambda reason: str(self.lost(reason))) if group.rank == 0 else None
        self.watchdog = self.watch.watchdog if self.watch is not None else Watchdog(self._leader_silent)

    @classmethod
    def join(
        cls,
        backend: str = "any",
        *,
        rank_timeout: float = DEFAULT_RANK_TIMEOUT_S,
        load_timeout: float = 600.0,
    ) -> Cluster:
        """Join the group mlx.launch set up. Raises ClusterLost when it cannot."""
        try:
            return cls(Group(backend), rank_timeout=rank_timeout, load_timeout=load_timeout)
        except ClusterError as exc:
            raise ClusterLost(str(exc)) from None

    @contextlib.contextmanager
    def timed(self, what: str, bound: float | None = None) -> Iterator[None]:
        """A wait on the other ranks, bounded by `bound` (default: rank_timeout) — see runtime.cluster_watch."""
        with self.watchdog.timed(what, self.rank_timeout if bound is None else bound):
            yield

    def _leader_silent(self, what: str, bound: float) -> None:
        log.error(
            "rank %d: waited over %g s for %s: rank 0 or the network is hung; exiting", self.rank, bound, what
        )
        exit_now(1)

    @property
    def rank(self) -> int:
        """This process's rank (0 leads)."""
        return self.group.rank

    @property
    def size(self) -> int:
        """How many ranks serve the model."""
        return self.group.size

    def lost(self, exc: BaseException | str) -> ClusterLost:
        """Record that the cluster is broken (the first reason sticks) and return the error to raise."""
        if self.failure is None:
            reason = " ".join(str(exc).split())[:300]
            self.failure = f"the {self.size}-rank distributed run is broken ({reason}); restart it"
            log.error("%s", self.failure)
        return ClusterLost(self.failure)

    def send(self, message: dict[str, Any]) -> None:
        """Rank 0: deliver a message to every other rank. Raises ClusterLost."""
        if self.failure is not None:
            raise ClusterLost(self.failure)
        op = message.get("op")
        # A heartbeat carries no model work: it gets the short idle bound. A follower may still be starting
        # (imports) or freeing the last model when `load` comes: that one gets the load's bound.
        bound = {"beat": min(self.rank_timeout, IDLE_BOUND_S), "load": self.load_timeout}.get(str(op))
        try:
            with self.timed("heartbeat" if op == "beat" else f"{op!r} message", bound):
                self.group.send(json.dumps(message, separators=(",", ":")).encode("utf-8"))
        except ClusterError as exc:
            raise self.lost(exc) from None

    def receive(self) -> dict[str, Any]:
        """Other ranks: the next message from rank 0. Raises ClusterLost."""
        # With a model loaded, rank 0 steps or beats every second; without one it has nothing to say.
        bound = self.rank_timeout + 2 * HEARTBEAT_S if self.expect_beats else None
        try:
            with self.timed("rank 0's next message", bound) if bound else contextlib.nullcontext():
                data = self.group.receive()
        except ClusterError as exc:
            raise self.lost(exc) from None
        message = json.loads(data.decode("utf-8")) if data else {"op": "beat"}
        return message if isinstance(message, dict) else {"op": "beat"}

    def agree_loaded(self, problem: str | None) -> None:
        """Every rank reports how its load went; raises LoadFailed naming each rank that failed."""
        try:
            with self.timed("load handshake", self.load_timeout):
                statuses = self.group.gather_status(problem)
        except ClusterError as exc:
            raise self.lost(exc) from None
        failed = [f"rank {rank}: {text}" for rank, text in enumerate(statuses) if text]
        if failed:
            raise LoadFailed("; ".join(failed))

    def heartbeat(self) -> None:
        """Rank 0, idle: check that every rank is still there (raises ClusterLost)."""
        self.send({"op": "beat"})

    def describe(self) -> dict[str, Any]:
        """For Status and /health."""
        return {
            "rank": self.rank,
            "ranks": self.size,
            "backend": self.group.backend,
            "failure": self.failure,
            "rank_timeout_s": self.rank_timeout,
            "longest_waits_s": dict(self.watchdog.longest),
        }

    def close(self, code: int) -> None:
        """Rank 0, at exit: tell the followers to exit (they would otherwise notice when the socket closes);
        if a thread is blocked in a collective, end the process now with `code` (cluster_watch)."""
        if self.failure is None:
            with contextlib.suppress(ClusterLost):
                self.send({"op": "exit"})
        if self.watchdog.longest:  # what --rank-timeout must stay well above, as this run saw it
            waits = ", ".join(f"{what} {took:.2f} s" for what, took in sorted(self.watchdog.longest.items()))
            log.info("longest waits on the other ranks (--rank-timeout %g s): %s", self.rank_timeout, waits)
        if self.watch is not None:
            self.watch.closing(code)


def shard_plan(
    config: ModelConfig, ranks: int, strategy: str | None = None, layer_split: str | None = None
) -> ShardPlan:
    """The shard plan for config on `ranks` ranks: load options first, then the config's `distributed:` section.

    Raises LoadFailed saying why the model cannot be split that way.
    """
    section = config.distributed
    try:
        split = parse_split(layer_split) if layer_split else None
        if split is None and section is not None and section.layer_split:
            split = tuple(section.layer_split)
        chosen = strategy or (section.strategy if section is not None else "auto")
        return plan_sharding(config, ranks=ranks, strategy=chosen, layer_split=split)
    except ShardingRefused as exc:
        raise LoadFailed(str(exc)) from None


def refuse_unsupported(config: ModelConfig, *, batching: bool, kv_bits: float | None, draft: bool) -> None:
    """What a distributed run cannot do (each rank would need it too, and mlx-lm only batches plain KV caches)."""
    problems = []
    if not batching:
        problems.append("batching:false (ranks follow rank 0's batch)")
    if kv_bits is not None:
        problems.append("kv_bits (the batch generator keeps a plain KV cache)")
    if draft:
        problems.append(
            "a draft model / MTP (speculative decoding runs per request, not in the shared batch)"
        )
    if problems:
        raise LoadFailed(f"{config.name}: a distributed run cannot use {', '.join(problems)}")


def load_message(
    config: ModelConfig,
    plan: ShardPlan,
    batch: BatchSettings,
    *,
    base: Path | None,
    model_path: Path | None,
    allow_download: bool,
) -> dict[str, Any]:
    """The `load` message: everything a follower needs to load the same model and batch the same way."""
    return {
        "op": "load",
        "config": config.model_dump(mode="json"),
        "plan": {
            "strategy": plan.strategy,
            "layer_split": list(plan.layer_split) if plan.layer_split else None,
        },
        "batch": batch.to_json(),
        "base": str(base) if base else None,
        "model_path": str(model_path) if model_path else None,
        "allow_download": allow_download,
    }


def load_sharded(
    cluster: Cluster,
    config: ModelConfig,
    plan: ShardPlan,
    *,
    base: Path | None,
    model_path: Path | None,
    allow_download: bool,
    strict: bool = False,
) -> LoadedModel:
    """Load this rank's shard, then agree with the other ranks that every load worked. Raises LoadFailed."""
    problem: str | None = None
    loaded: LoadedModel | None = None
    try:
        loaded = load(
            config,
            base=base,
            model_path=model_path,
            allow_download=allow_download,
            strict=strict,
            shard=Shard(cluster.group, plan.strategy, plan.layer_split),
        )
    except GalleryError as exc:
        problem = str(exc)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    cluster.agree_loaded(problem)
    assert loaded is not None
    return loaded


@dataclasses.dataclass
class _Change:
    """A change to the batch, applied on every rank before the next step: a request added, or one dropped."""

    uid: int
    spec: DecodeSpec | None = None  # set for an addition
    wire: Mapping[str, object] | None = None  # the addition's Recipe, as the other ranks receive it

    def to_json(self) -> dict[str, object]:
        return {"add": self.wire} if self.spec is not None else {"cancel": self.uid}


class MirroredBatcher:
    """Rank 0's text batcher (a backends.decoder.Decoder): changes are queued, sent to the other ranks, and
    applied on every rank in the same order right before each step (so the prefix caches, and then the
    batches, stay identical)."""

    def __init__(self, batcher: TextBatcher, cluster: Cluster) -> None:
        self.batcher = batcher
        self.cluster = cluster
        self._pending: list[_Change] = []
        self._cached: dict[
            int, int
        ] = {}  # request uid -> prompt tokens reused, reported with its first token

    def busy(self) -> bool:
        """Whether a change waits or a request is in the batch."""
        return bool(self._pending) or self.batcher.busy()

    def add(self, spec: DecodeSpec) -> Started:
        """Queue a request; it joins the batch (on every rank) at the next step."""
        if spec.wire is None:
            raise ValueError("a request for a distributed batch needs its wire form (a Recipe)")
        self._pending.append(_Change(spec.uid, spec, spec.wire()))
        return Started(cached_tokens=0)

    def cancel(self, uid: int) -> None:
        """Drop a request: at once if it has not joined yet, else at the next step on every rank."""
        for index, change in enumerate(self._pending):
            if change.spec is not None and change.uid == uid:
                del self._pending[index]
                return
        if uid in self.batcher.uids:
            self._pending.append(_Change(uid))

    def step(self) -> list[TokenEvent]:
        """Send the queued changes, apply them, and step the batch; any failure breaks the cluster (ClusterLost)."""
        evicted = self.batcher.prefix.evict_over_budget()
        ops = [change.to_json() for change in self._pending]
        with self.cluster.timed("batch step"):  # the message and the forward pass (its collectives)
            self.cluster.send({"op": "step", "evict": evicted, "ops": ops})
            pending, self._pending = self._pending, []
            try:
                for change in pending:
                    if change.spec is not None:
                        self._cached[change.uid] = self.batcher.add(change.spec).cached_tokens
                    else:
                        self.batcher.cancel(change.uid)
                tokens = self.batcher.step()
            except Exception as exc:
                # Another rank may be inside this step's collectives: the ranks can no longer be kept in step.
                raise self.cluster.lost(exc) from None
        for token in tokens:
            cached = self._cached.pop(token.uid, None)
            if cached is not None:
                token.cached_tokens = cached
        return tokens

    def stats(self) -> DecoderStats:
        """The batch's rows."""
        return self.batcher.stats()

    def reset(self) -> None:
        """After a failed step (one that did not break the cluster): a fresh batch here."""
        self._pending.clear()
        self._cached.clear()
        self.batcher.reset()

    def close(self) -> None:
        """Release the batch here and tell the followers to unload."""
        self.batcher.close()
        with contextlib.suppress(ClusterLost):
            self.cluster.send({"op": "free"})


@dataclasses.dataclass
class _Loaded:
    config: ModelConfig
    model: LoadedModel
    batcher: TextBatcher


class Follower:
    """A rank above 0: loads what rank 0 loads and repeats its batch's steps, until rank 0 says exit or is gone."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.current: _Loaded | None = None

    def run(self) -> int:
        """Follow rank 0; returns the process exit code (0 when told to exit, 1 when rank 0 is gone)."""
        log.info(
            "rank %d of %d (pid %d): following rank 0", self.cluster.rank, self.cluster.size, os.getpid()
        )
        try:
            while True:
                message = self.cluster.receive()
                op = message.get("op")
                if op == "exit":
                    self._free()
                    log.info("rank %d: rank 0 said exit", self.cluster.rank)
                    return 0
                if op == "load":
                    self._load(message)
                elif op == "step":
                    self._step(message)
                elif op == "free":
                    self._free()
        except ClusterLost as exc:
            log.error("rank %d: rank 0 is gone: %s", self.cluster.rank, exc)
            return 1

    def _load(self, message: dict[str, Any]) -> None:
        self._free()
        config = ModelConfig.model_validate(message["config"])
        plan_data = message["plan"]
        split = tuple(plan_data["layer_split"]) if plan_data.get("layer_split") else None
        plan = ShardPlan(strategy=plan_data["strategy"], ranks=self.cluster.size, layer_split=split)
        settings = BatchSettings(**message["batch"])
        try:
            loaded = load_sharded(
                self.cluster,
                config,
                plan,
                base=Path(message["base"]) if message.get("base") else None,
                model_path=Path(message["model_path"]) if message.get("model_path") else None,
                allow_download=bool(message.get("allow_download")),
            )
        except LoadFailed as exc:
            log.error("rank %d: the load failed: %s", self.cluster.rank, exc)
            return
        batcher = new_batcher(loaded.primary.model, new_prefix_cache(settings), settings)
        self.current = _Loaded(config, loaded, batcher)
        self.cluster.expect_beats = True  # rank 0 now steps or beats every second until it frees
        layers = pipeline_layers(loaded.primary.model)
        log.info(
            "rank %d: loaded %s (%s%s), MLX memory %.0f MiB",
            self.cluster.rank,
            config.name,
            plan.strategy,
            f", layers {layers[0]}-{layers[1] - 1}" if layers else "",
            memory_stats().get("mlx_active", 0) / 2**20,
        )

    def _step(self, message: dict[str, Any]) -> None:
        current = self.current
        if current is None:
            raise self.cluster.lost("rank 0 stepped a model this rank did not load")
        batcher = current.batcher
        batcher.prefix.evict(int(message.get("evict", 0)))
        backend = current.model.primary
        try:
            for op in message.get("ops", []):
                if "add" in op:
                    recipe = Recipe.from_json(op["add"])
                    sampler, processors = text_controls(recipe, backend, current.config)
                    batcher.add(
                        DecodeSpec(
                            uid=recipe.uid,
                            max_tokens=recipe.max_tokens,
                            stop_ids=frozenset(recipe.stop_ids),
                            sampler=Guarded(sampler, sampler=True) if sampler is not None else None,
                            processors=[Guarded(processor) for processor in processors],
                            prompt=recipe.prompt,
                        )
                    )
                else:
                    batcher.cancel(int(op["cancel"]))
            with self.cluster.timed("batch step"):
                batcher.step()
        except ClusterLost:
            raise
        except Exception as exc:
            raise self.cluster.lost(exc) from None

    def _free(self) -> None:
        self.cluster.expect_beats = False
        current, self.current = self.current, None
        if current is None:
            return
        current.batcher.close()
        del current
        gc.collect()
        release_memory()
