"""Shared-work log-likelihoods and generation: the same numbers as one plain forward per request."""
from __future__ import annotations

import random

import pytest
import torch

from edgebuild.bench.packed_attention import Packing
from edgebuild.bench.prefix_scoring import (MIN_PREFIX, PackedScorer, Row, batches, families, group_rows,
                                            layout, supports)
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
    scorer = PackedScorer(lm, max_tokens=256, max_length=2048)
    calls = []
    original = scorer._batch
    scorer._batch = lambda batch, *args: calls.append(len(batch)) or original(batch, *args)
    got = scorer.score(pairs)
    want = reference(lm, pairs)
    assert max(calls) > 1, "several contexts shared a batch"
    assert len(got) == len(want)
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
        assert g_greedy == w_greedy


def test_a_repeated_request_runs_once(model):
    lm, _ = model
    pairs = requests()
    scorer = PackedScorer(lm, max_tokens=256, max_length=2048)
    once = scorer.score(pairs)
    scored = []
    original = scorer._batch
    scorer._batch = lambda batch, *args: scored.extend(
        r for row in batch for r in row.requests) or original(batch, *args)
    again = scorer.score(pairs + pairs[3:9] + pairs[:2])
    assert len(scored) == len(pairs)
    assert again == once + once[3:9] + once[:2]


def test_greedy_flag_is_true_for_the_argmax_continuation(model):
    lm, _ = model
    context = list(range(100, 140))
    with torch.inference_mode():
        best = int(lm(torch.tensor([context])).logits[0, -1].argmax())
    (_, greedy), (_, other) = PackedScorer(lm, max_tokens=512, max_length=2048).score(
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
    tokens, positions, segments, targets = layout([row], prefix=1)
    assert tokens == [6, 7, 1, 2]                 # the one-token continuation adds no token
    assert positions == [1, 2, 3, 4]              # each continuation starts right after the context
    assert segments == [(0, 0), (0, 0), (0, 1), (0, 1)]
    assert targets == [(0, [(1, 1), (2, 2), (3, 3)]), (1, [(1, 4)])]


def test_a_batch_holds_several_contexts_that_never_see_each_other():
    first, second = Row((5, 6, 7), [(0, [1, 2])]), Row((5, 9), [(1, [3]), (2, [4])])
    tokens, positions, segments, targets = layout([first, second], prefix=1)
    assert tokens == [6, 7, 1, 9]
    assert positions == [1, 2, 3, 1]              # the second context restarts after the prefix
    assert targets == [(0, [(1, 1), (2, 2)]), (1, [(3, 3)]), (2, [(3, 4)])]
    packing = Packing.of(segments)
    assert packing.spans == [(0, 3), (3, 4)]      # each row attends within its own span only
    assert (packing.masks[0] == 0).tolist() == [[True, False, False],
                                                [True, True, False],
                                                [True, True, True]]
    assert packing.masks[1] is None               # all context: plain causal over its own keys


def test_continuations_of_a_row_see_the_context_not_each_other():
    _, _, segments, _ = layout([Row((5, 6), [(0, [1, 2, 3]), (1, [4, 5])])], prefix=0)
    assert segments == [(0, 0), (0, 0), (0, 1), (0, 1), (0, 2)]
    (mask,) = Packing.of(segments).masks
    assert (mask[4] == 0).tolist() == [True, True, False, False, True]
    assert (mask[3] == 0).tolist() == [True, True, True, True, False]


def test_batches_hold_rows_up_to_the_token_budget():
    rows = [Row(tuple(range(n)), [(i, [1])]) for i, n in enumerate([10, 6, 4, 3, 3, 12, 1])]
    packed = batches(rows, prefix=0, max_tokens=10)
    assert [[len(r.context) for r in batch] for batch in packed] == [[10], [6, 4], [3, 3], [12], [1]]


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


def _instances(prompts, gen_kwargs, repeats=1):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (prompt, dict(gen_kwargs)), idx=i)
            for i, prompt in enumerate(prompts) for _ in range(repeats)]


