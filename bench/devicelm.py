"""Benchmarks on the device: an lm-eval ``LM`` whose scores come from the device agent.

The host tokenizes (the device needs no tokenizer) exactly as lm-eval's ``HFLM`` does, so the
device runs the same reduced tasks, on the same items, with the same token ids as the host; the
agent's ``score`` command returns each request's log-likelihood and greedy flag, computed by the
stage's ONNX graph under onnxruntime. Imported only when device benchmarks run (imports lm-eval).

    with connect(target) as client:
        client.load(stage, version)
        run = run_device(client, tokenizer, ["arc_easy", "piqa"], "reduced", data_dir, cache)
    agreement(host_results, run.results)      # same predictions? largest log-likelihood gap?
"""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lm_eval.api.model import TemplateLM

from edgebuild.core.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048     # lm-eval's HFLM default when the model config names none


class DeviceLM(TemplateLM):
    """Log-likelihoods from a device agent (``AgentClient`` with a model loaded).

    ``max_length`` must be the host model's context length (HFLM's ``max_length``: the config's
    ``max_position_embeddings``) for the two to truncate long requests alike.
    ``progress(done, total)`` is called as requests complete.
    """

    def __init__(self, client, tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH,
                 max_batch_tokens: int | None = None,
                 progress: Callable[[int, int], None] | None = None):
        super().__init__()
        self.client = client
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.max_batch_tokens = max_batch_tokens
        self.progress = progress

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """lm-eval's tokenisation and ordering, without its bars when progress is reported."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.progress is not None)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS, else EOS (as ``HFLM``)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``, as ``HFLM.tok_encode`` computes them."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last ``max_length + 1`` tokens, as HFLM does (the model sees all but the last)."""
        if len(continuation) > self.max_length:
            raise DataError(f"a continuation of {len(continuation)} tokens exceeds the model's "
                            f"context length {self.max_length}; use a shorter task")
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:-len(continuation)], continuation

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """Score ``[(key, context ids, continuation ids)]`` on the device, in order."""
        pairs = [self._truncate(list(ctx), list(cont)) for _, ctx, cont in requests]
        results = self.client.score(pairs, max_batch_tokens=self.max_batch_tokens,
                                    progress=self.progress)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of ``max_length`` tokens (as HFLM)."""
        from lm_eval import utils

        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for window in utils.get_rolling_token_windows(tokens, self.prefix_token_id,
                                                          self.max_length, 1):
                windows.append((None, *utils.make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _greedy) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Not offered: the device benchmarks are log-likelihood tasks."""
        raise NotImplementedError(
            "DeviceLM scores log-likelihoods only: the agent protocol has no generation command, "
            "and edgebuild's benchmarks are multiple-choice or log-likelihood tasks; run "
            "generation tasks on the host")


# ------------------------------------------------------------------------ whole tasks

@dataclass
class DeviceRun:
    """Results of benchmarks run through an ``LM``.

    ``results`` is ``{task: TaskResult}`` (as ``run_host`` returns); ``responses`` is
    ``{task: {doc_id: [[logprob, is_greedy], ...]}}``, one pair per request of the item (one per
    answer choice), for ``agreement``.
    """

    results: dict
    responses: dict = field(default_factory=dict)


def run_device(client, tokenizer, tasks: list[str], profile: str, data_dir, cache_dir, *,
               seed: int = 0, max_length: int = DEFAULT_MAX_LENGTH,
               max_batch_tokens: int | None = None, progress=None) -> DeviceRun:
    """Evaluate the model loaded in ``client``'s agent on ``tasks``: the same items and prompts as
    ``run_host`` with the same ``profile`` and ``seed``."""
    lm = DeviceLM(client, tokenizer, max_length=max_length, max_batch_tokens=max_batch_tokens,
                  progress=progress)
    return evaluate(lm, tasks, profile, data_dir, cache_dir, seed=seed)


def evaluate(lm, tasks: list[str], profile: str, data_dir, cache_dir, *, seed: int = 0) -> DeviceRun:
    """Evaluate any lm-eval ``LM`` on edgebuild benchmarks, keeping each item's responses."""
    from edgebuild.bench import benchmarks
    from edgebuild.bench.profiles import get_profile
    from edgebuild.bench.runner import _offline, _task_result, prepare, token_counter
    from edgebuild.core.errors import ConfigError

    chosen = get_profile(profile)
    if not tasks:
        raise ConfigError(f"no benchmark tasks given; name at least one of {', '.join(benchmarks.names())}")
    specs = [benchmarks.get(name) for name in dict.fromkeys(tasks)]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _offline(), tempfile.TemporaryDirectory(dir=cache_dir, prefix="tasks-") as task_dir:
        prepared = [prepare(spec, data_dir, cache_dir, Path(task_dir), chosen, seed) for spec in specs]
        samples = _simple_evaluate(lm, prepared, Path(task_dir))
    count = token_counter(lm)
    results = {p.bench.name: _task_result(p, samples, count) for p in prepared}
    return DeviceRun(results, {name: result.responses for name, result in results.items()})


