"""The LocalAI-compatible gRPC backend: `backend.Backend` over grpc.aio, in front of one ModelHost.

One event loop serves every RPC; generation happens on the engine's single MLX worker, which wakes
the loop per event (runtime.async_bridge). So Health answers at once however many streams are open, a
client that cancels or disconnects has its generation stopped within one decoding step, and every
failure becomes one gRPC status with a one-line message (runtime.faults) — never a traceback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gallery.errors import RequestError, one_line
from runtime.async_bridge import handle_events, run_blocking
from runtime.engine import RequestHandle
from runtime.errors import NotLoaded
from runtime.faults import FAULTS, classify
from runtime.grpc_request import predict_request
from runtime.host import ModelHost, Overrides, model_metadata, prompt_text, resolve
from runtime.lifecycle import StopSignal, cancel_task, install_signal_handlers, settle, watch_parent
from runtime.openai_response import logprobs_json
from runtime.proto import backend_pb2 as pb
from runtime.proto import backend_pb2_grpc as pb_grpc
from runtime.request import Answer, Event, Usage, check_request

log = logging.getLogger("runtime")

AUTH_ENV = "LOCALAI_GRPC_AUTH_TOKEN"
DEFAULT_MAX_MESSAGE_MB = 64
_STATES = {
    "UNINITIALIZED": pb.StatusResponse.UNINITIALIZED,
    "BUSY": pb.StatusResponse.BUSY,
    "READY": pb.StatusResponse.READY,
    "ERROR": pb.StatusResponse.ERROR,
}


# ----- authentication -----
class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuse every RPC (Health included) that does not carry exactly one `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    def _authorized(self, metadata: Any) -> bool:
        # Exactly one `authorization` header: with several, which one a proxy or a later check reads is
        # ambiguous (a wrong token followed by a right one must not pass).
        values = [value for key, value in metadata or () if key.lower() == "authorization"]
        if len(values) != 1:
            return False
        text = values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else str(values[0])
        scheme, _, credential = text.strip().partition(" ")
        given = credential.strip().encode("utf-8") if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, self._token)  # constant time: no token-guessing by timing

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        """Pass authorized calls on; answer the rest UNAUTHENTICATED with a handler of the same shape."""
        handler = await continuation(details)
        if self._authorized(details.invocation_metadata):
            return handler
        message = f"missing or invalid bearer token (set 'authorization: Bearer <token>' as in {AUTH_ENV})"

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield None  # pragma: no cover - abort raises

        if handler is not None and handler.response_streaming and not handler.request_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny_unary)


# ----- requests protobuf cannot parse -----
class _Undecodable:
    """A request body that is not a valid message (a string field that is not UTF-8, or not protobuf at all)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answer a request protobuf cannot parse with INVALID_ARGUMENT, as every other bad request is answered.

    grpc reports a failing request deserializer as UNKNOWN; so each method's deserializer is wrapped to hand
    the handler a marker instead, and the handler refuses it with the parser's reason.
    """

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        """The method's handler, with a deserializer that never raises."""
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as exc:
                return _Undecodable(f"malformed request: {one_line(exc)} (string fields must be valid UTF-8)")

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            log.info("%s refused (INVALID_ARGUMENT): %s", details.method, request.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

        if handler.response_streaming:
            behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for reply in behavior(request, context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=lenient, response_serializer=handler.response_serializer
            )
        unary_behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await unary_behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=lenient, response_serializer=handler.response_serializer
        )


# ----- replies -----
def _delta(event: Event) -> list[pb.ChatDelta]:
    if not (event.content or event.reasoning or event.tool_calls):
        return []
    calls = [
        pb.ToolCallDelta(index=call.index, id=call.id, name=call.name, arguments=call.arguments)
        for call in event.tool_calls
    ]
    return [pb.ChatDelta(content=event.content, reasoning_content=event.reasoning, tool_calls=calls)]


def chunk_reply(event: Event) -> pb.Reply:
    """A streamed piece: the answer text in `message`, content/reasoning/tool calls as a ChatDelta, and the
    tokens' log-probabilities (JSON, OpenAI's shape) when the request asked for them."""
    reply = pb.Reply(message=event.content.encode("utf-8"), chat_deltas=_delta(event))
    if event.logprobs:
        reply.logprobs = json.dumps(logprobs_json(event.logprobs), ensure_ascii=False).encode("utf-8")
    return reply