def test_packed_generation_gives_lm_evals_texts(model):
    """HostLM's packed generation (shared prefix, refilled batch) answers as lm-eval's own loop."""
    from edgebuild.bench.hflm import HostLM

    lm_model, tokenizer = model
    lm = HostLM(lm_model, tokenizer, batch_size=4, max_batch_tokens=512, gen_batch_size=2)
    shots = "".join(f"Q: {i} and {i + 1}?\nA: {2 * i + 1}.\n\n" for i in range(12))
    prompts = [shots + f"Q: {a} and {b}?\nA:" for a, b in ((3, 4), (100, 2000), (7, 7), (1, 12345))]
    requests = _instances(prompts, {"until": ["\n\n", "Q:"], "max_gen_toks": 12, "do_sample": False})
    packed = lm.generate_until(requests)
    lm.packed = False
    plain = lm.generate_until(requests, disable_tqdm=True)
    assert packed == plain and all(packed)


def reference_greedy(lm_model, prompt, steps):
    out = lm_model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def few_shot_prompts(count=7, seed=0):
    rnd = random.Random(seed)
    shots = [rnd.randrange(10, 4000) for _ in range(40)]
    return [shots + [rnd.randrange(10, 4000) for _ in range(rnd.randint(1, 15))] for _ in range(count)]


@pytest.mark.parametrize("max_rows", [1, 3, 16])
def test_generate_matches_one_prompt_at_a_time(model, max_rows):
    """Whatever the batch size, each prompt gets the tokens of its own greedy generate()."""
    from edgebuild.bench.decode import generate

    lm_model, _ = model
    prompts = few_shot_prompts()
    with torch.inference_mode():
        want = [reference_greedy(lm_model, p, 10) for p in prompts]
    got = generate(lm_model, prompts, max_new_tokens=10, finished=lambda rows: [False] * len(rows),
                   eos=set(), max_rows=max_rows)
    assert got == want


def test_rows_end_at_eos_and_stop_strings_and_leave_the_batch(model):
    from edgebuild.bench import decode

    lm_model, _ = model
    prompts = few_shot_prompts()
    with torch.inference_mode():
        want = [reference_greedy(lm_model, p, 10) for p in prompts]
    eos = want[0][2]                        # prompt 0 ends at its third new token
    stop_after = {1: 4}                     # prompt 1's "stop string" appears at its 4th token
    widths = []

    def finished(rows):
        widths.append(len(rows))
        return [len(r) >= stop_after.get(_owner(r), 99) for r in rows]

    def _owner(new):
        return next(i for i, w in enumerate(want) if w[:len(new)] == new)

    got = decode.generate(lm_model, prompts, max_new_tokens=10, finished=finished, eos={eos},
                          max_rows=16)
    cut = [w[:w.index(eos) + 1] if eos in w else w for w in want]
    cut[1] = cut[1][:4] if len(cut[1]) > 4 else cut[1]
    assert got == cut
    assert widths[0] == len(prompts) and min(widths) < len(prompts), "finished rows leave the batch"


def test_identical_prompts_run_once(model, monkeypatch):
    from edgebuild.bench import decode

    lm_model, _ = model
    prompts = few_shot_prompts(3)
    prompts = [prompts[0], prompts[1], prompts[0], prompts[0], prompts[2]]
    computed = []
    original = decode.Decoder._prefill

    def spy(self, rests, *args):
        computed.append(len(rests))
        return original(self, rests, *args)

    monkeypatch.setattr(decode.Decoder, "_prefill", spy)
    got = decode.generate(lm_model, prompts, max_new_tokens=6, finished=lambda r: [False] * len(r),
                          eos=set(), max_rows=8)
    assert computed == [3]
    with torch.inference_mode():
        assert got == [reference_greedy(lm_model, p, 6) for p in prompts]


def test_sampling_is_seeded_per_row(model):
    """A sampled row depends on its seed, not on the batch it runs in."""
    from edgebuild.bench.decode import generate

    lm_model, _ = model
    prompts = few_shot_prompts(3) * 2
    kwargs = dict(max_new_tokens=6, finished=lambda r: [False] * len(r), eos=set(), do_sample=True,
                  temperature=0.8, top_p=0.95, seeds=list(range(6)))
    small = generate(lm_model, prompts, max_rows=2, **kwargs)
    large = generate(lm_model, prompts, max_rows=16, **kwargs)
    assert small == large
    assert small[0] != small[3], "the same prompt with another seed draws another sample"
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(lm_model, prompts, **{**kwargs, "seeds": None})


