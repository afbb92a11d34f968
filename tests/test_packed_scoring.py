"""Shared-work log-likelihoods and generation: the same numbers as one plain forward per request."""
from __future__ import annotations

import random

import pytest
import torch

from edgebuild.bench.prefix_scoring import (MIN_PREFIX, PackedScorer, Row, families, group_rows, layout,
                                    supports)
from edgebuild.core.models import cache_arg, returned_cache

from conftest import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def reference(model, pairs):
    """One full forward per request, float32 log-softmax over every position (as lm-eval does)."""
    out = []
    with torch.inference_mode():
        for context, continuation in pairs:
            ids = torch.tensor([context + continuation[:-1]])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)[len(context) - 1:]
            target = torch.tensor(continuation)
            out.append((logprobs.gather(1, target[:, None]).sum().item(),
                        bool((logprobs.argmax(-1) == target).all())))
    return out


def requests(seed=0):
    """Few-shot-like requests: two families with long shared prefixes, loose contexts, one-token
    and multi-token continuations, a context repeated with different continuations."""
    rnd = random.Random(seed)
    tokens = lambda n: [rnd.randrange(10, 4000) for _ in range(n)]   # noqa: E731
    shots = [tokens(60), tokens(45)]
    pairs = []
    for i in range(14):
        context = (shots[i % 2] if i < 10 else []) + tokens(rnd.randint(2, 20))
        for width in (1, 1, rnd.randint(2, 9), rnd.randint(2, 9)):
            pairs.append((context, tokens(width)))
    return pairs


def test_packed_scores_equal_plain_forwards(model):
    lm, _ = model
    pairs = requests()
    got = PackedScorer(lm, max_rows=3, max_tokens=256, max_length=2048).score(pairs)
    want = reference(lm, pairs)
    assert len(got) == len(want)
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
        assert g_greedy == w_greedy


def test_greedy_flag_is_true_for_the_argmax_continuation(model):
    lm, _ = model
    context = list(range(100, 140))
    with torch.inference_mode():
        best = int(lm(torch.tensor([context])).logits[0, -1].argmax())
    (_, greedy), (_, other) = PackedScorer(lm, max_rows=4, max_tokens=512, max_length=2048).score(
        [(context, [best]), (context, [best + 1])])
    assert greedy and not other


def test_families_share_only_long_prefixes():
    shot = tuple(range(1, MIN_PREFIX + 10))
    rows = group_rows([(list(shot) + [900], [1]), (list(shot) + [901, 5], [2]),
                       ([7, 8, 9], [3]), ([7, 8, 10], [4])], max_length=4096)
    fams = families(rows)
    assert [(prefix, len(group)) for prefix, group in fams] == [(0, 2), (len(shot), 2)]
    # a context entirely inside the shared part keeps its last token in its row
    rows = group_rows([(list(shot), [1]), (list(shot) + [5], [2])], max_length=4096)
    ((prefix, _),) = families(rows)
    assert prefix == len(shot) - 1


def test_layout_masks_continuations_from_each_other():
    row = Row((5, 6, 7), [(0, [1, 2, 3]), (1, [4])])
    tokens, positions, segments, targets = layout(row, prefix=1)
    assert tokens == [6, 7, 1, 2]                 # the one-token continuation adds no token
    assert positions == [1, 2, 3, 4]              # each continuation starts right after the context
    assert segments == [0, 0, 1, 1]
    assert targets == [(0, [(1, 1), (2, 2), (3, 3)]), (1, [(1, 4)])]


def test_long_requests_lose_context_from_the_left():
    rows = group_rows([(list(range(1, 11)), [11, 12])], max_length=8)
    assert rows[0].context == tuple(range(4, 11))   # 7 context + 2 continuation = max_length + 1


def test_empty_parts_are_refused():
    with pytest.raises(ValueError, match="empty"):
        group_rows([([], [1])], max_length=8)


def test_supports_full_attention_decoders_only(model):
    lm, _ = model
    assert supports(lm)
    lm.config.sliding_window = 16
    try:
        assert not supports(lm)
    finally:
        lm.config.sliding_window = None