def add_totals(reply: pb.Reply, final: Event) -> pb.Reply:
    """Token counts and timings (milliseconds, as llama.cpp reports them) on the last reply."""
    usage = final.usage or Usage()
    reply.tokens = usage.completion_tokens
    reply.prompt_tokens = usage.prompt_tokens
    if final.timings is not None:
        reply.timing_prompt_processing = final.timings.prompt_s * 1000.0
        reply.timing_token_generation = final.timings.generation_s * 1000.0
    return reply


def _status_code(kind: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, FAULTS[kind].grpc_code)


def _tag(correlation_id: str | None) -> str:
    return f"[{correlation_id}] " if correlation_id else ""


class BackendServicer(pb_grpc.BackendServicer):
    """The Backend service over one ModelHost."""

    def __init__(self, host: ModelHost, executor: concurrent.futures.Executor) -> None:
        self.host = host
        self.executor = executor
        self.in_flight = 0  # Predict / PredictStream calls that hold a queued or running request
        self.idle = asyncio.Event()
        self.idle.set()

    def _started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def _ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    # ----- helpers -----
    async def _abort(
        self, context: grpc.aio.ServicerContext, exc: BaseException, rpc: str, tag: str = ""
    ) -> None:
        kind, message = classify(exc)
        if kind == "internal":
            log.error("%s%s: %s", tag, rpc, message, exc_info=os.environ.get("GALLERY_DEBUG") == "1")
        else:
            log.info("%s%s refused (%s): %s", tag, rpc, FAULTS[kind].grpc_code, message)
        await context.abort(_status_code(kind), message)

    async def _submit(
        self, request: pb.PredictOptions, context: grpc.aio.ServicerContext, rpc: str
    ) -> RequestHandle:
        tag = _tag(request.CorrelationId)
        try:
            generation = predict_request(request)
            handle = await run_blocking(
                self.executor, self.host.submit, generation, request.ModelIdentity or None
            )
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._abort(context, exc, rpc, tag)
            raise  # unreachable: abort raises
        # The client went away (cancel, deadline, disconnect): stop generating within one step.
        context.add_done_callback(lambda _context: handle.cancel())
        self._started()
        return handle

    async def _finish(
        self, final: Event, context: grpc.aio.ServicerContext, rpc: str, tag: str, started: float
    ) -> None:
        usage = final.usage or Usage()
        log.info(
            "%s%s done: %s, prompt %d + completion %d tokens in %.2f s",
            tag,
            rpc,
            final.finish_reason,
            usage.prompt_tokens,
            usage.completion_tokens,
            time.perf_counter() - started,
        )
        if final.finish_reason == "cancelled":
            await context.abort(
                grpc.StatusCode.CANCELLED,
                final.error or "request cancelled: the model was unloaded or the runtime is stopping",
            )
        if final.error:
            await context.abort(_status_code(final.fault or "generation_failed"), final.error)
        # LocalAI's Reply has no field for these: trailing metadata carries them without changing its schema.
        context.set_trailing_metadata(
            (
                ("x-gallery-cached-tokens", str(usage.cached_tokens)),
                ("x-gallery-reasoning-tokens", str(usage.reasoning_tokens)),
                ("x-gallery-finish-reason", final.finish_reason or ""),
            )
        )

    # ----- RPCs -----
    async def Health(self, request: pb.HealthMessage, context: grpc.aio.ServicerContext) -> pb.Reply:
        """OK whenever the process serves; UNAVAILABLE when a distributed run lost a rank."""
        cluster = self.host.cluster
        if cluster is not None and cluster.failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, cluster.failure)
        return pb.Reply(message=b"OK")

    async def LoadModel(self, request: pb.ModelOptions, context: grpc.aio.ServicerContext) -> pb.Result:
        """Load (or switch to) a model. Failures are success=false with the reason, as LocalAI expects."""
        spec = request.Model or request.ModelFile
        overrides = Overrides(
            context_size=request.ContextSize or request.MaxModelLen or None,
            seed=request.Seed or None,
            trust_remote_code=request.TrustRemoteCode,
            draft_model=request.DraftModel or None,
        )
        try:
            report = await run_blocking(
                self.executor,
                lambda: self.host.load(
                    spec, list(request.Options), model_path=request.ModelPath or None, overrides=overrides
                ),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kind, message = classify(exc)
            log.warning("LoadModel %s failed (%s): %s", (spec or "(empty)")[:200], kind, message[:500])
            context.set_trailing_metadata((("x-gallery-fault", kind),))
            return pb.Result(success=False, message=message)
        return pb.Result(success=True, message=report.message)

    async def Free(self, request: pb.HealthMessage, context: grpc.aio.ServicerContext) -> pb.Result:
        """Unload the model and release its memory."""
        name = await run_blocking(self.executor, self.host.free)
        return pb.Result(success=True, message=f"freed {name}" if name else "no model was loaded")

    async def PredictStream(
        self, request: pb.PredictOptions, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Reply]:
        """Stream an answer: text pieces, then a last reply with the counts and timings."""
        started, tag = time.perf_counter(), _tag(request.CorrelationId)
        handle = await self._submit(request, context, "PredictStream")
        try:
            async for event in handle_events(handle):
                if not event.done:
                    yield chunk_reply(event)
                    continue
                await self._finish(event, context, "PredictStream", tag, started)
                yield add_totals(chunk_reply(event), event)
        finally:
            if not handle.finished.is_set():
                log.info(
                    "%sPredictStream ended before its answer (client gone or server stopping); generation "
                    "cancelled",
                    tag,
                )
            handle.cancel()  # no-op when finished; frees the worker when the client went away mid-stream
            self._ended()

    async def Predict(self, request: pb.PredictOptions, context: grpc.aio.ServicerContext) -> pb.Reply:
        """The whole answer in one reply."""
        started, tag = time.perf_counter(), _tag(request.CorrelationId)
        handle = await self._submit(request, context, "Predict")
        answer = Answer()
        try:
            async for event in handle_events(handle):
                answer.add(event)
        finally:
            if not handle.finished.is_set():
                log.info(
                    "%sPredict ended before its answer (client gone or server stopping); generation cancelled",
                    tag,
                )
            handle.cancel()
            self._ended()
        done = answer.completion()
        whole = Event(
            content=done.content,
            reasoning=done.reasoning,
            tool_calls=done.tool_calls,
            logprobs=done.logprobs,
            done=True,
            finish_reason=done.finish_reason,
            usage=done.usage,
            timings=done.timings,
            error=done.error,
            route=done.route,
        )
        await self._finish(whole, context, "Predict", tag, started)
        return add_totals(chunk_reply(whole), whole)

    async def TokenizeString(
        self, request: pb.PredictOptions, context: grpc.aio.ServicerContext
    ) -> pb.TokenizationResponse:
        """Token ids of Prompt, or of Messages rendered with the pinned template."""
        try:
            engine = self.host.current()
            generation = predict_request(request)
            check_request(generation, engine.settings.limits)
            text = await run_blocking(self.executor, prompt_text, engine.config, generation)
            tokens = await run_blocking(self.executor, engine.tokenize, text)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._abort(context, exc, "TokenizeString")
            raise
        return pb.TokenizationResponse(length=len(tokens), tokens=tokens)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        """Text of token ids."""
        try:
            engine = self.host.current()
            ids = list(request.tokens)
            if any(i < 0 for i in ids):
                raise RequestError("token ids must not be negative")
            try:
                text = await run_blocking(self.executor, engine.detokenize, ids)
            except (OverflowError, IndexError, ValueError, TypeError) as exc:
                raise RequestError(
                    f"cannot detokenize these ids ({type(exc).__name__}: out of the vocabulary?)"
                ) from None
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._abort(context, exc, "Detokenize")
            raise
        return pb.DetokenizeResponse(content=text)

    async def Status(self, request: pb.HealthMessage, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        """State and memory: total is the process RSS; the breakdown adds MLX's own counters."""
        status = self.host.status()
        memory = pb.MemoryUsageData(
            total=status["memory"]["total"],
            breakdown={k: max(int(v), 0) for k, v in status["memory"]["breakdown"].items()},
        )
        return pb.StatusResponse(state=_STATES[status["state"]], memory=memory)

    async def ModelMetadata(
        self, request: pb.ModelOptions, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """Metadata of the loaded model, or of the model the request names (its config only, no weights)."""
        try:
            config = await run_blocking(self.executor, self._metadata_config, request)
            meta = model_metadata(config)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._abort(context, exc, "ModelMetadata")
            raise
        return pb.ModelMetadataResponse(
            supports_thinking=meta["supports_thinking"],
            rendered_template=meta["rendered_template"],
            media_marker=meta["media_marker"],
        )

    def _metadata_config(self, request: pb.ModelOptions) -> Any:
        spec = request.Model or request.ModelFile
        engine = self.host.engine
        if engine is not None and (not spec or spec in self.host.names):
            return engine.config
        if not spec:
            raise NotLoaded("no model is loaded and the request names none")
        return resolve(spec, self.host.catalog, request.ModelPath or None).config


# ----- the server -----
def build_server(
    host: ModelHost, *, token: str | None, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
) -> tuple[grpc.aio.Server, concurrent.futures.Executor, BackendServicer]:
    """A grpc.aio server with the Backend service (and the bearer-token check when a token is set)."""
    limit = max(1, max_message_mb) * 1024 * 1024
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="rpc")
    interceptors: list[grpc.aio.ServerInterceptor] = [BearerAuth(token)] if token else []
    server = grpc.aio.server(
        interceptors=[*interceptors, MalformedRequests()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a port already in use must fail, not be silently shared
        ],
    )
    servicer = BackendServicer(host, executor)
    pb_grpc.add_BackendServicer_to_server(servicer, server)
    return server, executor, servicer


async def serve(
    address: str,
    host: ModelHost,
    *,
    token: str | None,
    grace: float = 30.0,
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    parent_pid: int | None = None,
    preload: Callable[[], Any] | None = None,
) -> int:
    """Serve until a signal or the parent's death; returns the exit code."""
    server, executor, servicer = build_server(host, token=token, max_message_mb=max_message_mb)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        port, reason = 0, str(exc)
    else:
        reason = "address in use or not available"
    if not port:
        from gallery.errors import RuntimeFailure

        raise RuntimeFailure(f"cannot listen on {address}: {reason}")
    await server.start()
    bound = address.rsplit(":", 1)[0] + f":{port}"
    log.info("listening on %s (pid %d)%s", bound, os.getpid(), ", bearer token required" if token else "")
    stop = StopSignal()
    install_signal_handlers(stop)
    watcher = asyncio.create_task(
        watch_parent(lambda: stop.request("cancel", "parent process died"), parent_pid=parent_pid)
    )
    if preload is not None:  # Health answers while the model loads; a signal meanwhile still stops us
        loading = asyncio.ensure_future(run_blocking(executor, preload))
        requested = asyncio.create_task(stop.requested.wait())
        await asyncio.wait({loading, requested}, return_when=asyncio.FIRST_COMPLETED)
        cancel_task(requested)
        await settle(requested)
        if loading.done() and loading.exception() is not None:
            await server.stop(0)
            executor.shutdown(wait=False, cancel_futures=True)
            cancel_task(watcher)
            await settle(watcher)
            raise loading.exception()  # type: ignore[misc]
    await stop.requested.wait()
    host.draining = True  # new requests are refused (UNAVAILABLE) while in-flight ones finish
    loop = asyncio.get_running_loop()
    if stop.mode == "drain":
        # The server keeps answering during the grace, so a new request gets our UNAVAILABLE rather than
        # whatever the transport says when it is shut down mid-call. At the end of the grace (or on a second
        # signal) the engine cancels what is left, each stream ends with our own CANCELLED status, and only
        # then does the transport stop.
        idle = asyncio.create_task(servicer.idle.wait())
        escalation = asyncio.create_task(stop.escalated.wait())
        await asyncio.wait({idle, escalation}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        if not idle.done():
            await loop.run_in_executor(None, lambda: host.close(cancel=True))
            await asyncio.wait({idle}, timeout=5.0)  # the cancelled streams send their status
        for task in (idle, escalation):
            cancel_task(task)
            await settle(task)
        await server.stop(1.0)
    else:
        await loop.run_in_executor(None, lambda: host.close(cancel=True))
        await server.stop(1.0)  # a moment for the cancelled streams to send their status
    cancel_task(watcher)
    await settle(watcher)
    await loop.run_in_executor(None, lambda: host.close(cancel=True))
    executor.shutdown(wait=False, cancel_futures=True)
    log.info("stopped (%s)", stop.reason)
    return stop.exit_code
