"""Tokens drawn from a model's next-token distribution as transformers' sampling settings shape
it (temperature, top-k, top-p), without sorting the whole vocabulary at every step.

transformers' ``TopPLogitsWarper`` sorts every row's logits (49,152 for SmolLM2) at every step,
and ``torch.multinomial`` then walks the whole vocabulary once per row: at 64 sampled rows on 2
CPU cores that took about as long as the model's own decode step. ``draw`` samples the same
distribution:

- temperature and top-k are transformers' own warpers (``warpers``);
- the nucleus (top-p) is found among the ``CANDIDATES`` most likely tokens, their probabilities
  taken under the full softmax: a token stays when the tokens above it hold less than ``top_p``
  of the mass, as in transformers (the most likely token always stays). A row whose candidates
  hold less than ``top_p`` in all, so that its nucleus may reach past them, is sorted in full;
- each row draws one uniform number from its own ``torch.Generator`` and takes the token where
  that number falls in the nucleus's cumulative mass, so a row's sample does not depend on the
  rows it shares a batch with.
"""
from __future__ import annotations

import torch

from edgebuild.bench import softmax

CANDIDATES = 256


def warpers(do_sample: bool, temperature=None, top_k=None) -> list:
    """transformers' temperature and top-k warpers for the settings (none for greedy)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper

    if not do_sample:
        return []
    out = []
    if temperature not in (None, 1.0):
        out.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        out.append(TopKLogitsWarper(int(top_k)))
    return out


def nucleus(logits: torch.Tensor, top_p: float | None,
            candidates: int = CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, tokens)``, each ``[rows, k]``, most likely first: every row's candidate
    tokens and their probabilities, zero outside the row's nucleus (all tokens when ``top_p`` is
    None)."""
    vocab = logits.shape[-1]
    k = vocab if top_p is None else min(candidates, vocab)
    logits = logits.float()
    top, tokens = logits.topk(k, dim=-1) if k < vocab else logits.sort(dim=-1, descending=True)
    probs = (top - softmax.logsumexp(logits, dim=-1, keepdim=True)).exp_()
    if top_p is None:
        return probs, tokens
    above = probs.cumsum(dim=-1) - probs          # mass of the candidates above each one
    if k < vocab and bool((above[:, -1] + probs[:, -1] < top_p).any()):
        return nucleus(logits, top_p, vocab)
    return probs.masked_fill_(above >= top_p, 0.0), tokens


def draw(logits: torch.Tensor, top_p: float | None, generators: list[torch.Generator]) -> list[int]:
    """One token per row of ``logits`` (already warped), from the row's nucleus, drawn with the
    row's generator."""
    probs, tokens = nucleus(logits, top_p)
    cdf = probs.cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    at = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1])[:, None].to(cdf.device))
    at = at.clamp_(max=cdf.shape[-1] - 1)
    return tokens.gather(-1, at)[:, 0].tolist()
