"""The runtime's own failures, as classes: the interfaces map each class (never its message) to a gRPC status,
a JSON-RPC code and an HTTP status (runtime.faults)."""

from __future__ import annotations

from gallery.errors import RequestError, RuntimeFailure


class QueueFull(RuntimeFailure):
    """The request queue is full: the caller should retry later."""


class NotLoaded(RuntimeFailure):
    """No model is loaded (or it is still loading)."""


class StillLoading(NotLoaded):
    """The model is still loading: retry shortly."""


class IdentityMismatch(RuntimeFailure):
    """The request names a different model than the loaded one."""


class ShuttingDown(RuntimeFailure):
    """The runtime is draining or stopping and takes no new work."""


class LoadFailed(RuntimeFailure):
    """The model was found but could not be loaded (also: a load option the model cannot work with)."""


class PoolBusy(QueueFull):
    """Every resident model is busy, so none can be unloaded to make room for another: retry later."""


class RequestTooLarge(RequestError):
    """A request (or request body) over the runtime's size limit."""


class ClusterLost(RuntimeFailure):
    """A rank of a distributed run died or cannot be reached: the model cannot run until the ranks restart."""
