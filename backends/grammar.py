"""Structured output: constrain generation to a JSON schema, a regex or a Lark grammar with llguidance.

llguidance (an mlx-vlm dependency) compiles the grammar and computes, per step, the bitmask of tokens
allowed next. mlx-vlm applies that mask with a Metal kernel, which does not exist on the Linux CPU build;
here the mask is unpacked with numpy and applied with `mx.where`, which works on every MLX device.

The constraint starts after the reasoning block when the request thinks (the grammar shapes the answer,
not the model's private reasoning), and once the grammar is complete only the pinned stop tokens are
allowed, so generation ends exactly where the structured answer does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

GrammarKind = Literal["json_schema", "json_object", "regex", "lark"]

# Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
_JSON_OBJECT_SCHEMA = {"type": "object"}
_TOKENIZERS: dict[int, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


class GrammarError(ValueError):
    """A grammar or schema llguidance cannot compile."""


def llg_tokenizer(hf_tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face tokenizer, built once per tokenizer (it walks the whole vocabulary)."""
    import llguidance.hf

    with _TOKENIZERS_LOCK:
        found = _TOKENIZERS.get(id(hf_tokenizer))
        if found is None:
            found = llguidance.hf.from_tokenizer(hf_tokenizer)
            _TOKENIZERS[id(hf_tokenizer)] = found
        return found


def marker_lark(marker: str, hf_tokenizer: Any) -> str:
    """A tool-call marker in llguidance's Lark: the special token by id where the marker is one (a quoted string
    would never match it: llguidance keeps special tokens out of text), else the quoted text."""
    ids = hf_tokenizer.encode(marker, add_special_tokens=False)
    if len(ids) == 1 and llg_tokenizer(hf_tokenizer).is_special_token(int(ids[0])):
        return f"<[{int(ids[0])}]>"
    return json.dumps(marker)


def compile_grammar(
    kind: GrammarKind,
    text: str | dict[str, Any] | None,
    tokenizer: Any,
    *,
    budget_s: float = 0.5,
) -> str:
    """The llguidance grammar for a request, checked against the tokenizer. Raises GrammarError naming the problem."""
    from llguidance import LLMatcher

    try:
        if kind in ("json_schema", "json_object"):
            schema = _JSON_OBJECT_SCHEMA if kind == "json_object" or text is None else text
            source = json.dumps(schema) if isinstance(schema, dict) else str(schema)
            # Compact JSON (", " and ": " only): with free whitespace a weak model can pad an answer forever.
            grammar = LLMatcher.grammar_from_json_schema(source, defaults={"whitespace_flexible": False})
        elif kind == "regex":
            grammar = LLMatcher.grammar_from_regex(str(text))
        else:
            grammar = LLMatcher.grammar_from_lark(str(text))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise GrammarError(f"{kind}: {' '.join(str(exc).split())[:300]}") from None
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise GrammarError(
            f"{kind}: the grammar is {len(grammar)} characters, over the limit of {MAX_GRAMMAR_CHARS}"
        )
    limits = grammar_limits()
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer, limits=limits)
    if is_error:
        raise GrammarError(f"{kind}: {' '.join('; '.join(messages).split())[:300]}")
    # The first step, here on the caller's thread: a grammar the matcher cannot follow (or one that admits no
    # token at all) is refused now, not answered with an empty completion.
    import llguidance.numpy

    started = time.perf_counter()
    matcher = LLMatcher(tokenizer, grammar, limits=limits)
    bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
    llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
    took = time.perf_counter() - started
    if took > budget_s:
        # The worker builds the same matcher again for generation: this is what it would stall everyone for.
        raise GrammarError(
            f"{kind}: the grammar is too complex (building its matcher took {took:.1f} s, over the "
            f"{budget_s:g} s budget, load option grammar_budget_s); send a smaller grammar"
        )
    if matcher.is_error():
        raise GrammarError(f"{kind}: {' '.join(matcher.get_error().split())[:300]}")
    if not bitmask.any() and not matcher.is_accepting():
        raise GrammarError(f"{kind}: the grammar admits no token of this model's vocabulary")
    return grammar


