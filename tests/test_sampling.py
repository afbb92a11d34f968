"""Sampling without sorting the vocabulary (``edgebuild.bench.sampling``): transformers' top-p
distribution, drawn per row."""
import pytest
import torch
from transformers import TopPLogitsWarper

from edgebuild.bench import sampling


def full(probs, tokens, vocab):
    out = torch.zeros(probs.shape[0], vocab, dtype=torch.float64)
    out.scatter_(1, tokens, probs.double())
    return out / out.sum(dim=-1, keepdim=True)


def transformers_top_p(logits, top_p):
    return torch.softmax(TopPLogitsWarper(top_p)(None, logits.clone()), dim=-1).double()


@pytest.mark.parametrize("scale", [20.0, 3.0, 0.01])      # peaked, spread, nearly flat (full sort)
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_nucleus_is_transformers_top_p_distribution(scale, top_p):
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(1)) * scale
    probs, tokens = sampling.nucleus(logits, top_p, candidates=64)
    want = transformers_top_p(logits, top_p)
    got = full(probs, tokens, logits.shape[-1])
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, atol=1e-6)
    if scale != 3.0:                    # the peaked rows' nuclei lie among the candidates
        assert probs.shape[-1] == (64 if scale > 3 else 5000)


def test_without_top_p_every_token_keeps_its_probability():
    logits = torch.randn(3, 100)
    probs, tokens = sampling.nucleus(logits, None)
    assert torch.allclose(full(probs, tokens, 100), torch.softmax(logits.double(), dim=-1), atol=1e-6)


def test_draws_follow_the_nucleus_and_each_rows_own_generator():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sampling.draw(logits, 0.9, [generator])[0]] += 1
    assert counts[3] == 0, "a token outside the nucleus is never drawn"
    assert torch.allclose(counts[:3] / 4000, torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    rows = torch.randn(5, 300) * 4
    alone = [sampling.draw(rows[i:i + 1], 0.95, [torch.Generator().manual_seed(i)])[0] for i in range(5)]
    together = sampling.draw(rows, 0.95, [torch.Generator().manual_seed(i) for i in range(5)])
    assert together == alone
