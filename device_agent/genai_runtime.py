"""Run a runtime directory (``runtime_dir``) with onnxruntime-genai: the device's decode loop.

onnxruntime-genai opens the folder as it is (``genai_config.json`` + ``model.onnx`` + its data):
the low-bit weights stay low-bit in memory (MatMulNBits and GatherBlockQuantized read them
packed), the KV cache is one buffer per layer that past and present share, and greedy search runs
in C++. Scoring and verification feed tokens themselves (``append_tokens``) and read the logits
of every fed position; a context shared by several continuations is fed once and the generator
rewound to it after each continuation.

Before onnxruntime sees the graph, ``GenaiRuntime.load`` checks every file's size and sha256
against ``runtime.json`` and the operators the graph needs against this onnxruntime, so a
truncated file or a too-old onnxruntime is a one-line error naming the file or the operator.
"""
from __future__ import annotations

import json
import logging
import os
import time as _time
from pathlib import Path

import numpy as np

from edgebuild.device_agent import operators, runtime_dir
from edgebuild.device_agent.runtime import RuntimeLoadError, _log_softmax, timed_rounds

log = logging.getLogger(__name__)


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_operators(manifest: dict, folder) -> None:
    import onnxruntime

    missed = operators.missing(manifest.get("requirements", []), onnxruntime.__version__,
                               operators.registered_kernels())
    if missed:
        raise RuntimeLoadError(f"{Path(folder) / runtime_dir.GRAPH}: "
                               f"{operators.message(missed, onnxruntime.__version__)}")


def _open_model(folder, threads: int):
    try:
        import onnxruntime_genai as og
    except ImportError as err:
        raise RuntimeLoadError(f"cannot import onnxruntime_genai ({err}); install "
                               f"edgebuild-agent[runtime] on the device") from None
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    try:
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        return og, og.Model(config)
    except Exception as err:  # onnxruntime-genai raises untyped RuntimeErrors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RuntimeLoadError(f"{Path(folder) / runtime_dir.GRAPH}: onnxruntime-genai cannot load "
                               f"it ({first})") from None


