"""lm-eval's ``HFLM`` with shared-work log-likelihoods, token-bounded batches and progress reports.

Log-likelihood requests go to ``edgebuild.bench.prefix_scoring.PackedScorer`` (one row per context with
all its continuations, one computation per shared few-shot prefix) when the model supports it
(``packed=True``, the default); otherwise to lm-eval's own code, batched as below. Generation
moves a batch's common prompt prefix into a precomputed cache and decodes with
``edgebuild.bench.decode`` (finished rows leave the batch); other generation settings than
greedy/temperature/top-k/top-p go to ``transformers``' ``generate``.

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

from edgebuild.bench import decode
from edgebuild.bench.prefix_scoring import (MIN_PREFIX, PackedScorer, common_prefix, expanded_cache,
                                    prefix_cache, supports)
from edgebuild.core.models import cache_arg


class StopStrings(transformers.StoppingCriteria):
    """Per-row stop: a row is finished once any stop string appears in its newly generated text.

    (lm-eval's criterion ends a batch only when one and the same stop string has appeared in every
    row, so a batch whose rows stop on different strings runs to the token limit.)"""

    def __init__(self, tokenizer, stops, prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        self.lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stops),
                            default=0) + 2

    def __call__(self, input_ids, scores, **kwargs):
        done = self.finished(input_ids[:, self.prompt_len:])
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def finished(self, new_tokens) -> list[bool]:
        """For each row of newly generated tokens, whether a stop string has appeared."""
        texts = self.tokenizer.batch_decode(new_tokens[:, -self.lookback:])
        return [any(stop in text for stop in self.stops) for text in texts]


class HostLM(HFLM):
    """An in-memory Hugging Face causal LM for ``lm_eval.simple_evaluate``.

    ``progress(done, total)`` is called as loglikelihood requests complete (``done`` is set to
    ``total`` when a request list is finished). ``packed`` (default) uses the shared-work scorer
    and decoder of the module doc where the model supports them.
    """

    def __init__(self, model, tokenizer, *, batch_size: int, max_batch_tokens: int,
                 progress: Callable[[int, int], None] | None = None, packed: bool = True):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size="auto")
        self.packed = packed and supports(model)
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
        """Greedy unless the task asks to sample; every row stops at its own first stop string.
        Packed: the batch's common prompt prefix (a few-shot block, or the one prompt of
        repeated samples) runs once and reaches every row as a cache."""
        if generation_kwargs.get("temperature", 0.0) == 0.0 and not generation_kwargs.get("do_sample"):
            generation_kwargs.pop("temperature", None)
            generation_kwargs["do_sample"] = False
        mask = generation_kwargs.pop("attention_mask", None)
        inputs = {"input_ids": context,
                  "attention_mask": torch.ones_like(context) if mask is None else mask}
        if self.packed:
            inputs = self._shared_prefix(**inputs)
        stops = StopStrings(self.tokenizer, stop, context.shape[1])
        if self.packed and set(generation_kwargs) <= decode.SUPPORTED:
            return decode.decode(self.model, **inputs, max_length=max_length,
                                 finished=stops.finished, eos=self._eos_ids(),
                                 pad_token_id=self.tokenizer.pad_token_id or 0, **generation_kwargs)
        if "cache" in inputs:
            inputs[cache_arg(self.model)] = inputs.pop("cache")
        return self.model.generate(**inputs, max_length=max_length,
                                   stopping_criteria=transformers.StoppingCriteriaList([stops]),
                                   pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                   **generation_kwargs)

    def _eos_ids(self) -> set:
        """Token ids that end a generated answer (the model's generation config, else the
        tokenizer's end-of-sequence token)."""
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])

    def _shared_prefix(self, input_ids, attention_mask) -> dict:
        """Generation inputs with the rows' common leading tokens moved in front of the padding
        (``[prefix][pad][rest]``, same width) and given as a precomputed cache."""
        rows = [ids[keep.bool()].tolist() for ids, keep in zip(input_ids, attention_mask)]
        shared = min([common_prefix(tuple(rows[0]), tuple(r)) for r in rows] +
                     [len(r) - 1 for r in rows])
        if shared < MIN_PREFIX:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        ids = torch.full_like(input_ids, self.tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(attention_mask)
        width = input_ids.shape[1]
        for i, row in enumerate(rows):
            rest = len(row) - shared
            ids[i, :shared], ids[i, width - rest:] = torch.tensor(row[:shared]), torch.tensor(row[shared:])
            mask[i, :shared] = mask[i, width - rest:] = 1
        layers = prefix_cache(self.model.get_decoder(), rows[0][:shared], input_ids.device)
        return {"input_ids": ids, "attention_mask": mask, "cache": expanded_cache(layers, len(rows))}

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

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Packed scoring (see module doc) when enabled; lm-eval's row-per-request otherwise."""
        if not self.packed:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=override_bs)
        start = self._done

        def report(done: int, total: int) -> None:
            self._done = start + done
            self._report()

        scorer = PackedScorer(self.model, max_rows=self.max_batch, max_tokens=self.max_batch_tokens,
                              max_length=self.max_length, progress=report)
        results = scorer.score([(context, continuation) for _, context, continuation in requests])
        for (request, _, _), answer in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def _model_call(self, inps, *args, **kwargs):
        logits = super()._model_call(inps, *args, **kwargs)
        self._done = min(self._total, self._done + len(inps))
        self._report()
        return logits

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self._done, self._total)
