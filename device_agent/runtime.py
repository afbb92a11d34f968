"""Run an exported graph with a stage's weights: numpy + onnxruntime, no torch.

The exported ``model.onnx`` holds the graph only: every weight initializer is declared as external
data whose file is never written. ``Runtime.load`` decodes the stage's packed weights, arranges them
as ``graph.json`` says and hands them to onnxruntime as in-memory external initializers
(``SessionOptions.add_external_initializers``). onnxruntime copies them into the session while it
loads the graph (documented for ``AddExternalInitializers``: the caller's buffers may be freed once
the session exists), so the decoded arrays are dropped right after: the weights are resident once,
and twice only while loading. (``add_initializer`` cannot be used: it refuses, or crashes on,
initializers whose data was stripped.)
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time as _time
from pathlib import Path

import numpy as np

from edgebuild.device_agent import codecs, packed

log = logging.getLogger(__name__)

GRAPH_FORMAT = 1
MODEL_FILE = "model.onnx"
GRAPH_FILE = "graph.json"
DEFAULT_BATCH_TOKENS = 8192   # batch x (context + continuation) tokens of one scoring run


class RuntimeLoadError(ValueError):
    """The graph directory or the weights given to it cannot be used together."""


def _default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def read_graph(graph_dir) -> dict:
    """Read and check ``graph.json`` of an exported graph directory."""
    path = Path(graph_dir) / GRAPH_FILE
    if not path.is_file() or not (Path(graph_dir) / MODEL_FILE).is_file():
        raise RuntimeLoadError(f"{graph_dir}: not an exported graph directory "
                               f"(needs {MODEL_FILE} and {GRAPH_FILE}); export the model first")
    try:
        graph = json.loads(path.read_text())
    except ValueError as e:
        raise RuntimeLoadError(f"{path}: not valid JSON ({e}); re-export the model") from None
    if not isinstance(graph, dict) or graph.get("format") != GRAPH_FORMAT:
        found = graph.get("format") if isinstance(graph, dict) else None
        raise RuntimeLoadError(f"{path}: graph format {found!r} is not supported "
                               f"(this runtime knows {GRAPH_FORMAT}); upgrade edgebuild-agent")
    return graph


def bind_weights(weights: dict, state: dict) -> dict:
    """Arrange ``state`` (state-dict name -> array) into ``{initializer name: float32 array}``."""
    missing = sorted({spec["source"] for spec in weights.values()} - set(state))
    if missing:
        raise RuntimeLoadError(f"the weights lack {len(missing)} tensor(s) the graph needs, e.g. "
                               f"{missing[:3]}; export and pack the same model")
    out = {}
    for name, spec in weights.items():
        arr = np.asarray(state[spec["source"]], dtype=spec.get("dtype", "float32"))
        if spec.get("transpose"):
            arr = arr.T
        if "shape" in spec and list(arr.shape) != list(spec["shape"]):
            raise RuntimeLoadError(f"tensor {spec['source']!r} has shape {list(arr.shape)}, the graph "
                                   f"expects {spec['shape']} for {name!r}; export and pack the same model")
        out[name] = np.ascontiguousarray(arr)
    return out


def _decode(packed_path) -> dict:
    """Decode every tensor of a packed file (the file's bytes are released on return)."""
    _meta, records = packed.read(packed_path)
    return codecs.decode_all(records)


def peak_rss_mb() -> float:
    """Peak resident memory of this process's own address space so far, in MiB (0.0 where unknown).

    Linux: ``VmHWM`` of /proc/self/status. ``ru_maxrss`` is only the fallback: it survives
    ``execve``, so a process started by a big parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux; 0.0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    shifted = row - row.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class Runtime:
    """An onnxruntime session of one exported graph bound to one stage's weights (batch of one)."""

    def __init__(self, session, graph: dict, threads: int):
        self.session = session
        self.graph = graph
        self.threads = threads
        self._eos = set(graph.get("eos_token_ids") or [])
        self._past_names = [f"past_key_values.{i}.{kind}" for i in range(graph["num_layers"])
                            for kind in ("key", "value")]

    @classmethod
    def load(cls, graph_dir, packed_path=None, *, state=None, threads=None) -> "Runtime":
        """Load ``graph_dir`` with weights decoded from ``packed_path``, or given as ``state``.

        ``state`` maps state-dict names to arrays; exactly one of ``packed_path`` and ``state`` is
        given. ``threads`` sets onnxruntime's intra-op threads (default: the CPUs this process may use).
        """
        if (packed_path is None) == (state is None):
            raise RuntimeLoadError("give exactly one of packed_path and state to Runtime.load")
        if threads is not None and int(threads) < 1:
            raise RuntimeLoadError(f"threads must be at least 1, got {threads}")
        graph = read_graph(graph_dir)
        arrays = bind_weights(graph["weights"], state if state is not None else _decode(packed_path))
        threads = int(threads or _default_threads())
        session = _session(Path(graph_dir) / MODEL_FILE, arrays, threads)
        return cls(session, graph, threads)  # onnxruntime holds its own copy of the weights now

    def _empty_past(self) -> list:
        shape = (1, self.graph["num_kv_heads"], 0, self.graph["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.graph["num_layers"])]

    def forward(self, input_ids, past=None):
        """One step: ``input_ids`` (S,) after the cache ``past`` (None: empty).

        Returns ``(logits (S, V) float32, present)``; ``present`` is the cache to pass next time.
        """
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.graph["vocab_size"]:
            raise ValueError(f"token ids must be a non-empty sequence in [0, {self.graph['vocab_size']})")
        past = self._empty_past() if past is None else past
        start = past[0].shape[2]
        feeds = {"input_ids": ids,
                 "attention_mask": np.ones((1, start + ids.shape[1]), dtype=np.int64),
                 "position_ids": np.arange(start, start + ids.shape[1], dtype=np.int64)[None]}
        feeds.update(zip(self._past_names, past))
        outputs = self.session.run(None, feeds)
        return outputs[0][0], outputs[1:]

    def logits(self, input_ids) -> np.ndarray:
        """Logits (S, V) float32 of one token sequence, without a cache."""
        return self.forward(input_ids)[0]

    def loglikelihood(self, context_ids, continuation_ids) -> tuple:
        """``(sum of log-probs of continuation given context, whether it is the greedy one)``."""
        context, continuation = list(context_ids), list(continuation_ids)
        if not context or not continuation:
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        logits = self.logits(context + continuation)[len(context) - 1:-1]
        logprobs = _log_softmax(logits)
        target = np.asarray(continuation)
        total = float(logprobs[np.arange(len(target)), target].sum())
        return total, bool((logits.argmax(axis=-1) == target).all())

    def score(self, requests, max_batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list:
        """``[(logprob, is_greedy)]`` of ``[(context_ids, continuation_ids), ...]``, in order.

        Requests that share a context share one prefill of it: its last logits row scores each
        continuation's first token, and the continuations' other tokens run as one batch (right-
        padded, ``batch x (context + longest continuation)`` within ``max_batch_tokens``) on
        copies of the context's KV cache. A lone request costs the same as a whole-sequence
        prefill; four answers to one five-shot prompt cost about one.
        """
        pairs = [(list(ctx), list(cont)) for ctx, cont in requests]
        for ctx, cont in pairs:
            self._check_ids(ctx + cont)
            if not ctx or not cont:
                raise ValueError("score needs a non-empty context and continuation in each request")
        groups: dict = {}
        for index, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(index)
        results = [None] * len(pairs)
        for ctx, indices in groups.items():
            logits, past = self.forward(ctx)
            for batch in _token_batches(indices, pairs, len(ctx), max_batch_tokens):
                scored = self._continuations(logits[-1], past, [pairs[i][1] for i in batch])
                for index, value in zip(batch, scored):
                    results[index] = value
        return results

    def _continuations(self, first_logits, past, continuations) -> list:
        """Score continuations that follow one context whose cache is ``past``."""
        steps = max(len(cont) for cont in continuations) - 1
        step_logits = self._batch_step(past, [cont[:-1] for cont in continuations], steps)
        out = []
        for row, cont in enumerate(continuations):
            rows = [first_logits[None]]
            if len(cont) > 1:
                rows.append(step_logits[row, :len(cont) - 1])
            logits = np.concatenate(rows)
            logprobs = _log_softmax(logits)
            target = np.asarray(cont)
            total = float(logprobs[np.arange(len(cont)), target].sum())
            out.append((total, bool((logits.argmax(axis=-1) == target).all())))
        return out

    def _batch_step(self, past, inputs, steps):
        """Logits (B, steps, V) of right-padded ``inputs`` run on B copies of the cache ``past``."""
        if steps == 0:
            return None
        batch, start = len(inputs), past[0].shape[2]
        ids = np.zeros((batch, steps), dtype=np.int64)
        mask = np.ones((batch, start + steps), dtype=np.int64)
        for row, tokens in enumerate(inputs):
            ids[row, :len(tokens)] = tokens
            mask[row, start + len(tokens):] = 0
        feeds = {"input_ids": ids, "attention_mask": mask,
                 "position_ids": np.broadcast_to(np.arange(start, start + steps, dtype=np.int64),
                                                 (batch, steps)).copy()}
        feeds.update((name, np.repeat(p, batch, axis=0)) for name, p in zip(self._past_names, past))
        return self.session.run(["logits"], feeds)[0]

    def _check_ids(self, ids) -> None:
        vocab = self.graph["vocab_size"]
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be integers in [0, {vocab})")

    def greedy(self, input_ids, max_new_tokens, stop_at_eos=True) -> tuple:
        """Greedy decode with the KV cache; returns ``(new tokens, logits (n, V) that chose them)``."""
        tokens, steps = [], []
        logits, past = self.forward(input_ids)
        for _ in range(max_new_tokens):
            row = logits[-1]
            tokens.append(int(row.argmax()))
            steps.append(row)
            if stop_at_eos and tokens[-1] in self._eos:
                break
            if len(tokens) < max_new_tokens:
                logits, past = self.forward([tokens[-1]], past)
        return tokens, np.stack(steps) if steps else np.zeros((0, self.graph["vocab_size"]), np.float32)

    def generate(self, input_ids, max_new_tokens) -> list:
        """Greedy continuation of ``input_ids`` with the KV cache (stops after an end-of-sequence token)."""
        return self.greedy(input_ids, max_new_tokens)[0]

    def time(self, prompt_len=64, decode_tokens=32, warmup=2, repeats=5) -> dict:
        """Time prefill of ``prompt_len`` tokens and KV-cached decode of ``decode_tokens`` tokens.

        Runs ``warmup`` untimed rounds then ``repeats`` timed ones and returns the raw samples:
        ``{"prefill_ms": [...], "decode_ms_per_token": [...], "peak_rss_mb", "rss_mb", "threads",
        "prompt_len", "decode_tokens"}``. ``peak_rss_mb`` is the whole process's peak so far (loading
        included: decoded weights and onnxruntime's copy coexist briefly); ``rss_mb`` is the
        resident memory after the timed rounds.
        """
        return timed_rounds(self, prompt_len, decode_tokens, warmup, repeats)

    def _timed_round(self, prompt, decode_tokens) -> tuple:
        start = _time.perf_counter()
        logits, past = self.forward(prompt)
        prefill = _time.perf_counter() - start
        start = _time.perf_counter()
        for _ in range(decode_tokens):
            logits, past = self.forward([int(logits[-1].argmax())], past)
        decode = _time.perf_counter() - start
        return prefill * 1e3, decode * 1e3 / decode_tokens


def _token_batches(indices, pairs, context_len, max_batch_tokens):
    """Split ``indices`` (requests of one context) into batches of bounded padded size."""
    order = sorted(indices, key=lambda i: len(pairs[i][1]))
    batch, longest = [], 0
    for index in order:
        longest_if = max(longest, len(pairs[index][1]))
        if batch and (len(batch) + 1) * (context_len + longest_if) > max_batch_tokens:
            yield batch
            batch, longest_if = [], len(pairs[index][1])
        batch.append(index)
        longest = longest_if
    if batch:
        yield batch


def _session(model_path, arrays: dict, threads: int):
    """An onnxruntime session of ``model_path`` whose external initializers are (copies of) ``arrays``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
    options.add_external_initializers(list(arrays), values)
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise RuntimeLoadError(f"{model_path}: onnxruntime cannot load the graph with these weights "
                               f"({str(e).splitlines()[0]}); re-export the model") from e
    return session


def timed_rounds(rt, prompt_len: int, decode_tokens: int, warmup: int, repeats: int,
                 dtype=np.int64) -> dict:
    """Raw samples of ``rt._timed_round`` (``(prefill ms, decode ms/token)``) on one seeded random
    prompt: ``warmup`` untimed rounds, then ``repeats`` timed ones; memory read after them."""
    if prompt_len < 1 or decode_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError("time needs prompt_len, decode_tokens, repeats >= 1 and warmup >= 0")
    prompt = np.random.default_rng(0).integers(0, rt.graph["vocab_size"], prompt_len).astype(dtype)
    for _ in range(warmup):
        rt._timed_round(prompt, decode_tokens)
    samples = [rt._timed_round(prompt, decode_tokens) for _ in range(repeats)]
    return {"prefill_ms": [s[0] for s in samples], "decode_ms_per_token": [s[1] for s in samples],
            "peak_rss_mb": peak_rss_mb(), "rss_mb": current_rss_mb(), "threads": rt.threads,
            "prompt_len": prompt_len, "decode_tokens": decode_tokens}
