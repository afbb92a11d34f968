"""lm-eval's ``HFLM`` with token-bounded batches and progress reports.

Imported only when benchmarks run (it imports lm-eval and torch). lm-eval pads each batch to its
longest request and takes a float32 log-softmax over the whole vocabulary, so a fixed batch of
16 five-shot MMLU prompts (about 1,000 tokens each, 49,152-token vocabulary) needs several GB.
``HostLM`` sizes each loglikelihood batch so that ``batch x longest request`` stays within
``max_batch_tokens`` (and ``batch`` within ``batch_size``), through lm-eval's own hook for
variable batch sizes (``_batch_scheduler``, used when the batch size is "auto").
"""
from __future__ import annotations

from typing import Callable

import torch
import transformers
from lm_eval.models.huggingface import HFLM


class StopStrings(transformers.StoppingCriteria):
    """Per-row stop: a row is finished once any stop string appears in its newly generated text.

    (lm-eval's criterion ends a batch only when one and the same stop string has appeared in every
    row, so a batch whose rows stop on different strings runs to the token limit.)"""

    def __init__(self, tokenizer, stops, prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        self.lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stops),
                            default=0) + 2

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_len:][:, -self.lookback:]
        texts = self.tokenizer.batch_decode(new)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HostLM(HFLM):
    """An in-memory Hugging Face causal LM for ``lm_eval.simple_evaluate``.

    ``progress(done, total)`` is called as loglikelihood requests complete: ``done`` counts model
    rows (requests sharing a context are scored by one row), and is set to ``total`` when a
    request list is finished.
    """

    def __init__(self, model, tokenizer, *, batch_size: int, max_batch_tokens: int,
                 progress: Callable[[int, int], None] | None = None):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size="auto")
        self.max_batch = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.progress = progress
        self._chunk_end = 0
        self._chunk_size = batch_size
        self._done = 0
        self._total = 0

    def _batch_scheduler(self, pos, n_reordered_requests):
        """Size of the batch starting at ``pos`` (called for every request, longest first)."""
        if pos == 0 or pos >= self._chunk_end:
            _, context, continuation = n_reordered_requests[pos]
            tokens = min(len(context) + len(continuation), self.max_length + 1)
            self._chunk_size = max(1, min(self.max_batch, self.max_batch_tokens // tokens))
            self._chunk_end = pos + self._chunk_size
        return self._chunk_size

    def _model_generate(self, context, max_length: int, stop: list, **generation_kwargs):
        """Greedy unless the task asks to sample; every row stops at its own first stop string."""
        if generation_kwargs.get("temperature", 0.0) == 0.0 and not generation_kwargs.get("do_sample"):
            generation_kwargs.pop("temperature", None)
            generation_kwargs["do_sample"] = False
        criteria = transformers.StoppingCriteriaList([StopStrings(self.tokenizer, stop, context.shape[1])])
        return self.model.generate(input_ids=context, max_length=max_length, stopping_criteria=criteria,
                                   pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                   **generation_kwargs)

    def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
        """The fixed batch size (no trial runs) for request types other than loglikelihood."""
        return self.max_batch

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._total += len(requests)
        self._report()
        # our own progress display replaces lm-eval's bars
        result = super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.progress is not None)
        self._done = self._total
        self._report()
        return result

    def _model_call(self, inps, *args, **kwargs):
        logits = super()._model_call(inps, *args, **kwargs)
        self._done = min(self._total, self._done + len(inps))
        self._report()
        return logits

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self._done, self._total)
