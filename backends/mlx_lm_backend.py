"""The mlx-lm adapter: text models, and the text route of VLM families that share weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Shard:
    """Load only this rank's part of a model: the group, "pipeline" or "tensor", and the layers per rank."""

    group: Any  # backends.distributed.Group
    strategy: str
    layer_split: tuple[int, ...] | None = None


class MlxLmBackend:
    """A loaded mlx-lm model: tokenizing the way mlx-lm does, and streaming detokenizers per request."""

    name = "mlx"

    def __init__(self, model: Any, tokenizer: Any, *, draft_model: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.draft_model = draft_model

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        draft_path: Path | None = None,
        trust_remote_code: bool = False,
        shard: Shard | None = None,
        quantize_activations: bool = False,
    ) -> MlxLmBackend:
        """Load a model folder with mlx_lm (and an optional draft model sharing its tokenizer).

        With `shard`, the weights are loaded lazily and split with the class's own pipeline/shard method
        first, so this rank reads only its part (what mlx-lm's sharded_load does, minus its downloads).
        `quantize_activations` (mxfp8/nvfp4 weights, CUDA only): mlx-lm builds QQLinear layers.
        """
        import mlx_lm

        loaded = mlx_lm.load(
            str(path),
            tokenizer_config={"trust_remote_code": trust_remote_code},
            model_config={"quantize_activations": True} if quantize_activations else None,
            lazy=shard is not None,
        )
        model, tokenizer = loaded[0], loaded[1]
        if shard is not None:
            from backends.distributed import shard_model

            shard_model(model, shard.group, shard.strategy, shard.layer_split)
        draft = None
        if draft_path is not None:
            draft = mlx_lm.load(str(draft_path), tokenizer_config={"trust_remote_code": trust_remote_code})[0]
        return cls(model, tokenizer, draft_model=draft)

    @property
    def hf_tokenizer(self) -> Any:
        """The Hugging Face tokenizer inside mlx-lm's wrapper (for llguidance)."""
        return getattr(self.tokenizer, "_tokenizer", self.tokenizer)

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer (what log-probabilities and token ids range over)."""
        args = getattr(self.model, "args", None)
        size = getattr(args, "vocab_size", None)
        return int(size) if size else len(self.hf_tokenizer)

    def tokenize(self, text: str) -> list[int]:
        """Encode a rendered prompt; BOS is added only when the template did not write it (as mlx-lm does)."""
        bos = self.tokenizer.bos_token
        add_special = bos is None or not text.startswith(bos)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of a text fragment (a marker), without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text."""
        return str(self.tokenizer.decode(list(ids)))

    def detokenizer(self) -> Any:
        """A fresh streaming detokenizer (one per request: they hold state)."""
        return self.tokenizer.detokenizer
