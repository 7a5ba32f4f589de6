"""The mlx-vlm adapter: vision (and audio, video) models; media reach the processor and the towers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MlxVlmBackend:
    """A loaded mlx-vlm model and its processor."""

    name = "mlx-vlm"

    def __init__(
        self, model: Any, processor: Any, *, draft_model: Any = None, draft_kind: str | None = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
        self.draft_model = draft_model
        self.draft_kind = draft_kind

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        trust_remote_code: bool = False,
        draft_path: Path | None = None,
        draft_kind: str | None = None,
        quantize_activations: bool = False,
        strict_kind: bool = False,
    ) -> MlxVlmBackend:
        """Load a model folder with mlx_vlm; a drafter (bundled MTP layers, or a separate one) when asked.

        `quantize_activations` (mxfp8/nvfp4 weights, CUDA only): mlx-vlm turns their layers into QQLinear.
        With `strict_kind` (a pinned drafter) a drafter whose own config needs another kind is refused instead of
        silently switched, and mlx-vlm's pairing checks run now rather than inside the first request.
        """
        import mlx_vlm

        model, processor = mlx_vlm.load(
            str(path), trust_remote_code=trust_remote_code, quantize_activations=quantize_activations
        )
        draft = None
        if draft_path is not None:
            from mlx_vlm.speculative import load_drafter
            from mlx_vlm.speculative.drafters import validate_drafter_compatibility

            # Returns the kind it resolved from the drafter's own config (it overrides a conflicting one).
            draft, resolved = load_drafter(str(draft_path), kind=draft_kind)
            if strict_kind and resolved != draft_kind:
                raise ValueError(
                    f"mlx.drafter.kind is {draft_kind!r}, but mlx-vlm reads this drafter as {resolved!r}"
                )
            draft_kind = resolved
            if strict_kind:
                validate_drafter_compatibility(model, draft, draft_kind)
        return cls(model, processor, draft_model=draft, draft_kind=draft_kind)

    @property
    def hf_tokenizer(self) -> Any:
        """The Hugging Face tokenizer (for llguidance)."""
        return getattr(self.tokenizer, "_tokenizer", self.tokenizer)

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer."""
        config = getattr(self.model, "config", None)
        text = getattr(config, "text_config", None)
        size = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
        return int(size) if size else len(self.hf_tokenizer)

    def add_special_tokens(self) -> bool:
        """Whether mlx-vlm adds special tokens when it tokenizes a prompt for this model."""
        from mlx_vlm.utils import should_add_special_tokens

        return bool(should_add_special_tokens(self.model.config.model_type, self.processor))

    def tokenize(self, text: str) -> list[int]:
        """Encode a rendered prompt the way mlx-vlm's prepare_inputs does for text-only requests."""
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens()))

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of a text fragment (a marker), without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text."""
        return str(self.tokenizer.decode(list(ids)))
