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

from lm_eval.models.huggingface import HFLM


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
