"""A request's sampling values, resolved in one place: the request, then the load options, then the config.

The load options and the config's `parameters` are merged once, when the engine loads (`SamplingDefaults`);
each request is then resolved against that one object (`SamplingDefaults.params`), on the caller's thread,
into the `SamplingParams` the decoders use (backends.sampling).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from backends.sampling import SamplingParams, random_seed
from gallery.config import Parameters
from runtime.load_options import LoadOptions
from runtime.request import GenerationRequest

# The load options that set a request default, named as in the config's `parameters`.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed")

_T = TypeVar("_T")


def _pick(*values: _T | None) -> _T | None:
    return next((value for value in values if value is not None), None)


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Request defaults (None: not set here); built from load options, then laid over the config's."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None

    @classmethod
    def from_options(cls, options: LoadOptions, *, seed: int | None = None) -> SamplingDefaults:
        """The defaults the load options give (`seed`: ModelOptions' typed Seed, used when no option sets it)."""
        given = {key: options.get(key) for key in SAMPLING_KEYS if options.given(key)}
        if seed is not None and "seed" not in given:
            given["seed"] = seed
        return cls(**given)

    def over(self, config: Parameters) -> SamplingDefaults:
        """These defaults, and the config's where these leave a value unset."""
        return SamplingDefaults(
            **{key: _pick(getattr(self, key), getattr(config, key)) for key in SAMPLING_KEYS}
        )

    def params(self, request: GenerationRequest) -> SamplingParams:
        """The request's sampling values, falling back to these defaults, then the built-in ones."""
        temperature = float(_pick(request.temperature, self.temperature, 0.0) or 0.0)
        seed = _pick(request.seed, self.seed)
        if seed is None and temperature > 0:
            seed = random_seed()
        return SamplingParams(
            temperature=temperature,
            top_p=float(_pick(request.top_p, self.top_p, 1.0) or 0.0),
            top_k=int(_pick(request.top_k, self.top_k, 0) or 0),
            min_p=float(_pick(request.min_p, self.min_p, 0.0) or 0.0),
            repetition_penalty=_pick(request.repeat_penalty, self.repeat_penalty),
            repetition_context_size=request.repetition_context_size or 20,
            presence_penalty=request.presence_penalty,
            presence_context_size=request.presence_context_size or 20,
            frequency_penalty=request.frequency_penalty,
            frequency_context_size=request.frequency_context_size or 20,
            logit_bias=dict(request.logit_bias) if request.logit_bias else None,
            seed=seed,
        )
