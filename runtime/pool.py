"""Several models behind one server: each served config in its own ModelHost, loaded on first use, at most
`max_resident` of them in memory at once (the least recently used idle one is unloaded to make room).

A request names its model (the config's name, the spec it was served as, its repo id, …); the same spec
resolution as everywhere else (catalog.resolve, through ModelHost) finds its config, at start for the configs
given on the command line, and on first use for any other spec when the server allows any model (resolved on
a worker thread: an import from a slow Hub never blocks the event loop). Two spellings of one model (a folder
given as `./m` and `m/`, a repo id and its name) share one entry.

Loads are serialized, so `max_resident` holds however requests arrive; a request holds a lease on its model
from the moment it is routed until the engine has queued it, so an eviction never takes a model out from under
a request being prepared.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gallery.config import ModelConfig
from gallery.errors import ModelNotFound
from runtime.cluster import Cluster
from runtime.engine import Engine
from runtime.errors import PoolBusy, StillLoading
from runtime.host import ModelHost, identity_names, resolve, weights_bytes
from runtime.load_options import parse_options

log = logging.getLogger("runtime")


@dataclasses.dataclass
class Served:
    """One served model: its spec, its config (known before loading), its names, and its host."""

    spec: str
    config: ModelConfig
    names: set[str]  # lower-cased, for lookups
    host: ModelHost
    display_names: set[str] = dataclasses.field(default_factory=set)  # as given, for /v1/models
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    last_used: float = 0.0

    @property
    def engine(self) -> Engine | None:
        """The loaded engine, if any."""
        return self.host.engine

    leases: int = 0  # requests routed here and not yet queued on the engine
    evicting: bool = False  # being unloaded to make room: a request must wait for the next load, not use it

    @property
    def idle(self) -> bool:
        """Whether unloading it would cancel or strand nothing."""
        if self.leases:
            return False
        engine = self.host.engine
        return engine is None or engine.idle

    def identity(self) -> tuple[str, str | None, str | None, str | None]:
        """What makes two served entries the same model (whatever the spelling that named them)."""
        source = self.config.mlx.source
        return (self.config.name, source.repo, source.revision, source.local_path)


class ModelPool:
    """The models an HTTP server serves."""

    def __init__(
        self,
        specs: list[str],
        *,
        options: list[str],
        catalog: str | None,
        model_path: str | None,
        max_resident: int,
        any_model: bool,
        load_timeout: float,
        on_engine: Callable[[str, Engine], None] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.cluster = cluster  # rank 0 of a distributed run (which serves exactly one model)
        self.options = list(options)
        self.parsed = parse_options(self.options)
        self.catalog = catalog
        self.model_path = model_path
        self.max_resident = max(1, max_resident)
        self.any_model = any_model
        self.load_timeout = load_timeout
        self.on_engine = on_engine
        self.served: list[Served] = [self._describe(spec) for spec in specs]
        self.closed = False
        self._loading = asyncio.Lock()

    def _describe(self, spec: str) -> Served:
        resolved = resolve(spec, self.catalog, self.model_path)
        names = identity_names(resolved.config, spec, self.parsed)
        return Served(
            spec,
            resolved.config,
            {name.lower() for name in names},
            ModelHost(interface="http", catalog=self.catalog, cluster=self.cluster),
            display_names=set(names),
        )

    def lookup(self, name: str) -> Served:
        """The served model this name means, without loading or importing anything. Raises ModelNotFound."""
        found = self._known(name) if name else None
        if found is None:
            raise ModelNotFound(f"model {name!r} is not served here", spec=name)
        return found

    def _known(self, name: str | None) -> Served | None:
        if not name:
            if len(self.served) == 1:
                return self.served[0]
            raise ModelNotFound(
                f"this server serves {len(self.served)} models: name one in `model` "
                f"({', '.join(s.config.name for s in self.served)})"
            )
        key = name.lower()
        return next((served for served in self.served if key in served.names), None)

    async def find(self, name: str | None) -> Served:
        """The served model a request names (None: the only one); under --any-model a new spec is resolved on a
        worker thread and joins the pool (once, however it is spelled). Raises ModelNotFound."""
        found = self._known(name)
        if found is not None:
            return found
        if not self.any_model or not name:
            raise ModelNotFound(
                f"model {name!r} is not served here (serving: "
                f"{', '.join(s.config.name for s in self.served) or 'nothing'})",
                spec=name,
            )
        described = await asyncio.get_running_loop().run_in_executor(None, self._describe, name)
        found = self._known(name)  # another request may have added it meanwhile
        if found is not None:
            return found
        same = next((s for s in self.served if s.identity() == described.identity()), None)
        if same is not None:  # another spelling of a model already served: one entry, one more name
            same.names |= described.names
            same.display_names |= described.display_names
            return same
        self.served.append(described)
        return described

    @contextlib.asynccontextmanager
    async def lease(self, name: str | None) -> AsyncIterator[tuple[Served, Engine]]:
        """The named model's engine, held so that no eviction unloads it until the block ends (queue the request
        inside the block: once queued, the engine's own counts keep it resident)."""
        served, engine = await self.engine(name)
        served.leases += 1
        try:
            if served.engine is not engine:  # evicted between load and lease: load it again
                served.leases -= 1
                served, engine = await self.engine(name)
                served.leases += 1
            yield served, engine
        finally:
            served.leases -= 1

    async def engine(self, name: str | None) -> tuple[Served, Engine]:
        """The named model's engine, loading it (and unloading an idle one if needed) first."""
        served = await self.find(name)
        served.last_used = time.monotonic()
        engine = served.engine
        if engine is not None and engine.ready and not served.evicting:
            return served, engine
        try:
            await asyncio.wait_for(served.lock.acquire(), timeout=self.load_timeout)
        except TimeoutError:
            raise StillLoading(f"{served.config.name} is still loading; retry shortly") from None
        try:
            engine = served.engine
            if engine is None or not engine.ready or served.evicting:
                # One load at a time across the pool: room is made and taken atomically, so two models
                # requested at once cannot both find a free slot.
                async with self._loading:
                    await self._make_room(served)
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(
                        None, lambda: served.host.load(served.spec, self.options, model_path=self.model_path)
                    )
                engine = served.engine
                assert engine is not None
                if self.on_engine is not None:
                    self.on_engine(served.config.name, engine)
            return served, engine
        finally:
            served.lock.release()

    async def _make_room(self, wanted: Served) -> None:
        resident = [s for s in self.served if s.engine is not None and s is not wanted]
        while len(resident) >= self.max_resident:
            idle = sorted((s for s in resident if s.idle), key=lambda s: s.last_used)
            if not idle:
                raise PoolBusy(
                    f"all {len(resident)} resident models are busy; retry when one is idle "
                    "(or raise --max-models)"
                )
            victim = idle[0]
            log.info("unloading %s to make room for %s", victim.config.name, wanted.config.name)
            # Its engine stays visible until free() runs on the executor: a request arriving meanwhile must not
            # be handed that engine (it would be shut down under the request), so it waits for a fresh load.
            victim.evicting = True
            try:
                await asyncio.get_running_loop().run_in_executor(None, victim.host.free)
            finally:
                victim.evicting = False
            resident.remove(victim)

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Status of every loaded model, by name (with the weights' bytes: `weights_bytes`)."""
        return {
            s.config.name: {**s.engine.status(), "weights_bytes": weights_bytes(s.config)}
            for s in self.served
            if s.engine is not None
        }

    def loaded_models(self) -> list[dict[str, Any]]:
        """What `gallery ps` shows: each loaded model with its memory (weights plus its prefix cache), its load
        and how long it has been idle, like ollama's /api/ps."""
        now = time.monotonic()
        rows = []
        for served in self.served:
            engine = served.engine
            if engine is None:
                continue
            status = engine.status()
            cache = sum(int(c.get("bytes", 0)) for c in (status.get("prefix_cache") or {}).values())
            weights = weights_bytes(served.config)
            source = served.config.mlx.source
            rows.append(
                {
                    "name": served.config.name,
                    "backend": served.config.backend,
                    "repo": source.repo,
                    "revision": source.revision,
                    "state": status["state"],
                    "active": status["active"],
                    "queued": status["queued"],
                    "weights_bytes": weights,
                    "prefix_cache_bytes": cache,
                    "memory_bytes": weights + cache,
                    "idle_seconds": round(now - served.last_used, 1) if served.last_used else None,
                }
            )
        return rows

    async def unload(self, name: str) -> str | None:
        """Unload a served model (it loads again on its next request); its name, or None if it was not loaded.
        Raises ModelNotFound for a name this server does not serve."""
        served = self.lookup(name)
        if served.engine is None:
            return None
        while served.leases:  # a request is being routed to it: let it queue first (its lease ends then)
            await asyncio.sleep(0.05)
        async with served.lock:
            return await asyncio.get_running_loop().run_in_executor(None, served.host.free)

    def close(self) -> None:
        """Stop every engine (in-flight requests are cancelled)."""
        self.closed = True
        for served in self.served:
            served.host.close(cancel=True)
