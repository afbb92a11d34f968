"""Output-distribution quality of a compressed stage against the baseline model.

The text set is a seeded sample of LAMBADA passages from the data dir (``quality_texts``): real,
varied English prose that every build already has, truncated to ``max_tokens`` tokens. For the
baseline, ``reference_logprobs`` stores its next-token log-probabilities at every position
(float16, positions x vocab: 8 texts x 64 tokens x 49152 is 50 MB); ``compare`` recomputes a
stage's one text at a time and reports

- ``kl``: mean over positions of KL(baseline || stage), in nats;
- ``top1_agreement``: share of positions where both models' most likely token is the same (both
  taken on float16-rounded log-probabilities, so a model compared with itself agrees exactly);
- ``ppl_ratio``: the stage's perplexity on the texts divided by the baseline's.
"""
from __future__ import annotations

import math

import numpy as np

from edgebuild.bench.profiles import sample_indices
from edgebuild.core.errors import DataError

DEFAULT_TEXTS = 8
DEFAULT_TOKENS = 64


def quality_texts(data_dir, n: int = DEFAULT_TEXTS, seed: int = 0) -> list[str]:
    """``n`` LAMBADA passages from ``data_dir``, picked by a seeded sample (not the first n)."""
    from edgebuild.bench.tasks import lambada

    docs = lambada.convert(data_dir).eval_docs
    return [docs[i]["text"] for i in sample_indices("quality", len(docs), n, seed)]


def _token_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise DataError(f"quality text {text[:40]!r} has fewer than 2 tokens; use longer texts")
    return ids


def _logprobs(model, ids: list[int]):
    """Next-token log-probabilities, float32 (len(ids) x vocab), on the CPU."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def reference_logprobs(model, tokenizer, texts: list[str],
                       max_tokens: int = DEFAULT_TOKENS) -> np.ndarray:
    """The baseline's log-probabilities at every position of every text, stacked (float16)."""
    model.eval()
    chunks = [_logprobs(model, _token_ids(tokenizer, text, max_tokens)).half().numpy()
              for text in texts]
    return np.concatenate(chunks, axis=0)


def compare(model, tokenizer, texts: list[str], ref: np.ndarray,
            max_tokens: int = DEFAULT_TOKENS) -> dict:
    """``{"kl", "top1_agreement", "ppl_ratio"}`` of ``model`` against the reference ``ref``.

    ``texts`` and ``max_tokens`` must be those ``ref`` was made with (checked by its length).
    """
    import torch

    model.eval()
    token_ids = [_token_ids(tokenizer, text, max_tokens) for text in texts]
    positions = sum(len(ids) for ids in token_ids)
    if positions != len(ref):
        raise DataError(f"the quality reference has {len(ref)} positions but the texts give "
                        f"{positions}; rebuild the baseline reference with the same texts")
    totals = {"kl": 0.0, "agree": 0, "nll_stage": 0.0, "nll_base": 0.0, "targets": 0}
    offset = 0
    for ids in token_ids:
        chunk = torch.from_numpy(np.asarray(ref[offset:offset + len(ids)]))
        _accumulate(totals, chunk, _logprobs(model, ids), torch.tensor(ids[1:]))
        offset += len(ids)
    return {
        "kl": totals["kl"] / positions,
        "top1_agreement": totals["agree"] / positions,
        "ppl_ratio": math.exp((totals["nll_stage"] - totals["nll_base"]) / totals["targets"]),
    }


def _accumulate(totals: dict, ref_half, stage, targets) -> None:
    """Add one text's KL, top-1 matches and target log-likelihoods to ``totals``."""
    import torch

    base = ref_half.float()
    base = base - torch.logsumexp(base, dim=-1, keepdim=True)   # undo float16 rounding drift
    totals["kl"] += float((base.exp() * (base - stage)).sum())
    totals["agree"] += int((ref_half.argmax(-1) == stage.half().argmax(-1)).sum())
    rows = torch.arange(len(targets))
    totals["nll_stage"] -= float(stage[rows, targets].sum())
    totals["nll_base"] -= float(base[rows, targets].sum())
    totals["targets"] += len(targets)


class TextSets:
    """The two text sets a build draws from the data dir: the fixed quality texts (KL, top-1,
    perplexity ratio against the baseline) and the calibration texts compression methods may use,
    which never overlap the fixed ones."""

    def __init__(self, data_dir, calibration: int, seed: int = 0):
        self.data_dir, self.n_calibration, self.seed = data_dir, calibration, seed

    def fixed(self) -> list[str]:
        return quality_texts(self.data_dir, seed=self.seed)

    def calibration(self) -> list[str]:
        if not self.n_calibration:
            return []
        held_out = set(self.fixed())
        pool = quality_texts(self.data_dir, self.n_calibration + len(held_out), seed=self.seed + 1)
        return [t for t in pool if t not in held_out][: self.n_calibration]


# --- what deploying a stage costs: the stage against its runtime directory -------------------

def deployment_kl(stage, deployed, tokenizer, texts, max_tokens: int | None = None) -> dict:
    """``{"kl", "top1_agreement", "ppl_ratio"}`` of the deployed model against the stage as compressed
    (KL(stage || deployed), nats per position, on ``texts``; ``compare``'s semantics).
    ``deployed`` may be a torch model or a ``RuntimeModel`` (the runtime's own logits)."""
    kwargs = {} if max_tokens is None else {"max_tokens": max_tokens}
    ref = reference_logprobs(stage, tokenizer, texts, **kwargs)
    return compare(deployed, tokenizer, texts, ref, **kwargs)


class RuntimeModel:
    """A loaded runtime seen as a causal LM by ``bench.quality``: ``model(ids).logits``, batch of one."""

    device = "cpu"

    def __init__(self, runtime):
        self.runtime = runtime

    def eval(self) -> "RuntimeModel":
        return self

    def __call__(self, input_ids):
        import torch
        from types import SimpleNamespace

        logits = self.runtime.logits([int(t) for t in input_ids[0]])
        return SimpleNamespace(logits=torch.from_numpy(np.ascontiguousarray(logits))[None])


def runtime_kl(stage, folder, tokenizer, texts, max_tokens: int | None = None, threads=None) -> dict:
    """``deployment_kl`` with the runtime directory ``folder`` run in onnxruntime-genai."""
    from edgebuild.device_agent.genai_runtime import GenaiRuntime

    runtime = RuntimeModel(GenaiRuntime.load(folder, threads=threads))
    return deployment_kl(stage, runtime, tokenizer, texts, max_tokens)
