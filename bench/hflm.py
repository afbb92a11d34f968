"""lm-eval's ``HFLM`` with shared-work log-likelihoods and generation, token-bounded batches and progress reports.

Log-likelihood requests go to ``edgebuild.bench.prefix_scoring.PackedScorer`` (one row per context with
all its continuations, one computation per shared few-shot prefix) when the model supports it
(``packed=True``, the default); otherwise to lm-eval's own code, batched as below. Generation
requests go to ``edgebuild.bench.decode.generate_groups`` (the requests of every task lm-eval
hands over at once in one running batch, each task's shared prompt prefix computed once, the
batch refilled as rows finish, identical prompts run once, sampled rows seeded per row);
other generation settings than greedy/temperature/top-k/top-p go to ``transformers``' ``generate``
through lm-eval's own loop.

Imported only when benchmarks run (it imports lm-eval and torch). lm-eval pads each batch to its
longest request and takes a float32 log-softmax over the whole vocabulary, so a fixed batch of
16 five-shot MMLU prompts (about 1,000 tokens each, 49,152-token vocabulary) needs several GB.
``HostLM`` sizes each loglikelihood batch so that ``batch x longest request`` stays within
``max_batch_tokens`` (and ``batch`` within ``batch_size``), through lm-eval's own hook for
variable batch sizes (``_batch_scheduler``, used when the batch size is "auto").
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from typing import Callable

import torch
import transformers
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from edgebuild.bench import decode
from edgebuild.bench.prefix_scoring import PackedScorer, supports


class StopStrings(transformers.StoppingCriteria):
    """Per-row stop: a row is finished once any stop string appears in its newly generated text.

    (lm-eval's criterion ends a batch only when one and the same stop string has appeared in every
    row, so a batch whose rows stop on different strings runs to the token limit.)"""

    def __init__(self, tokenizer, stops, prompt_len: int = 0):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        self.lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stops),
                            default=0) + 2

    def __call__(self, input_ids, scores, **kwargs):
        done = self.finished(input_ids[:, self.prompt_len:].tolist())
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def finished(self, new_tokens: list[list[int]]) -> list[bool]:
        """For each row's newly generated tokens, whether a stop string has appeared."""
        if not self.stops:
            return [False] * len(new_tokens)
        texts = self.tokenizer.batch_decode([row[-self.lookback:] for row in new_tokens])
        return [any(stop in text for stop in self.stops) for text in texts]


