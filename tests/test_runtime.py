"""The torch-free device runtime: exported graph + stage weights against the torch model."""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from edgebuild.device_agent import packed  # noqa: E402
from edgebuild.device_agent.packed import Record  # noqa: E402
from edgebuild.device_agent.runtime import Runtime, RuntimeLoadError  # noqa: E402
from edgebuild.export.onnx_graph import OnnxExporter  # noqa: E402

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                                      tie_word_embeddings=True, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("graph")
    OnnxExporter().export(model, None, out)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, out, state


@pytest.fixture(scope="module")
def runtime(exported):
    _, out, state = exported
    return Runtime.load(out, state=state, threads=1)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_logits_match_torch(exported, runtime):
    model = exported[0]
    ours = runtime.logits(PROMPT)
    assert ours.shape == (len(PROMPT), 1000) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_logits(model, PROMPT), atol=1e-4, rtol=0)


def test_greedy_generation_matches_torch_generate(exported, runtime):
    model = exported[0]
    ref = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=10, pad_token_id=0)
    ours = runtime.generate(PROMPT, 10)
    assert ours == ref[0, len(PROMPT):].tolist()
    assert len(set(ours)) > 3  # the tiny model does not just repeat one token


def test_cached_decode_equals_full_recompute(runtime):
    logits, past = runtime.forward(PROMPT[:4])
    step, present = runtime.forward(PROMPT[4:], past)
    assert present[0].shape == (1, 2, len(PROMPT), 16)
    full = runtime.logits(PROMPT)
    np.testing.assert_allclose(np.concatenate([logits, step]), full, atol=1e-5, rtol=0)
    tokens, steps = runtime.greedy(PROMPT, 3, stop_at_eos=False)
    recomputed = runtime.logits(PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    np.testing.assert_allclose(steps, recomputed, atol=1e-5, rtol=0)
    assert tokens == [int(t) for t in recomputed.argmax(axis=-1)]


def test_generation_stops_after_end_of_sequence(exported):
    _, out, state = exported
    rt = Runtime.load(out, state=state)
    first = rt.generate(PROMPT, 1)[0]
    rt = Runtime(rt.session, dict(rt.graph, eos_token_ids=[first]), rt.threads)
    assert rt.generate(PROMPT, 5) == [first]
    assert len(rt.greedy(PROMPT, 5, stop_at_eos=False)[0]) == 5


def test_loglikelihood_is_the_sum_of_continuation_logprobs(exported, runtime):
    model = exported[0]
    context, continuation = PROMPT[:3], PROMPT[3:]
    logits = torch.tensor(torch_logits(model, PROMPT)).double()
    logprobs = torch.log_softmax(logits, dim=-1)
    expected = sum(logprobs[i - 1, PROMPT[i]].item() for i in range(3, len(PROMPT)))
    total, greedy = runtime.loglikelihood(context, continuation)
    assert total == pytest.approx(expected, abs=1e-4)
    assert greedy is False
    chosen = runtime.generate(context, 3)
    total, greedy = runtime.loglikelihood(context, chosen)
    assert greedy is True and total < 0
    with pytest.raises(ValueError):
        runtime.loglikelihood([], continuation)


def test_packed_weights_give_the_same_logits(exported, runtime, tmp_path):
    _, out, state = exported
    records = [Record(name, tuple(arr.shape), "raw", {"dtype": "float32"}, {"data": arr})
               for name, arr in state.items() if name != "lm_head.weight"]  # tied: not stored
    path = tmp_path / "stage.ebpack"
    packed.write(path, records, meta={"stage": "baseline"})
    from_file = Runtime.load(out, path, threads=1)
    np.testing.assert_array_equal(from_file.logits(PROMPT), runtime.logits(PROMPT))


def test_time_returns_raw_samples(runtime):
    result = runtime.time(prompt_len=8, decode_tokens=3, warmup=1, repeats=4)
    assert {"prefill_ms", "decode_ms_per_token", "peak_rss_mb", "rss_mb", "threads"} <= set(result)
    assert len(result["prefill_ms"]) == len(result["decode_ms_per_token"]) == 4
    assert all(v > 0 for v in result["prefill_ms"] + result["decode_ms_per_token"])
    assert result["peak_rss_mb"] > 10 and result["threads"] == 1
    with pytest.raises(ValueError):
        runtime.time(repeats=0)


def test_load_refuses_weights_that_do_not_fit(exported, tmp_path):
    _, out, state = exported
    with pytest.raises(RuntimeLoadError, match="exactly one"):
        Runtime.load(out)
    with pytest.raises(RuntimeLoadError, match="model.norm.weight"):
        Runtime.load(out, state={k: v for k, v in state.items() if k != "model.norm.weight"})
    wrong = dict(state, **{"model.norm.weight": np.ones(63, np.float32)})
    with pytest.raises(RuntimeLoadError, match="shape"):
        Runtime.load(out, state=wrong)
    with pytest.raises(RuntimeLoadError, match="not an exported graph"):
        Runtime.load(tmp_path, state=state)
    with pytest.raises(RuntimeLoadError, match="threads"):
        Runtime.load(out, state=state, threads=0)


def test_forward_refuses_tokens_outside_the_vocabulary(runtime):
    for bad in ([], [1000], [-1, 3]):
        with pytest.raises(ValueError, match="token ids"):
            runtime.logits(bad)


def test_load_refuses_an_unknown_graph_format(exported, tmp_path):
    _, out, state = exported
    graph = json.loads((out / "graph.json").read_text())
    (tmp_path / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    (tmp_path / "graph.json").write_text(json.dumps(dict(graph, format=99)))
    with pytest.raises(RuntimeLoadError, match="format 99"):
        Runtime.load(tmp_path, state=state)


def test_runtime_imports_neither_torch_nor_the_build_core():
    code = ("import sys, edgebuild.device_agent.runtime; "
            "bad = [m for m in ('torch', 'edgebuild.build', 'onnx') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_score_equals_whole_sequence_loglikelihood(runtime):
    rng = np.random.default_rng(3)
    contexts = [rng.integers(0, 1000, n).tolist() for n in (1, 6, 25)]
    requests = [(contexts[i % 3], rng.integers(0, 1000, 1 + i % 4).tolist()) for i in range(12)]
    chosen = runtime.generate(PROMPT, 3)
    requests += [(PROMPT, chosen), (PROMPT, chosen[:1]), (PROMPT, chosen[:2] + [999])]
    want = [runtime.loglikelihood(ctx, cont) for ctx, cont in requests]
    for budget in (8192, 20, 1):       # one batch per context; small batches; one per batch
        got = runtime.score(requests, max_batch_tokens=budget)
        assert [g for _, g in got] == [g for _, g in want]
        np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], atol=1e-4, rtol=0)
    assert [g for _, g in got[-3:]] == [True, True, False]
    assert runtime.score([]) == []


def test_score_refuses_bad_requests(runtime):
    for bad in ([([], [1])], [([1], [])], [([1], [1000])], [([-1], [2])], [([1.5], [2])]):
        with pytest.raises(ValueError):
            runtime.score(bad)