def _simple_evaluate(lm, prepared: list, task_dir: Path) -> dict:
    """lm-eval's per-sample log of every part of every prepared benchmark."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    parts = [part for p in prepared for part in p.parts]
    samples = {part.task_name: part.selected for part in parts
               if len(part.selected) < len(part.doc_ids)}
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    output = simple_evaluate(model=lm, tasks=[part.task_name for part in parts],
                             samples=samples or None, log_samples=True, task_manager=manager,
                             bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                             torch_random_seed=None)
    return output["samples"]


# ---------------------------------------------------------------------------- agreement

def _per_item(value) -> dict:
    """``{doc_id: value}`` from a TaskResult, its ``items`` list or a ``{doc_id: value}`` dict."""
    if isinstance(value, dict):
        return {int(k): v for k, v in value.items()}
    items = value if isinstance(value, list) else value.items
    return {int(doc_id): v for doc_id, v in items}


def _is_responses(value) -> bool:
    return not isinstance(value, (int, float))


def _prediction(value):
    """What an item's answer was: the best choice among responses, or the correctness value."""
    if not _is_responses(value):
        return float(value)
    if len(value) == 1:
        return bool(value[0][1])                     # one request: whether it is the greedy text
    logprobs = [r[0] for r in value]
    return max(range(len(logprobs)), key=logprobs.__getitem__)


def _loglik_gaps(host, device) -> tuple | None:
    """``(largest |Δ log-likelihood| of an answer, largest per answer token, whether every answer's
    token count was known)`` of one item; an answer of unknown length counts as one token."""
    if _is_responses(host) != _is_responses(device):
        raise DataError("compare like with like: responses on both sides, or correctness on both")
    if not _is_responses(host):
        return None
    if len(host) != len(device):
        raise DataError(f"an item has {len(host)} responses on the host and {len(device)} on the "
                        f"device; run both with the same tasks and profile")
    gaps = [(abs(h[0] - d[0]), _tokens(h, d)) for h, d in zip(host, device)]
    return (max((g for g, _ in gaps), default=0.0), max((g / (n or 1) for g, n in gaps), default=0.0),
            all(n for _, n in gaps))


def _tokens(host, device) -> int | None:
    """The answer's token count as the host (else the device) recorded it."""
    for side in (host, device):
        if len(side) > 2 and side[2]:
            return int(side[2])
    return None


def agreement(host: dict, device: dict) -> dict:
    """Device-vs-host agreement over the items both evaluated.

    ``host`` and ``device`` map a task to a ``TaskResult``, its ``items`` (``[[doc_id, correct]]``)
    or ``DeviceRun.responses[task]`` (``{doc_id: [[logprob, is_greedy(, tokens)], ...]}``). Returns
    ``{"n", "same_prediction", "max_loglik_diff", "max_loglik_diff_per_token", "tokens_counted",
    "tasks": {task: {...}}}``: the share of items with the same prediction (the highest
    log-likelihood choice where responses are given on both sides, else the same correctness), the
    largest absolute log-likelihood difference of any response and the largest divided by the
    answer's token count (None unless both sides give responses; ``tokens_counted`` False when
    some answer's count was unknown, which then counts as one token).
    """
    tasks, same, total, gaps = {}, 0, 0, []
    for task in host:
        if task not in device:
            raise DataError(f"task {task!r} was run on the host but not on the device")
        h, d = _per_item(host[task]), _per_item(device[task])
        if set(h) != set(d):
            raise DataError(f"task {task!r}: host and device evaluated different items "
                            f"({len(set(h) ^ set(d))} differ); use the same profile and seed")
        task_gaps = [g for g in (_loglik_gaps(h[k], d[k]) for k in h) if g is not None]
        agree = sum(_prediction(h[k]) == _prediction(d[k]) for k in h)
        tasks[task] = {"n": len(h), "same_prediction": agree / len(h) if h else math.nan,
                       **_gap_summary(task_gaps)}
        same, total, gaps = same + agree, total + len(h), gaps + task_gaps
    return {"n": total, "same_prediction": same / total if total else math.nan,
            **_gap_summary(gaps), "tasks": tasks}


def _gap_summary(gaps: list[tuple]) -> dict:
    if not gaps:
        return {"max_loglik_diff": None, "max_loglik_diff_per_token": None}
    return {"max_loglik_diff": max(g[0] for g in gaps), "max_loglik_diff_per_token": max(g[1] for g in gaps),
            "tokens_counted": all(g[2] for g in gaps)}
