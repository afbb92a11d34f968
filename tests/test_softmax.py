"""Exponentials that avoid the CPU's slow underflow path give torch's softmax sums."""
from __future__ import annotations

import torch

from edgebuild.bench import softmax


def spread_logits():
    torch.manual_seed(0)
    logits = torch.randn(6, 4096) * 40              # many arguments far below -87 after the max
    logits[1, ::3] = float("-inf")                  # top-k-filtered tokens
    logits[2] = torch.finfo(torch.float32).min      # a masked row but for one position
    logits[2, 7] = 3.0
    return logits


def test_logsumexp_equals_torchs():
    logits = spread_logits()
    assert torch.equal(softmax.logsumexp(logits, dim=-1), torch.logsumexp(logits, dim=-1))
    assert softmax.logsumexp(logits, dim=-1, keepdim=True).shape == (6, 1)


def test_raised_terms_vanish_in_a_softmax_sum():
    logits = spread_logits()
    shifted = logits - logits.amax(-1, keepdim=True)
    assert torch.equal(softmax.exp_(shifted.clone()).sum(-1), shifted.exp().sum(-1))
    assert float(softmax.exp_(torch.tensor([-1e30, float("-inf")])).max()) < 2e-38
