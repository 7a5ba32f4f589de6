"""mlx-lm's BatchGenerator with one sampler for the whole batch that knows which request each row is.

mlx-lm 0.32 samples a decoding batch in one call only when every row has the same sampler object; with one
sampler per request it calls each on its own row and concatenates (a few MLX ops and a key per sequence per
step). So every row here gets the batcher's `BatchSampler`, and the batch tells it the row order just
before it samples: mlx-lm calls the sampler from `GenerationBatch._step`, both for the running batch and,
inside `PromptProcessingBatch.generate`, for the rows that have just finished their prompts (a new batch,
stepped once before it joins the running one). Each of those two methods is wrapped to name its `uids`
(the rows in logits order, unchanged during the step: rows are filtered only after it) around the call.

Why subclasses rather than reading `generator._generation_batch.uids` from the sampler: the rows that just
finished their prompts are sampled inside a batch the generator does not hold yet, so only the batch being
stepped knows them. The generator's two batch holders are replaced by these subclasses once, at
construction; the prompt batch's `split` copies keep the subclass (it copies with `self.__class__`).
"""

from __future__ import annotations

from typing import Any

from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch

from backends.sampling import BatchSampler


class _KeyedGeneration(GenerationBatch):
    def _step(self) -> Any:
        sampler = self.fallback_sampler
        if not isinstance(sampler, BatchSampler):
            return super()._step()
        with sampler.rows_of(self.uids):
            return super()._step()


class _KeyedPrompts(PromptProcessingBatch):
    def generate(self, tokens: list[list[int]]) -> Any:
        sampler = self.fallback_sampler
        if not isinstance(sampler, BatchSampler):
            return super().generate(tokens)
        # The new GenerationBatch takes this batch's uids, in order, and samples them once at construction.
        with sampler.rows_of(list(self.uids)):
            return super().generate(tokens)


class KeyedBatchGenerator(BatchGenerator):
    """A BatchGenerator whose rows all share `sampler` (insert rows with samplers=None), told each row order."""

    def __init__(self, model: Any, *, sampler: BatchSampler, **options: Any) -> None:
        super().__init__(model, sampler=sampler, **options)
        self._prompt_batch = _KeyedPrompts.empty(
            self.model, self.sampler, prefill_step_size=self.prefill_step_size
        )
        self._generation_batch = _KeyedGeneration.empty(self.model, self.sampler)
