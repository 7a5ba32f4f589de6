"""A lone request's decoding, at the speed of mlx-lm's single-sequence loop, that can join the batch mid-way.

While one text request runs alone, the batch's per-step work (batched caches and masks, per-row bookkeeping)
is pure overhead: on a GPU, mlx-lm's BatchGenerator decodes one sequence at ~0.7× `stream_generate`. A `Solo`
runs that request with a plain per-request cache and the same pipelined step as `stream_generate` (the next
token is computed while the current one is handed out). When a second request arrives, `handover` finishes
the token in flight and returns everything the batch needs to continue the request exactly where it is: the
cache (holding every token before the next input), the next input token, the tokens so far (the logits
processors' context) and the tokens left.

Why by hand: mlx-lm's `generate_step` keeps its cache and pending token inside a generator, so a request
cannot leave it for the batch. Everything else here is mlx-lm's (the model, its caches, its token buffer).

Equality with the batch: the prompt is processed in the same chunks from the same offset (everything but its
last token, `prefill_step` tokens per engine step), the last prompt token is the first decoding input, the
sampler and every logits processor are called exactly once per position with the same token context (prompt
and answer so far, as BatchGenerator builds it), and stop ids and the token limit are checked the same way.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from backends.decoder import DecodeSpec, FinishReason, PrefillAborted


@dataclasses.dataclass
class Handover:
    """What the batch needs to take a lone request over at a step boundary."""

    cache: list[Any]  # holds `held` exactly
    held: list[int]  # every token in the cache (prompt, and answer so far)
    rest: list[int]  # the tokens still to run through the model: the prompt's rest, or the last token
    tokens_left: int  # of the request's max_tokens


@dataclasses.dataclass
class SoloToken:
    """One decoded token of the lone request (its logprobs: the full row, or None)."""

    token: int
    logprobs: Any
    finish: FinishReason | None


class Solo:
    """One request decoded on its own (see the module docstring). Runs on the engine's MLX thread only."""

    def __init__(
        self,
        model: Any,
        spec: DecodeSpec,
        cache: list[Any],
        cached: int,
        *,
        prefill_step: int,
        checkpoint: Any = None,
    ) -> None:
        from mlx_lm.models.cache import TokenBuffer

        self.model = model
        self.spec = spec
        self.cache = cache
        self.prefill_step = prefill_step
        self.checkpoint = checkpoint  # called with (tokens, cache copy) where the prompt's last token starts
        prompt = spec.prompt
        self.pending_prompt = list(prompt[cached:-1])  # processed in chunks; the last token decodes first
        self.done_tokens = list(prompt[:cached])  # the tokens the cache holds
        self.context = TokenBuffer(self.done_tokens)  # the processors' context, as BatchGenerator keeps it
        self.produced = 0
        self._next: tuple[Any, Any] | None = None  # (token, logprobs) computed but not yet handed out
        self._input = int(prompt[-1])  # the next token to run through the model
        self._fed = False  # whether `_input` has gone through the model (is in the cache)

    def step(self) -> SoloToken | None:
        """One prompt chunk, or one decoded token (None while the prompt is being processed)."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        with mx.stream(generation_stream):
            if self.pending_prompt:
                self._prefill_chunk()
                return None
            if self._next is None:  # the first decoding step: the prompt's last token goes in
                self._next = self._forward(mx.array([self._input], dtype=mx.int32))
                mx.async_eval(*self._next)
            token, logprobs = self._next
            # Feed the (lazy) token before waiting for it, so the next one is computed while this one is
            # handed out, as stream_generate does.
            following = self._forward(token)
            mx.async_eval(*following)
            chosen = int(token.item())
            finish = self._count(chosen)
            self._next = following if finish is None else None
            self._fed = True
            return SoloToken(chosen, logprobs, finish)

    def _count(self, chosen: int) -> FinishReason | None:
        """Take a decoded token: it is the next input; why the request ends with it, if it does."""
        self.produced += 1
        self.done_tokens.append(self._input)  # the previous input is in the cache by now
        self._input = chosen
        return self.spec.finish_after(chosen, self.produced)

    def _prefill_chunk(self) -> None:
        import mlx.core as mx

        if self.spec.should_stop():
            raise PrefillAborted
        chunk, self.pending_prompt = (
            self.pending_prompt[: self.prefill_step],
            self.pending_prompt[self.prefill_step :],
        )
        self.model(mx.array(chunk)[None], cache=self.cache)
        mx.eval([c.state for c in self.cache])
        self.done_tokens.extend(chunk)
        if self.spec.processors:
            self.context.update_and_fetch(mx.array(chunk, dtype=mx.int32))
        if not self.pending_prompt and self.checkpoint is not None:
            self.checkpoint(list(self.done_tokens), copy.deepcopy(self.cache))

    def _forward(self, inputs: Any) -> tuple[Any, Any]:
        """Run one token (an int32 array of shape (1,)) through the model: the next token and its log-probs."""
        import mlx.core as mx

        logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
        if self.spec.processors:
            context = self.context.update_and_fetch(inputs)
            for processor in self.spec.processors:
                logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampler = self.spec.sampler
        chosen = sampler(logprobs) if sampler is not None else mx.argmax(logprobs, axis=-1)
        return chosen, logprobs[0]

    def handover(self) -> tuple[SoloToken | None, Handover | None]:
        """Stop decoding alone: the token in flight (if one is) and the state the batch continues from.

        The token in flight was sampled with this request's sampler and processors at its position, so it is
        handed out as usual; if it ends the request, there is nothing to hand over.
        """
        import mlx.core as mx

        event: SoloToken | None = None
        if self._next is not None:
            token, logprobs = self._next
            self._next = None
            mx.eval(token, logprobs)
            chosen = int(token.item())
            finish = self._count(chosen)
            self._fed = False  # the token just handed out has not run through the model
            event = SoloToken(chosen, logprobs, finish)
            if finish is not None:
                return event, None
        return event, Handover(
            cache=self.cache,
            held=list(self.done_tokens),
            rest=[*self.pending_prompt, self._input],
            tokens_left=self.spec.max_tokens - self.produced,
        )

    def stored(self) -> tuple[list[int], list[Any]]:
        """The tokens the cache holds and the cache (to keep as a prefix when the request ends)."""
        fed = [self._input] if self._fed else []  # the last input went through the model
        return [*self.done_tokens, *fed], self.cache
