"""The mlx-lm adapter: text models, and the text route of VLM families that share weights."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from backends import SamplingParams, Step, make_sampler_and_processors, seed_everything


class MlxLmBackend:
    """Generate with mlx_lm.stream_generate, stopping on exactly the pinned stop ids."""

    name = "mlx"

    def __init__(self, model: Any, tokenizer: Any, *, draft_model: Any = None, num_draft_tokens: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens

    @classmethod
    def load(cls, path: Path, *, draft_path: Path | None = None, num_draft_tokens: int | None = None,
             trust_remote_code: bool = False) -> MlxLmBackend:
        """Load a model folder with mlx_lm (and an optional draft model sharing its tokenizer)."""
        import mlx_lm

        model, tokenizer = mlx_lm.load(str(path), tokenizer_config={"trust_remote_code": trust_remote_code})
        draft = None
        if draft_path is not None:
            draft, _ = mlx_lm.load(str(draft_path), tokenizer_config={"trust_remote_code": trust_remote_code})
        return cls(model, tokenizer, draft_model=draft, num_draft_tokens=num_draft_tokens)

    def tokenize(self, text: str) -> list[int]:
        """Encode a rendered prompt; BOS is added only when the template did not write it (as mlx-lm does)."""
        bos = self.tokenizer.bos_token
        add_special = bos is None or not text.startswith(bos)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text."""
        return str(self.tokenizer.decode(list(ids)))

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, stop_ids: Sequence[int], media: Any | None = None
    ) -> Iterator[Step]:
        """Stream an answer. `prompt` may be text or token ids."""
        import mlx.core as mx
        from mlx_lm import stream_generate

        if media is not None and getattr(media, "count", 0):
            raise ValueError("the mlx-lm backend cannot take media")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        # Exactly the pinned set, every request: mlx_lm stops on this wrapper attribute.
        self.tokenizer.eos_token_ids = set(stop_ids)
        sampler, processors = make_sampler_and_processors(params)
        seed_everything(params.seed)
        kwargs: dict[str, Any] = {"sampler": sampler, "logits_processors": processors}
        if self.draft_model is not None:
            kwargs["draft_model"] = self.draft_model
            if self.num_draft_tokens:
                kwargs["num_draft_tokens"] = self.num_draft_tokens
        for response in stream_generate(self.model, self.tokenizer, mx.array(ids), max_tokens=max(params.max_tokens, 1),
                                         **kwargs):
            yield Step(
                text=response.text,
                token=int(response.token),
                prompt_tokens=int(response.prompt_tokens),
                completion_tokens=int(response.generation_tokens),
                prompt_tps=float(response.prompt_tps),
                generation_tps=float(response.generation_tps),
                peak_memory_gb=float(response.peak_memory),
                finish_reason=response.finish_reason,
            )