# A grammar's size and the work per step are bounded (llguidance's limits), so one request's grammar cannot
# stall the worker that every other request on the model shares.
MAX_GRAMMAR_CHARS = 256 * 1024
_LIMITS: Any = None


def grammar_limits() -> Any:
    """llguidance's parser limits for request grammars (grammar size and per-step work, below its defaults)."""
    global _LIMITS
    if _LIMITS is None:
        from llguidance import LLParserLimits

        _LIMITS = LLParserLimits(max_grammar_size=100_000, step_lexer_fuel=100_000, step_max_items=25_000)
    return _LIMITS


class GrammarProcessor:
    """A logits processor that allows only the tokens the grammar accepts next.

    Reasoning stays free: when the prompt ends inside a reasoning block the constraint waits for the end
    marker's tokens (`reasoning_end`); when thinking is on and the start marker is one token, the first step
    also allows that token, and if the model opens a reasoning block the constraint waits for its end.
    """

    def __init__(
        self,
        grammar: str,
        tokenizer: Any,
        stop_ids: Sequence[int],
        *,
        reasoning_start: Sequence[int] = (),
        reasoning_end: Sequence[int] = (),
        inside: bool = False,
        may_think: bool = False,
    ) -> None:
        from llguidance import LLMatcher

        self.matcher = LLMatcher(tokenizer, grammar, limits=grammar_limits())
        self.vocab_size = tokenizer.vocab_size
        self.llg_eos = [int(i) for i in getattr(tokenizer, "eos_tokens", [tokenizer.eos_token])]
        self.stop_ids = [int(i) for i in stop_ids]
        self.start_ids = list(reasoning_start)
        self.end_ids = list(reasoning_end)
        can_open = may_think and len(self.start_ids) == 1
        self.phase = "reasoning" if inside and self.end_ids else "maybe" if can_open else "grammar"
        self.recent: list[int] = []
        self.consume_next = False  # the previous step's mask came from the matcher: consume what was chosen
        self.first = True

    def _mask(self, size: int) -> Any:
        import llguidance.numpy
        import numpy as np

        allowed = np.zeros(size, dtype=bool)
        if not self.matcher.is_stopped():
            bitmask = llguidance.numpy.allocate_token_bitmask(1, self.vocab_size)
            llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask, 0)
            bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
            allowed[: min(size, bits.shape[0])] = bits[:size]
        if self.matcher.is_stopped() or self.matcher.is_accepting():
            # The answer may (or must) end here. It ends with one of the pinned stop tokens, which need not be
            # the tokenizer's eos that llguidance allows (that one would otherwise be generated as text).
            allowed[[i for i in self.llg_eos if i < size]] = False
            allowed[[i for i in self.stop_ids if i < size]] = True
        return allowed

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        last = None if self.first else int(tokens[-1].item()) if len(tokens) else None
        self.first = False
        if last is not None:
            self.recent = [*self.recent, last][-max(len(self.end_ids), 1) :]
            if self.phase == "maybe":
                self.phase = "reasoning" if last == self.start_ids[0] else "grammar"
                self.consume_next = self.phase == "grammar"
            elif (
                self.phase == "reasoning"
                and self.end_ids
                and self.recent[-len(self.end_ids) :] == self.end_ids
            ):
                self.phase = "grammar"
            if self.consume_next and not self.matcher.consume_token(last):
                raise GrammarError(
                    f"token {last} broke the grammar: {self.matcher.get_error() or 'rejected'}"
                )
        if self.phase == "reasoning":
            # The structured answer comes after the reasoning: the answer may not end before it starts.
            self.consume_next = False
            if not self.stop_ids:
                return logits
            blocked = mx.array([i for i in self.stop_ids if i < logits.shape[-1]])
            return logits.at[..., blocked].add(-float("inf")) if blocked.size else logits
        allowed = self._mask(logits.shape[-1])
        if self.phase == "maybe":
            allowed[self.start_ids[0]] = True
        self.consume_next = self.phase == "grammar"
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))
