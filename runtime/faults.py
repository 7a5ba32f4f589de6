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
    NetworkFailure,
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
from runtime.errors import (
    ClusterLost,
    IdentityMismatch,
    LoadFailed,
    NotLoaded,
    QueueFull,
    RequestTooLarge,
    ShuttingDown,
)


@dataclasses.dataclass(frozen=True)
class Fault:
    """One kind of failure: its gRPC status, JSON-RPC code, HTTP status and OpenAI error type, and what it means."""

    grpc_code: str
    jsonrpc_code: int
    http_status: int
    meaning: str

    @property
    def openai_type(self) -> str:
        """OpenAI's error `type` for this HTTP status."""
        return {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            405: "invalid_request_error",
            415: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable_error",
        }.get(self.http_status, "server_error")


FAULTS: dict[str, Fault] = {
    "invalid_request": Fault(
        "INVALID_ARGUMENT",
        -32602,
        400,
        "bad request: a value out of range, a field this runtime cannot honour, bad base64 or media, media for a "
        "text model, malformed Tools/JSON, a conversation the template rejects, a prompt over the context size",
    ),
    "too_large": Fault("INVALID_ARGUMENT", -32602, 413, "the request (or its body) is over the size limit"),
    "not_loaded": Fault("FAILED_PRECONDITION", -32001, 503, "no model is loaded (or it is still loading)"),
    "identity_mismatch": Fault(
        "FAILED_PRECONDITION", -32005, 404, "ModelIdentity / `model` names another model"
    ),
    "not_found": Fault("NOT_FOUND", -32003, 404, "the model does not exist or is not served here"),
    "load_failed": Fault("FAILED_PRECONDITION", -32000, 500, "the model exists but could not be loaded"),
    "busy": Fault(
        "RESOURCE_EXHAUSTED", -32002, 429, "the request queue is full (or every model is busy); retry later"
    ),
    "shutting_down": Fault("UNAVAILABLE", -32004, 503, "the runtime is draining or stopping"),
    "cluster_lost": Fault(
        "UNAVAILABLE",
        -32006,
        503,
        "distributed run: a rank died or cannot be reached; unhealthy until the ranks are restarted",
    ),
    "hub_unavailable": Fault(
        "UNAVAILABLE",
        -32007,
        503,
        "a model imported on the fly (a repo id): the Hugging Face Hub or mirror could not be reached, timed "
        "out or kept failing; retry later",
    ),
    "cancelled": Fault(
        "CANCELLED",
        0,
        499,
        'the request was cancelled (stdio: a normal result with finish_reason "cancelled")',
    ),
    "generation_failed": Fault("INTERNAL", -32000, 500, "the model failed while generating"),
    "unauthenticated": Fault(
        "UNAUTHENTICATED",
        0,
        401,
        "missing or wrong bearer token (gRPC and HTTP; HTTP's /v1/messages also takes x-api-key)",
    ),
    "forbidden": Fault(
        "PERMISSION_DENIED",
        0,
        403,
        "HTTP, keyless server: a Host or Origin that is not loopback or allowed (a web page or DNS rebinding)",
    ),
    "unknown_endpoint": Fault("UNIMPLEMENTED", 0, 404, "HTTP: no such endpoint"),
    "method_not_allowed": Fault("UNIMPLEMENTED", 0, 405, "HTTP: the endpoint does not take this method"),
    "unsupported_media_type": Fault(
        "INVALID_ARGUMENT", 0, 415, "HTTP: a JSON endpoint was sent a body that is not application/json"
    ),
    "internal": Fault("INTERNAL", -32603, 500, "a bug in the runtime (please report it)"),
}

_NOT_FOUND = (RepoNotFound, RevisionNotFound, OfflineNotCached, NoConfig, ModelNotFound)
_INVALID = (RequestError, BadConfig, BadMetadata, UnsupportedModel, StrictFailure, UsageError)


def classify(exc: BaseException) -> tuple[str, str]:
    """The kind of a failure (by its class, never its message) and its one-line message."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    kinds: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
        (QueueFull, "busy"),
        (NotLoaded, "not_loaded"),
        (IdentityMismatch, "identity_mismatch"),
        (ShuttingDown, "shutting_down"),
        (ClusterLost, "cluster_lost"),
        (NetworkFailure, "hub_unavailable"),  # an outage, not the request's fault: retryable
        (_NOT_FOUND, "not_found"),
        (RequestTooLarge, "too_large"),
        (_INVALID, "invalid_request"),
        (LoadFailed, "load_failed"),
        (RuntimeFailure, "generation_failed"),
        (GalleryError, "invalid_request"),
    )
    for classes, kind in kinds:
        if isinstance(exc, classes):
            return kind, message
    return "internal", f"internal error: {type(exc).__name__}: {message}"[:500]


def faults_table() -> str:
    """The fault kinds as a Markdown table (for the README)."""
    rows = ["| kind | gRPC status | JSON-RPC code | HTTP status | meaning |", "|---|---|---|---|---|"]
    for kind, fault in FAULTS.items():
        code = str(fault.jsonrpc_code) if fault.jsonrpc_code else "—"
        rows.append(f"| {kind} | {fault.grpc_code} | {code} | {fault.http_status} | {fault.meaning} |")
    return "\n".join(rows)