def test_host_lm_packed_matches_lm_eval_rows(model):
    """The HostLM entry point (lm-eval's token-level request list) gives lm-eval's own numbers."""
    from edgebuild.bench.hflm import HostLM

    lm_model, tokenizer = model
    lm = HostLM(lm_model, tokenizer, batch_size=4, max_batch_tokens=512)
    reqs = [((f"c{i}", f"x{i}"), context, continuation)
            for i, (context, continuation) in enumerate(requests(1))]
    packed = lm._loglikelihood_tokens(reqs)
    lm.packed = False
    plain = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (a, a_greedy), (b, b_greedy) in zip(packed, plain):
        assert a == pytest.approx(b, abs=1e-4) and a_greedy == b_greedy


def test_generation_with_shared_prefix_is_unchanged(model):
    from edgebuild.bench.hflm import HostLM

    lm_model, tokenizer = model
    lm = HostLM(lm_model, tokenizer, batch_size=4, max_batch_tokens=512)
    shots = "".join(f"Q: {i} and {i + 1}?\nA: {2 * i + 1}.\n\n" for i in range(12))
    tokenizer.padding_side = "left"
    enc = tokenizer([shots + "Q: 3 and 4?\nA:", shots + "Q: 100 and 2000 and 5?\nA:"],
                    return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1]
    outs = []
    for packed in (True, False):
        lm.packed = packed
        out = lm._model_generate(enc.input_ids, width + 12, ["\n\n"],
                                 attention_mask=enc.attention_mask, do_sample=False)
        outs.append(out[:, width:])
    assert torch.equal(outs[0], outs[1])
    inputs = HostLM._shared_prefix(lm, enc.input_ids, enc.attention_mask)
    assert "cache" in inputs and inputs["input_ids"].shape == enc.input_ids.shape
    assert inputs["attention_mask"].sum() == enc.attention_mask.sum()


def test_decode_drops_finished_rows_and_matches_generate(model):
    from edgebuild.bench.decode import decode

    lm_model, tokenizer = model
    tokenizer.padding_side = "left"
    enc = tokenizer(["Once upon a time", "The cat", "A much longer prompt about numbers and"],
                    return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1]
    free = lm_model.generate(**enc, max_length=width + 10, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    eos = int(free[0, width + 2])           # row 0 ends at its third new token, the others later
    want = lm_model.generate(**enc, max_length=width + 10, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)
    calls = []

    def finished(new):
        calls.append(new.shape[0])
        return [False] * new.shape[0]

    got = decode(lm_model, enc.input_ids, enc.attention_mask, max_length=width + 10,
                 finished=finished, eos={eos}, pad_token_id=0)
    assert torch.equal(got, want)
    assert calls[0] == 3 and min(calls) < 3, "finished rows leave the batch"


def test_decode_sampling_is_seeded(model):
    from edgebuild.bench.decode import decode

    lm_model, tokenizer = model
    enc = tokenizer(["Hello there"], return_tensors="pt")
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(decode(lm_model, enc.input_ids.repeat(4, 1), enc.attention_mask.repeat(4, 1),
                           max_length=enc.input_ids.shape[1] + 8, finished=lambda t: [False] * len(t),
                           eos=set(), pad_token_id=0, do_sample=True, temperature=0.8, top_p=0.95))
    assert torch.equal(outs[0], outs[1]) and len({tuple(r) for r in outs[0].tolist()}) > 1


def test_cache_keyword_follows_the_installed_transformers(model):
    class Renamed(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert cache_arg(Renamed()) == "cache" and cache_arg(Older()) == "past_key_values"
    assert returned_cache({"cache": 1}) == 1 and returned_cache({"past_key_values": 2}) == 2
    lm, _ = model
    out = lm(torch.tensor([[5, 6, 7]]), use_cache=True)
    assert returned_cache(out).get_seq_length() == 3
    assert cache_arg(lm) in ("cache", "past_key_values")