def test_packed_generation_of_several_tasks_runs_one_batch(model, monkeypatch):
    """Requests of two settings (two tasks) decode in one running batch and answer as lm-eval's
    own loop answers each."""
    from edgebuild.bench import decode
    from edgebuild.bench.hflm import HostLM

    lm_model, tokenizer = model
    lm = HostLM(lm_model, tokenizer, batch_size=4, max_batch_tokens=512, gen_batch_size=3)
    shots = "".join(f"Q: {i} and {i + 1}?\nA: {2 * i + 1}.\n\n" for i in range(12))
    first = _instances([shots + f"Q: {a} and {b}?\nA:" for a, b in ((3, 4), (100, 2000), (7, 7))],
                       {"until": ["\n\n", "Q:"], "max_gen_toks": 12, "do_sample": False})
    second = _instances(["def add(a, b):\n", "def mul(a, b):\n    return"],
                        {"until": ["\ndef"], "max_gen_toks": 9, "do_sample": False})
    calls = []
    original = decode.generate_groups
    monkeypatch.setattr(decode, "generate_groups",
                        lambda model, groups, **kw: calls.append(len(groups)) or original(model, groups, **kw))
    packed = lm.generate_until(first + second)
    assert calls == [2]
    lm.packed = False
    assert packed == lm.generate_until(first, disable_tqdm=True) + lm.generate_until(second, disable_tqdm=True)


def test_groups_decode_together_as_each_group_alone(model, monkeypatch):
    """Rows of several groups (each with its own prefix, stop rule and sampling) in one running
    batch get the tokens each group gets on its own."""
    from edgebuild.bench import decode

    lm_model, _ = model
    a, b = few_shot_prompts(4, seed=1), few_shot_prompts(3, seed=2)
    c = [p[40:] for p in few_shot_prompts(2, seed=3)]          # no shared prefix
    never = lambda rows: [False] * len(rows)
    stop3 = lambda rows: [len(r) >= 3 for r in rows]
    sampled = dict(do_sample=True, temperature=0.8, top_p=0.95)
    mixed = []
    original = decode.Decoder.step

    def spy(self):
        mixed.append(len({row.prefix for row in self.rows}))
        return original(self)

    monkeypatch.setattr(decode.Decoder, "step", spy)
    groups = [decode.Group(a, decode.Settings(8, never, set())),
              decode.Group(b, decode.settings(5, stop3, set(), **sampled), [1, 2, 3]),
              decode.Group(c, decode.Settings(6, never, set()))]
    together = decode.generate_groups(lm_model, groups, max_rows=4)
    assert max(mixed) >= 2, "rows of two groups shared a step"
    alone = [decode.generate(lm_model, a, max_new_tokens=8, finished=never, eos=set()),
             decode.generate(lm_model, b, max_new_tokens=5, finished=stop3, eos=set(), seeds=[1, 2, 3],
                             **sampled),
             decode.generate(lm_model, c, max_new_tokens=6, finished=never, eos=set())]
    assert together == alone
    assert [len(r) for r in together[1]] == [3, 3, 3]
    with torch.inference_mode():
        assert together[0] == [reference_greedy(lm_model, p, 8) for p in a]