class HostLM(HFLM):
    """An in-memory Hugging Face causal LM for ``lm_eval.simple_evaluate``.

    ``progress(done, total)`` is called as loglikelihood requests complete (``done`` is set to
    ``total`` when a request list is finished). ``packed`` (default) uses the shared-work scorer
    and decoder of the module doc where the model supports them.
    """

    def __init__(self, model, tokenizer, *, batch_size: int, max_batch_tokens: int,
                 progress: Callable[[int, int], None] | None = None, packed: bool = True,
                 gen_batch_size: int = 64):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size="auto")
        self.packed = packed and supports(model)
        self.max_batch = batch_size
        self.max_gen_rows = gen_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.progress = progress
        self._chunk_end = 0
        self._chunk_size = batch_size
        self._done = 0
        self._total = 0
        self._encodings: dict | None = None

    def _batch_scheduler(self, pos, n_reordered_requests):
        """Size of the batch starting at ``pos`` (called for every request, longest first)."""
        if pos == 0 or pos >= self._chunk_end:
            _, context, continuation = n_reordered_requests[pos]
            tokens = min(len(context) + len(continuation), self.max_length + 1)
            self._chunk_size = max(1, min(self.max_batch, self.max_batch_tokens // tokens))
            self._chunk_end = pos + self._chunk_size
        return self._chunk_size

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Packed: every group of requests with the same generation settings (one task's) in one
        running batch through ``decode.generate_groups`` (see the module doc), answers cut at the
        first stop string as lm-eval does; lm-eval's own loop otherwise (its batch-size notice
        goes to stderr)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        out: list = [None] * len(requests)
        packed = []
        for indices in groups.values():
            chosen = [requests[i] for i in indices]
            plan = self._plan(chosen[0].args[1])
            if plan is None:
                with contextlib.redirect_stdout(sys.stderr):
                    texts = super().generate_until(chosen, disable_tqdm=disable_tqdm)
                for i, text in zip(indices, texts):
                    out[i] = text
            else:
                packed.append((indices, chosen, plan))
        for (indices, chosen, _), texts in zip(packed, self._generate_packed(packed)):
            for i, text in zip(indices, texts):
                out[i] = text
        return out

    def _plan(self, gen_kwargs: dict):
        """``(stop strings, max new tokens, sampling kwargs)`` of packed generation, or None when
        the settings need lm-eval's own loop."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        if not self.packed or not set(kwargs) <= decode.SUPPORTED or self.think_end_token is not None:
            return None
        return until, max_gen_toks, kwargs

    def _generate_packed(self, packed: list) -> list[list[str]]:
        """Answers of every packed group, all decoded in one running batch."""
        groups = []
        for _, requests, (until, max_gen_toks, kwargs) in packed:
            contexts = [request.args[0] for request in requests]
            prompts = [self._prompt(context, self.max_length - max_gen_toks) for context in contexts]
            seeds = _row_seeds(contexts) if kwargs.get("do_sample") else None
            settings = decode.settings(max_gen_toks, StopStrings(self.tokenizer, until).finished,
                                       self._eos_ids(), **kwargs)
            groups.append(decode.Group(prompts, settings, seeds))
        new = decode.generate_groups(self.model, groups, max_rows=self.max_gen_rows)
        out = []
        for (_, requests, (until, _, _)), tokens in zip(packed, new):
            texts = [postprocess_generated_text(self.tok_decode(row), until, None) for row in tokens]
            for request, text in zip(requests, texts):
                self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(texts)
        return out

    def _prompt(self, context: str, max_tokens: int) -> list[int]:
        """The prompt's tokens as lm-eval's batch encoding gives them, left-truncated."""
        ids, mask = self.tok_batch_encode([context], left_truncate_len=max_tokens)
        return ids[0][mask[0].bool()].tolist()

    def _model_generate(self, context, max_length: int, stop: list, **generation_kwargs):
        """``transformers``' ``generate`` (the unpacked path), every row stopping at its own
        first stop string."""
        mask = generation_kwargs.pop("attention_mask", None)
        stops = StopStrings(self.tokenizer, stop, context.shape[1])
        return self.model.generate(input_ids=context,
                                   attention_mask=torch.ones_like(context) if mask is None else mask,
                                   max_length=max_length, use_cache=True,
                                   stopping_criteria=transformers.StoppingCriteriaList([stops]),
                                   pad_token_id=self.tokenizer.pad_token_id, **generation_kwargs)

    def _eos_ids(self) -> set:
        """Token ids that end a generated answer (the model's generation config, else the
        tokenizer's end-of-sequence token)."""
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])

    def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
        """The fixed batch size (no trial runs) for request types other than loglikelihood."""
        return self.max_batch

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._total += len(requests)
        self._report()
        # our own progress display replaces lm-eval's bars; each distinct text tokenized once
        self._encodings = {}
        try:
            result = super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.progress is not None)
        finally:
            self._encodings = None
        self._done = self._total
        self._report()
        return result

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs):
        """lm-eval's encoding, remembered during a ``loglikelihood`` call: it encodes every
        request's context, and the choices of one question share theirs."""
        if self._encodings is None or kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        if key not in self._encodings:
            self._encodings[key] = super().tok_encode(string, add_special_tokens, left_truncate_len)
        return list(self._encodings[key])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Packed scoring (see module doc) when enabled; lm-eval's row-per-request otherwise."""
        if not self.packed:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=override_bs)
        start = self._done

        def report(done: int, total: int) -> None:
            self._done = start + done
            self._report()

        scorer = PackedScorer(self.model, max_tokens=self.max_batch_tokens,
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


def _row_seeds(contexts: list[str]) -> list[int]:
    """A seed per request, from one draw of torch's RNG (seeded by the run), the request's prompt
    and its place among the requests with the same prompt (the samples of one item)."""
    base = int(torch.randint(0, 2 ** 62, (1,)))
    seen: dict[str, int] = {}
    seeds = []
    for context in contexts:
        seen[context] = seen.get(context, -1) + 1
        text = f"{base}/{seen[context]}/{context}".encode("utf-8")
        seeds.append(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1)
    return seeds
