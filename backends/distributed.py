"""MLX's distributed runtime, as the serving engine uses it: the group, byte messages, status, sharded loading.

Processes are started by `mlx.launch` (which sets MLX_RANK and the backend's host file); this module
joins the group with `mx.distributed.init`, moves bytes from rank 0 to every rank with `all_sum` (the
others contribute zeros — mlx-lm's server shares requests the same way), gathers a per-rank status with
`all_gather`, and splits a lazily loaded mlx-lm model with the class's own `pipeline` or `shard` before its
weights are read, so each rank only ever materializes its part.

Every collective blocks until all ranks reach it; a rank that died makes it raise (the ring backend
reports "connection to a peer was lost"), which callers turn into a cluster failure.
"""

from __future__ import annotations

import os
from typing import Any

_STATUS_BYTES = 480  # one rank's status line in the load handshake
_INLINE_BYTES = 2040  # message bytes carried by the first collective (with the 8-byte length: 2 KiB)


class ClusterError(RuntimeError):
    """A collective failed: a rank died or the network between ranks broke."""


def launched_rank() -> int | None:
    """This process's rank when mlx.launch started it (MLX_RANK), else None; does not import MLX."""
    rank = os.environ.get("MLX_RANK")
    if rank is None:
        return None
    return int(rank)


def _stream() -> Any:
    """The stream mlx-lm generates on. The batch generator leaves the next step's forward pass (with the
    model's own send/recv/all_gather) running asynchronously; a message collective on another stream could
    interleave with it on the wire, differently on each rank. On the same stream, MLX runs them in order."""
    from mlx_lm.generate import generation_stream

    return generation_stream


class Group:
    """The global MLX group of this process, and the collectives the engine needs on it."""

    def __init__(self, backend: str) -> None:
        import mlx.core as mx

        try:
            self._group = mx.distributed.init(strict=True, backend=backend)
        except (RuntimeError, ValueError) as exc:
            raise ClusterError(
                f"could not join the {backend} group: {' '.join(str(exc).split())[:300]}"
            ) from None
        self.rank = int(self._group.rank())
        self.size = int(self._group.size())
        self.backend = backend

    @property
    def mlx_group(self) -> Any:
        """The mx.distributed.Group (for mlx-lm's pipeline/shard)."""
        return self._group

    def _sum(self, array: Any) -> Any:
        import mlx.core as mx

        try:
            out = mx.distributed.all_sum(array, group=self._group, stream=_stream())
            mx.eval(out)
        except RuntimeError as exc:
            raise ClusterError(" ".join(str(exc).split())[:300]) from None
        return out

    def send(self, payload: bytes) -> None:
        """Rank 0: deliver payload to every other rank (each is blocked in receive).

        One collective carries the length and the first _INLINE_BYTES; only a longer payload (a long prompt)
        needs a second one, so an ordinary step costs one round trip.
        """
        import mlx.core as mx
        import numpy as np

        head = np.zeros(_INLINE_BYTES + 8, dtype=np.uint8)
        head[:8] = np.frombuffer(len(payload).to_bytes(8, "little"), dtype=np.uint8)
        first = payload[:_INLINE_BYTES]
        head[8 : 8 + len(first)] = np.frombuffer(first, dtype=np.uint8)
        self._sum(mx.array(head))
        rest = payload[_INLINE_BYTES:]
        if rest:
            self._sum(mx.array(np.frombuffer(rest, dtype=np.uint8)))

    def receive(self) -> bytes:
        """Ranks above 0: wait for rank 0's next payload."""
        import mlx.core as mx
        import numpy as np

        head = np.array(self._sum(mx.zeros(_INLINE_BYTES + 8, dtype=mx.uint8)), copy=False)
        size = int.from_bytes(head[:8].tobytes(), "little")
        payload = head[8 : 8 + min(size, _INLINE_BYTES)].tobytes()
        if size > _INLINE_BYTES:
            rest = self._sum(mx.zeros(size - _INLINE_BYTES, dtype=mx.uint8))
            payload += np.array(rest, copy=False).tobytes()
        return payload

    def gather_status(self, problem: str | None) -> list[str | None]:
        """Every rank's problem (None: fine), in rank order; every rank must call it."""
        import mlx.core as mx
        import numpy as np

        buffer = np.zeros(_STATUS_BYTES, dtype=np.uint8)
        if problem is not None:
            encoded = ("!" + problem).encode("utf-8")[:_STATUS_BYTES]
            buffer[: len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        try:
            gathered = mx.distributed.all_gather(mx.array(buffer), group=self._group, stream=_stream())
            mx.eval(gathered)
        except RuntimeError as exc:
            raise ClusterError(" ".join(str(exc).split())[:300]) from None
        rows = np.array(gathered, copy=False).reshape(self.size, _STATUS_BYTES)
        out: list[str | None] = []
        for row in rows:
            text = bytes(row).rstrip(b"\0").decode("utf-8", errors="replace")
            out.append(text[1:] if text.startswith("!") else None)
        return out


def shard_model(model: Any, group: Group, strategy: str, layer_split: tuple[int, ...] | None) -> None:
    """Split a lazily loaded mlx-lm model in place with its class's own method, then read this rank's weights."""
    import mlx.core as mx

    if strategy == "pipeline":
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "pipeline"):
            raise ValueError(f"{type(model).__module__} has no pipeline() method")
        inner.pipeline(group.mlx_group, list(layer_split) if layer_split else None)
    else:
        if not hasattr(model, "shard"):
            raise ValueError(f"{type(model).__module__} has no shard() method")
        model.shard(group.mlx_group)
    mx.eval(model.parameters())


def pipeline_layers(model: Any) -> tuple[int, int] | None:
    """(first, last+1) layer indexes this rank holds in pipeline mode, else None."""
    inner = getattr(model, "model", None)
    if inner is None or getattr(inner, "pipeline_size", 1) <= 1:
        return None
    start = int(inner.start_idx)
    end = inner.end_idx
    return start, int(end) if end is not None else len(inner.layers)
