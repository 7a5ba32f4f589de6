"""The mlx-vlm adapter: vision (and audio) requests, with images handed to the processor as PIL images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from backends import SamplingParams, Step, make_sampler_and_processors, seed_everything


class PinnedStopCriteria:
    """mlx-vlm's stopping criteria, fixed to the pinned id set.

    mlx-vlm keeps stop ids on the tokenizer as shared mutable state: `generate(eos_tokens=…)` adds to
    it permanently, `reset()` adds the tokenizer's own eos back, and `stream_generate` never resets it.
    The runtime installs a fresh one of these before every request, so the set is exactly the pin.
    """

    def __init__(self, stop_ids: Sequence[int]) -> None:
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in stop_ids))
        self._ids = frozenset(self.eos_token_ids)

    def __call__(self, token: Any) -> bool:
        value = token.item() if hasattr(token, "item") else token
        return int(value) in self._ids

    def reset(self, eos_token_ids: Any = None) -> None:
        """Ignored: the pinned set is not to be changed by library code."""

    def add_eos_token_ids(self, new_eos_token_ids: Any = None) -> None:
        """Ignored: the pinned set is not to be changed by library code."""


class MlxVlmBackend:
    """Generate with mlx_vlm.stream_generate; media reaches the processor and the towers."""

    name = "mlx-vlm"

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor

    @classmethod
    def load(cls, path: Path, *, trust_remote_code: bool = False) -> MlxVlmBackend:
        """Load a model folder with mlx_vlm."""
        import mlx_vlm

        model, processor = mlx_vlm.load(str(path), trust_remote_code=trust_remote_code)
        return cls(model, processor)

    def add_special_tokens(self) -> bool:
        """Whether mlx-vlm adds special tokens when it tokenizes a prompt for this model."""
        from mlx_vlm.utils import should_add_special_tokens

        return bool(should_add_special_tokens(self.model.config.model_type, self.processor))

    def tokenize(self, text: str) -> list[int]:
        """Encode a rendered prompt the way mlx-vlm's prepare_inputs does for text-only requests."""
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens()))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text."""
        return str(self.tokenizer.decode(list(ids)))

    def generate(
        self, prompt: str, params: SamplingParams, stop_ids: Sequence[int], media: Any | None = None
    ) -> Iterator[Step]:
        """Stream an answer; `media` is a runtime.media.DecodedMedia (PIL images, audio/video file paths)."""
        from mlx_vlm import stream_generate

        self.tokenizer.stopping_criteria = PinnedStopCriteria(stop_ids)
        sampler, processors = make_sampler_and_processors(params)
        seed_everything(params.seed)
        images = list(media.images) if media is not None else []
        audio = list(media.audio) if media is not None else []
        video = list(media.video) if media is not None else []
        previous_count = -1
        for response in stream_generate(
            self.model,
            self.processor,
            prompt,
            image=images or None,
            audio=audio or None,
            video=video or None,
            max_tokens=max(params.max_tokens, 1),
            sampler=sampler,
            logits_processors=processors,
        ):
            finish = getattr(response, "finish_reason", None)
            token = response.token
            token_id = int(token.item() if hasattr(token, "item") else token) if token is not None else None
            count = int(response.generation_tokens)
            if finish is not None and count == previous_count:
                token_id = None  # mlx-vlm's closing response repeats the last token; it is not a new one
            previous_count = count
            yield Step(
                text=response.text,
                token=token_id,
                prompt_tokens=int(response.prompt_tokens),
                completion_tokens=int(response.generation_tokens),
                prompt_tps=float(response.prompt_tps or 0.0),
                generation_tps=float(response.generation_tps or 0.0),
                peak_memory_gb=float(response.peak_memory or 0.0),
                finish_reason=finish,
            )
