"""Per-stage measurements in a fresh process, so no stage inherits another's peak memory.

``measure_isolated(stage_dir, ...)`` starts ``python -m edgebuild.device_agent measure`` on the
stage folder and returns what that process reports about itself: resident memory before the load
(the interpreter and the runtime libraries), after it and at its peak, the load time, the raw
prefill and decode samples, the sha256 of the runtime weights computed there, and the bytes the
stage occupies on the device. ``measure_here`` is what the child runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edgebuild.device_agent import runtime_dir
from edgebuild.device_agent.runtime import RuntimeLoadError, current_rss_mb, peak_rss_mb

PACKED_FILE = "weights.ebpk"
TIMING_KEYS = ("prompt_len", "decode_tokens", "warmup", "repeats")


def load_stage(stage_dir, threads=None):
    """A runtime for a stage folder: a runtime directory (``runtime.json``) in onnxruntime-genai,
    or an exported float graph with packed weights (``weights.ebpk``) in onnxruntime."""
    stage_dir = Path(stage_dir)
    if runtime_dir.is_runtime_dir(stage_dir):
        from edgebuild.device_agent.genai_runtime import GenaiRuntime
        return GenaiRuntime.load(stage_dir, threads=threads)
    from edgebuild.device_agent.runtime import Runtime
    if not (stage_dir / PACKED_FILE).is_file():
        raise RuntimeLoadError(f"{stage_dir}: holds neither {runtime_dir.MANIFEST} nor {PACKED_FILE}; "
                               f"stage a runtime directory or an exported graph with packed weights")
    return Runtime.load(stage_dir, stage_dir / PACKED_FILE, threads=threads)


def _imports() -> None:
    """Import what a load needs, so ``rss_before_load_mb`` counts the libraries, not the stage."""
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        pass


def measure_here(stage_dir, threads=None, **timing) -> dict:
    """Load ``stage_dir`` in this process and time it; the process's own memory figures."""
    _imports()
    before = current_rss_mb()
    start = time.perf_counter()
    runtime = load_stage(stage_dir, threads)
    load_s = time.perf_counter() - start
    loaded = current_rss_mb()
    result = runtime.time(**timing)
    result.update(load_s=round(load_s, 3), rss_before_load_mb=before, rss_loaded_mb=loaded,
                  peak_rss_mb=peak_rss_mb(), stage_rss_mb=result["rss_mb"] - before,
                  stored_bytes=runtime_dir.stored_bytes(stage_dir), pid=os.getpid(),
                  weights_sha256=getattr(runtime, "weights_sha256", None),
                  format="runtime" if runtime_dir.is_runtime_dir(stage_dir) else "packed")
    return result


def child_command(stage_dir, threads=None, **timing) -> list:
    cmd = [sys.executable, "-m", "edgebuild.device_agent", "measure", "--dir", str(stage_dir)]
    if threads:
        cmd += ["--threads", str(threads)]
    for key in TIMING_KEYS:
        if timing.get(key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(timing[key])]
    return cmd


def measure_isolated(stage_dir, threads=None, timeout_s: float = 1800.0, **timing) -> dict:
    """Run ``measure_here`` in a fresh interpreter and return its report (``RuntimeLoadError`` on failure)."""
    try:
        done = subprocess.run(child_command(stage_dir, threads, **timing), capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeLoadError(f"measuring {stage_dir} took longer than {timeout_s:g} s") from None
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " | ".join(done.stderr.decode("utf-8", "replace").strip().splitlines()[-2:])
        raise RuntimeLoadError(f"measuring {stage_dir} failed (exit status {done.returncode}): "
                               f"{tail or 'no output'}")
    return json.loads(lines[-1])