class GenaiRuntime:
    """One runtime directory loaded in onnxruntime-genai (batch of one, greedy)."""

    def __init__(self, og, model, manifest: dict, folder: Path, threads: int, hashes: dict):
        self._og, self.model, self.manifest = og, model, manifest
        self.folder, self.threads = folder, threads
        self.hashes = hashes
        info = manifest["model"]
        self.graph = {"vocab_size": info["vocab_size"], "num_layers": info["num_layers"]}
        self._eos = set(info.get("eos_token_ids") or [])

    @classmethod
    def load(cls, folder, threads=None, verify: bool = True) -> "GenaiRuntime":
        """Check ``folder`` (files, sha256, operators) and load it; ``threads``: intra-op threads."""
        folder = Path(folder)
        if threads is not None and int(threads) < 1:
            raise RuntimeLoadError(f"threads must be at least 1, got {threads}")
        try:
            manifest = runtime_dir.read_manifest(folder)
            hashes = runtime_dir.check_files(folder, manifest, hashes=verify)
        except runtime_dir.RuntimeFormatError as err:
            raise RuntimeLoadError(str(err)) from None
        _check_operators(manifest, folder)
        threads = int(threads or _default_threads())
        og, model = _open_model(folder, threads)
        return cls(og, model, manifest, folder, threads, hashes)

    def tokenizer(self):
        """onnxruntime-genai's tokenizer of the package (``tokenizer.json`` in the folder)."""
        return self._og.Tokenizer(self.model)

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the runtime weights, computed on this device at load (None when not verified)."""
        return self.hashes.get(self.manifest["weights_file"])

    # --- feeding tokens ---------------------------------------------------------------

    def _generator(self, max_length: int, sampling: bool = False):
        """A generator for up to ``max_length`` tokens: greedy, or with the package's own generation
        settings (``genai_config.json``'s ``search``) when ``sampling``."""
        params = self._og.GeneratorParams(self.model)
        options = {"max_length": int(max_length), "batch_size": 1}
        if not sampling:
            options["do_sample"] = False
        params.set_search_options(**options)
        return self._og.Generator(self.model, params)

    def _feed(self, generator, ids) -> np.ndarray:
        """Append ``ids`` and return the logits (len(ids), V) of the appended positions."""
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return np.asarray(generator.get_output("logits"), dtype=np.float32)[0]

    def _check_ids(self, ids) -> list:
        vocab = self.graph["vocab_size"]
        ids = [int(t) for t in ids]
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"token ids must be a non-empty sequence of integers in [0, {vocab})")
        return ids

    def logits(self, input_ids) -> np.ndarray:
        """Logits (S, V) float32 of one token sequence."""
        ids = self._check_ids(input_ids)
        return self._feed(self._generator(len(ids)), ids)

    def greedy(self, input_ids, max_new_tokens, stop_at_eos=True) -> tuple:
        """Greedy decode with the KV cache; ``(new tokens, logits (n, V) that chose them)``."""
        ids = self._check_ids(input_ids)
        generator = self._generator(len(ids) + max_new_tokens)
        row = self._feed(generator, ids)[-1]
        tokens, rows = [], []
        for step in range(max_new_tokens):
            tokens.append(int(row.argmax()))
            rows.append(row)
            if (stop_at_eos and tokens[-1] in self._eos) or step == max_new_tokens - 1:
                break
            row = self._feed(generator, [tokens[-1]])[-1]
        empty = np.zeros((0, self.graph["vocab_size"]), np.float32)
        return tokens, np.stack(rows) if rows else empty

    def generate(self, input_ids, max_new_tokens, on_token=None, sampling: bool = False) -> list:
        """Continuation by onnxruntime-genai's own search (greedy, or the package's generation
        settings when ``sampling``); ``on_token(id)`` after each token. Stops after an
        end-of-sequence token or ``max_new_tokens`` tokens.
        """
        ids = self._check_ids(input_ids)
        generator = self._generator(len(ids) + max_new_tokens, sampling)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        tokens = []
        while len(tokens) < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            if on_token is not None:
                on_token(tokens[-1])
        return tokens

    # --- scoring ------------------------------------------------------------------------

    def score(self, requests, max_batch_tokens=None) -> list:
        """``[(logprob, is_greedy)]`` of ``[(context_ids, continuation_ids), ...]``, in order.

        Requests that share a context share one prefill of it; ``max_batch_tokens`` is accepted
        for protocol compatibility (continuations run one after another here).
        """
        pairs = [(self._check_ids(ctx), self._check_ids(cont)) for ctx, cont in requests]
        groups: dict = {}
        for index, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(index)
        results = [None] * len(pairs)
        for ctx, indices in groups.items():
            longest = max(len(pairs[i][1]) for i in indices)
            generator = self._generator(len(ctx) + longest)
            last = self._feed(generator, list(ctx))[-1]
            for index in indices:
                results[index] = self._continuation(generator, len(ctx), last, pairs[index][1])
        return results

    def _continuation(self, generator, context_len: int, last, continuation) -> tuple:
        rows = [last[None]]
        if len(continuation) > 1:
            rows.append(self._feed(generator, continuation[:-1]))
            generator.rewind_to(context_len)
        logits = np.concatenate(rows)
        target = np.asarray(continuation)
        total = float(_log_softmax(logits)[np.arange(len(target)), target].sum())
        return total, bool((logits.argmax(axis=-1) == target).all())

    # --- timing -------------------------------------------------------------------------

    def time(self, prompt_len=64, decode_tokens=32, warmup=2, repeats=5) -> dict:
        """Prefill of ``prompt_len`` tokens and greedy decode of ``decode_tokens`` tokens.

        ``warmup`` untimed rounds, then ``repeats`` timed ones; raw samples come back, as with the
        float runtime (``Runtime.time``).
        """
        return timed_rounds(self, prompt_len, decode_tokens, warmup, repeats, dtype=np.int32)

    def _timed_round(self, prompt, decode_tokens) -> tuple:
        generator = self._generator(len(prompt) + decode_tokens + 1)
        start = _time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()          # picks the first token from the prefill's logits
        prefill = _time.perf_counter() - start
        start = _time.perf_counter()
        for _ in range(decode_tokens):           # each runs the model once on the previous token
            generator.generate_next_token()
        decode = _time.perf_counter() - start
        return prefill * 1e3, decode * 1e3 / decode_tokens
