"""What can go wrong with a request, and how each interface reports it.

Every failure is classified once into a *kind*; the gRPC server turns a kind into a status code and
the stdio loop into a JSON-RPC error code, from the one table below (the README's table is generated
from it too, so the interfaces and the documentation cannot drift apart). Messages are one line.
"""

from __future__ import annotations

import dataclasses

from gallery.errors import (
    BadConfig,
    BadMetadata,
    GalleryError,
    ModelNotFound,
    NoConfig,
    OfflineNotCached,
    RepoNotFound,
    RequestError,
    RevisionNotFound,
    RuntimeFailure,
    StrictFailure,
    UnsupportedModel,
    UsageError,
)
from runtime.engine import QueueFull


class NotLoaded(RuntimeFailure):
    """No model is loaded (or it is still loading)."""


class IdentityMismatch(RuntimeFailure):
    """The request names a different model than the loaded one."""


class ShuttingDown(RuntimeFailure):
    """The runtime is draining or stopping and takes no new work."""


class LoadFailed(RuntimeFailure):
    """The model was found but could not be loaded."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """One kind of failure: its gRPC status name, its JSON-RPC code and what it means."""

    grpc_code: str
    jsonrpc_code: int
    meaning: str


FAULTS: dict[str, Fault] = {
    "invalid_request": Fault(
        "INVALID_ARGUMENT",
        -32602,
        "bad request: bad base64 or media, media for a text model, malformed Tools/JSON, "
        "oversized request, a conversation the template rejects, bad option value",
    ),
    "not_loaded": Fault("FAILED_PRECONDITION", -32001, "no model is loaded (or it is still loading)"),
    "identity_mismatch": Fault("FAILED_PRECONDITION", -32005, "ModelIdentity / `model` names another model"),
    "not_found": Fault("NOT_FOUND", -32003, "the model to load does not exist (LoadModel: success=false)"),
    "load_failed": Fault(
        "FAILED_PRECONDITION", -32000, "the model exists but could not be loaded (LoadModel: success=false)"
    ),
    "busy": Fault("RESOURCE_EXHAUSTED", -32002, "the request queue is full; retry later"),
    "shutting_down": Fault("UNAVAILABLE", -32004, "the runtime is draining or stopping"),
    "cancelled": Fault(
        "CANCELLED", 0, 'the request was cancelled (stdio: a normal result with finish_reason "cancelled")'
    ),
    "generation_failed": Fault("INTERNAL", -32000, "the model failed while generating"),
    "unauthenticated": Fault("UNAUTHENTICATED", 0, "missing or wrong bearer token (gRPC only)"),
    "internal": Fault("INTERNAL", -32603, "a bug in the runtime (please report it)"),
}

_NOT_FOUND = (RepoNotFound, RevisionNotFound, OfflineNotCached, NoConfig, ModelNotFound)
_INVALID = (RequestError, BadConfig, BadMetadata, UnsupportedModel, StrictFailure, UsageError)


def classify(exc: BaseException) -> tuple[str, str]:
    """The kind of a failure and its one-line message."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, QueueFull):
        return "busy", message
    if isinstance(exc, NotLoaded):
        return "not_loaded", message
    if isinstance(exc, IdentityMismatch):
        return "identity_mismatch", message
    if isinstance(exc, ShuttingDown):
        return "shutting_down", message
    if isinstance(exc, _NOT_FOUND):
        return "not_found", message
    if isinstance(exc, _INVALID):
        return "invalid_request", message
    if isinstance(exc, LoadFailed):
        return "load_failed", message
    if isinstance(exc, RuntimeFailure):
        return "not_loaded" if "not loaded" in message else "generation_failed", message
    if isinstance(exc, GalleryError):
        return "invalid_request", message
    return "internal", f"internal error: {type(exc).__name__}: {message}"[:500]


def faults_table() -> str:
    """The fault kinds as a Markdown table (for the README)."""
    rows = ["| kind | gRPC status | JSON-RPC code | meaning |", "|---|---|---|---|"]
    for kind, fault in FAULTS.items():
        code = str(fault.jsonrpc_code) if fault.jsonrpc_code else "—"
        rows.append(f"| {kind} | {fault.grpc_code} | {code} | {fault.meaning} |")
    return "\n".join(rows)
