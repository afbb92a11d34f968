"""Benchmarks on the device: DeviceLM through a local agent against the host's HostLM."""
from __future__ import annotations

import math

import pytest

from edgebuild.core.errors import DataError

from conftest import DATA_DIR, TOKENIZER_DIR  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A tiny random Llama over the real SmolLM2 vocabulary, exported and packed."""
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 tokenizer files not found")
    from transformers import AutoTokenizer

    from test_agent import export_tiny_stage

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model, files = export_tiny_stage(tmp_path_factory.getbasetemp(), vocab_size=len(tokenizer))
    return model, tokenizer, files


@pytest.fixture(scope="module")
def agent(stage, tmp_path_factory):
    """A local agent with the tiny stage loaded."""
    from edgebuild.targets.client import AgentClient, deploy_stage
    from edgebuild.targets.local import LocalTransport

    transport = LocalTransport(tmp_path_factory.mktemp("agent"), stop_timeout_s=2.0)
    with AgentClient(transport, timeout_s=120) as client:
        deploy_stage(client, transport, "raw", "v1", stage[2])
        client.load("raw", "v1", threads=1)
        yield client


def _lms(stage, agent, max_length=None):
    from edgebuild.bench.devicelm import DeviceLM
    from edgebuild.bench.hflm import HostLM

    model, tokenizer, _ = stage
    host = HostLM(model, tokenizer, batch_size=8, max_batch_tokens=4096)
    device = DeviceLM(agent, tokenizer, max_length=max_length or host.max_length)
    if max_length:
        host._max_length = max_length
    return host, device


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
            for i, args in enumerate(args_list)]


REQUESTS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " a city by the sea"),
    ("Question: is the sky blue?\nAnswer:", " yes"),
    ("Question: is the sky blue?\nAnswer:", " no"),
    ("", "Once upon a time"),                        # empty context: the prefix token stands in
    ("trailing space moves ", "into the continuation"),
]


def test_loglikelihood_matches_the_host(stage, agent):
    host, device = _lms(stage, agent)
    want = host.loglikelihood(_instances("loglikelihood", REQUESTS), disable_tqdm=True)
    got = device.loglikelihood(_instances("loglikelihood", REQUESTS), disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    for (lp, _), (ref, _) in zip(got, want):
        assert lp == pytest.approx(ref, abs=1e-3)
    assert len({lp for lp, _ in got}) == len(REQUESTS), "distinct requests get distinct scores"


def test_long_requests_are_truncated_like_the_host(stage, agent):
    long_context = " ".join(f"word{i}" for i in range(60))
    requests = [(long_context, " and the end"), (long_context, " of the story")]
    host, device = _lms(stage, agent, max_length=24)
    assert len(device.tok_encode(long_context)) > 24
    want = host.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    got = device.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    for (lp, greedy), (ref, ref_greedy) in zip(got, want):
        assert lp == pytest.approx(ref, abs=1e-3) and greedy == ref_greedy


def test_loglikelihood_rolling_matches_the_host(stage, agent):
    texts = [("A short text.",), (" ".join(f"token{i}" for i in range(40)),)]
    host, device = _lms(stage, agent, max_length=32)      # the long text needs several windows
    want = host.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), disable_tqdm=True)
    got = device.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-3)


def test_generation_is_refused_with_the_reason(stage, agent):
    _, device = _lms(stage, agent)
    with pytest.raises(NotImplementedError, match="log-likelihoods only: the agent protocol has no generation"):
        device.generate_until(_instances("generate_until", [("Hi", {"until": ["\n"]})]))


def test_progress_is_reported(stage, agent):
    from edgebuild.bench.devicelm import DeviceLM

    calls = []
    device = DeviceLM(agent, stage[1], progress=lambda done, total: calls.append((done, total)))
    device.loglikelihood(_instances("loglikelihood", REQUESTS), disable_tqdm=True)
    assert calls and calls[-1] == (len(REQUESTS), len(REQUESTS))


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data dir {DATA_DIR} not found")
def test_device_runs_the_same_tasks_and_agrees_with_the_host(stage, agent, tmp_path):
    from edgebuild.bench.devicelm import agreement, evaluate, run_device
    from edgebuild.bench.hflm import HostLM
    from edgebuild.bench.runner import run_host

    model, tokenizer, _ = stage
    tasks = ["arc_easy", "piqa"]
    host_lm = HostLM(model, tokenizer, batch_size=8, max_batch_tokens=4096)
    host = evaluate(host_lm, tasks, "smoke", DATA_DIR, tmp_path)
    device = run_device(agent, tokenizer, tasks, "smoke", DATA_DIR, tmp_path, max_length=host_lm.max_length)
    plain = run_host(model, tokenizer, tasks, "smoke", DATA_DIR, tmp_path, batch_size=8)
    for name in tasks:
        assert device.results[name].items == plain[name].items == host.results[name].items
        assert all(len(r) >= 2 for r in device.responses[name].values())   # one per answer choice
    both = agreement(host.responses, device.responses)
    assert both["n"] == 16 and both["same_prediction"] == 1.0
    assert 0 < both["max_loglik_diff"] < 1e-3 and both["tokens_counted"]
    assert both["max_loglik_diff_per_token"] <= both["max_loglik_diff"]
    assert all(len(r) == 3 and r[2] >= 1 for item in plain["piqa"].responses.values() for r in item)
    assert agreement(plain, device.results)["same_prediction"] == 1.0


# --- agreement --------------------------------------------------------------------------

def test_agreement_of_responses_and_of_correctness():
    from edgebuild.bench.devicelm import agreement

    host = {"piqa": {0: [[-1.0, False], [-2.0, False]], 1: [[-3.0, False], [-2.5, True]]},
            "lambada": {7: [[-4.0, True]]}}
    device = {"piqa": {0: [[-1.01, False], [-2.0, False]], 1: [[-2.4, True], [-2.5, True]]},
              "lambada": {7: [[-4.2, False]]}}
    result = agreement(host, device)
    assert result["n"] == 3 and result["same_prediction"] == pytest.approx(1 / 3)
    assert result["max_loglik_diff"] == pytest.approx(0.6)
    assert result["tasks"]["piqa"] == {"n": 2, "same_prediction": 0.5, "max_loglik_diff": pytest.approx(0.6),
                                       "max_loglik_diff_per_token": pytest.approx(0.6),
                                       "tokens_counted": False}
    items = agreement({"boolq": [[3, 1.0], [5, 0.0]]}, {"boolq": [[5, 0.0], [3, 0.0]]})
    assert items["same_prediction"] == 0.5 and items["max_loglik_diff"] is None
    assert math.isnan(agreement({}, {})["same_prediction"])


def test_the_loglik_gap_per_token_divides_by_the_answers_length():
    from edgebuild.bench.devicelm import agreement

    # answer 0: 0.6 nats over 12 tokens; answer 1: 0.3 nats over 2 tokens (the larger per token)
    host = {"piqa": {0: [[-10.0, False, 12], [-2.0, False, 2]]}}
    device = {"piqa": {0: [[-10.6, False], [-2.3, False]]}}
    result = agreement(host, device)
    assert result["max_loglik_diff"] == pytest.approx(0.6)
    assert result["max_loglik_diff_per_token"] == pytest.approx(0.15)
    assert result["tokens_counted"] is True
    # counts recorded on the device side only are used too
    assert agreement(device, host)["max_loglik_diff_per_token"] == pytest.approx(0.15)


def test_agreement_refuses_unpaired_items():
    from edgebuild.bench.devicelm import agreement

    with pytest.raises(DataError, match="'piqa': host and device evaluated different items"):
        agreement({"piqa": [[1, 1.0]]}, {"piqa": [[2, 1.0]]})
    with pytest.raises(DataError, match="task 'piqa' was run on the host but not on the device"):
        agreement({"piqa": [[1, 1.0]]}, {})
    with pytest.raises(DataError, match="like with like"):
        agreement({"piqa": [[1, 1.0]]}, {"piqa": {1: [[-1.0, True], [-2.0, False]]}})