def test_prompt_pass_and_step_over_a_shared_prefix_equal_the_plain_cache_path(model):
    """Prompts of several lengths laid end to end after a shared prefix, their keys kept in a
    RowCache, then one decoding step attending to the prefix in place and to the long row's
    positions past the common block gathered: the hidden states of each row run alone over an
    expanded cache."""
    import functools

    from edgebuild.bench import packed_attention, shared_attention
    from edgebuild.bench.prefix_scoring import prefix_cache
    from transformers import DynamicCache

    lm_model, _ = model
    decoder = lm_model.get_decoder()
    torch.manual_seed(1)
    prefix, lengths = 40, [30, 4, 7, 5]
    layers = prefix_cache(decoder, torch.randint(10, 4000, (prefix,)).tolist(), "cpu")
    prompts = [torch.randint(10, 4000, (n,)).tolist() for n in lengths]
    following = torch.randint(10, 4000, (len(prompts), 1))
    want_prompt, want_step = [], []
    with torch.inference_mode():
        for prompt, token in zip(prompts, following):
            cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers])
            out = decoder(input_ids=torch.tensor([prompt]), position_ids=torch.arange(prefix, prefix + len(prompt))[None],
                          use_cache=True, **{cache_arg(decoder): cache})
            want_prompt.append(out.last_hidden_state[0])
            step = decoder(input_ids=token[None], position_ids=torch.tensor([[prefix + len(prompt)]]),
                           use_cache=True, **{cache_arg(decoder): returned_cache(out)})
            want_step.append(step.last_hidden_state[0, 0])
        rows = shared_attention.RowCache(len(prompts), prefixes=[layers])
        packing = Packing.of([(i, 0) for i, p in enumerate(prompts) for _ in p], layers)
        packing.store = functools.partial(rows.keep, start=0, spans=packing.spans)
        with packed_attention.use(lm_model):
            got = decoder(input_ids=torch.tensor([sum(prompts, [])]),
                          position_ids=torch.tensor([[prefix + i for p in prompts for i in range(len(p))]]),
                          packing=packing, use_cache=False).last_hidden_state[0]
        mask = rows.plan(torch.tensor(lengths))
        assert rows.tail is not None and rows.block < rows.width   # one row runs past the block
        with shared_attention.use(lm_model):
            step = decoder(input_ids=following, position_ids=(prefix + torch.tensor(lengths))[:, None],
                           attention_mask=mask, rows=rows, use_cache=False).last_hidden_state
    for (first, stop), want in zip(packing.spans, want_prompt):
        assert torch.allclose(got[first:stop], want, atol=1e-5)
    assert torch.allclose(step[:, 0], torch.stack(want_step), atol=1e-5)
    assert lm_model.config._attn_implementation not in (shared_attention.NAME, packed_attention.NAME)


@pytest.mark.parametrize("lengths, block", [([10, 5, 8], 10), ([31, 5, 8, 6], 8), ([7], 7),
                                            ([40, 39, 5, 5, 5, 5, 5, 5], 5), ([9, 9, 9], 9)])
def test_the_block_reads_fewest_positions(lengths, block):
    """Rows far longer than the rest read their extra positions gathered; similar rows share one
    block as long as the longest."""
    from edgebuild.bench.shared_attention import GATHER_COST, split

    assert split(lengths) == block
    cost = lambda b: len(lengths) * b + GATHER_COST * sum(n > b for n in lengths) * (max(lengths) - b)  # noqa: E731
    assert all(cost(block) <= cost(b) for b in lengths)


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


@pytest.mark.slow
def test_generate_matches_transformers_on_the_default_model():
    """On SmolLM2-135M, few-shot prompts through the shared-prefix, refilled batch give the tokens
    of transformers' greedy generate(), prompt by prompt."""
    from edgebuild.bench.decode import generate
    from edgebuild.core import models
    from edgebuild.core.errors import ModelError

    try:
        lm_model, tokenizer = models.load(models.resolve("smollm2-135m"))
    except ModelError:
        pytest.skip("smollm2-135m is not fetched (make model)")
    shots = "".join(f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n" for a, b in
                    ((3, 4), (12, 30), (7, 8), (100, 23), (45, 55), (9, 9)))
    questions = ["What is 2 plus 2?", "What is 31 plus 11?", "Tom has 3 apples and buys 5. How many?",
                 "What is 1000 plus 1?", "What is 2 plus 2?"]
    prompts = [tokenizer(shots + f"Question: {q}\nAnswer:").input_ids for q in questions]
    with torch.inference_mode():
        want = [reference_greedy(lm_model, p, 16) for p in prompts]
    got = generate(lm_model, prompts, max_new_tokens=16, finished=lambda rows: [False] * len(rows),
                   eos=set(), max_rows=3)
    assert got == want


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_off_the_cpu_kernel_gives_the_kernels_numbers(causal):
    """The spelled-out attention (used on other devices) equals PyTorch's fused CPU kernel, with
    grouped-query keys, a causal or an additive mask, and its log-sum-exp."""
    from edgebuild.bench.packed_attention import _fused, _spelled_out, row_mask

    torch.manual_seed(0)
    query, key, value = torch.randn(1, 6, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = None if causal else row_mask(torch.tensor([0, 0, 0, 1, 1, 2, 2]))
    want = _fused(query, key, value, 0.3, causal=causal, mask=mask)
    got = _spelled_out(query, key, value, 0.3, causal=causal, mask=mask)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
