"""``edgebuild measure device`` (``make bench-device``): decode and prefill speed of each stage's artifact, in the agent and in torch.

For every stage artifact of a finished build (``<out>/<target>/manifest.json``), in one run on this
machine: the device agent (through the target's transport) loads the stage's ONNX graph and packed
weights and times prefill of ``prompt_len`` tokens and KV-cached decode (warm-up, then repeats; raw
samples, medians here); torch runs the same stage's decoded weights with the same token counts,
threads and greedy decode. Both bind float32 weights, so the ratio is the runtimes' ratio.

    edgebuild measure device --out out/demo --target local
"""
from __future__ import annotations

import os
import json
import statistics
import sys
import time
from pathlib import Path


def torch_timing(model, vocab_size: int, prompt_len: int, decode_tokens: int, warmup: int,
                 repeats: int, threads: int) -> dict:
    """Prefill ms and decode ms/token of a Hugging Face causal LM, greedy, with its KV cache."""
    import numpy as np
    import torch

    from edgebuild.core.models import cache_arg, returned_cache

    if threads:
        torch.set_num_threads(threads)
    prompt = torch.from_numpy(np.random.default_rng(0).integers(0, vocab_size, prompt_len))[None]
    samples = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefill = time.perf_counter() - start
            past, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                out = model(nxt, use_cache=True, **{cache_arg(model): past})
                past, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)
            if i >= warmup:
                samples.append((prefill * 1e3, (time.perf_counter() - start) * 1e3 / decode_tokens))
    return {"prefill_ms": [s[0] for s in samples], "decode_ms_per_token": [s[1] for s in samples]}


def agent_timing(client, transport, stage: str, files: dict, threads: int | None, timing) -> dict:
    """Deploy one stage's files to the agent, load them and time them there."""
    from edgebuild.core.cache import digest
    from edgebuild.targets.client import deploy_stage

    version = digest(*(str(p) for p in files.values()))[:16]
    deploy_stage(client, transport, stage, version, files)
    client.load(stage, version, threads=threads)
    return client.time(prompt_len=timing.prompt_len, decode_tokens=timing.decode_tokens,
                       warmup=timing.warmup, repeats=timing.repeats)


def rates(samples: dict, prompt_len: int) -> dict:
    """Median prefill and decode tokens/s from raw samples."""
    prefill = statistics.median(samples["prefill_ms"])
    decode = statistics.median(samples["decode_ms_per_token"])
    return {"prefill_tok_s": prompt_len / prefill * 1e3, "decode_tok_s": 1e3 / decode,
            "prefill_ms": prefill, "decode_ms_per_token": decode}


def stage_files(build_dir: Path, manifest: dict) -> dict:
    """``{stage: {name in stage: path}}`` of every stage artifact in the manifest."""
    out = {}
    for stage, artifacts in manifest["artifacts"].items():
        out[stage] = {Path(a["path"]).name: build_dir / a["path"] for a in artifacts}
    return out


def run(build_dir: Path, target_name: str) -> list:
    """One row per stage: agent and torch speeds measured side by side."""
    from edgebuild.core import models
    from edgebuild.core.errors import UsageError
    from edgebuild.compress import apply_records
    from edgebuild.device_agent import packed
    from edgebuild.targets import load_target, transports
    from edgebuild.targets.client import connect
    import copy

    path = build_dir / "manifest.json"
    if not path.is_file():
        raise UsageError(f"no build at {build_dir} (manifest.json missing)", hint="run `edgebuild all` first")
    manifest = json.loads(path.read_text())
    target = load_target(target_name)
    base, _ = models.load(models.resolve(manifest["model"]))
    transport = transports.get(target.connection.transport)(target)
    client = connect(target, transport)
    t = target.timing
    threads = target.runtime.threads or os.cpu_count()   # onnxruntime's default: one per core
    rows = []
    try:
        for stage, files in stage_files(build_dir, manifest).items():
            agent = rates(agent_timing(client, transport, stage, files, threads, t), t.prompt_len)
            model = copy.deepcopy(base)
            apply_records(model, packed.read(files["weights.ebpk"])[1])
            samples = torch_timing(model, base.config.vocab_size, t.prompt_len, t.decode_tokens,
                                   t.warmup, t.repeats, threads)
            rows.append({"stage": stage, "bytes": files["weights.ebpk"].stat().st_size, "agent": agent,
                         "torch": rates(samples, t.prompt_len)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        client.close()
    return rows


def print_table(rows: list, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("stage", "packed MB", "agent prefill tok/s", "torch prefill tok/s", "agent decode tok/s",
                "torch decode tok/s", "decode agent/torch"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        a, t = r["agent"], r["torch"]
        table.add_row(r["stage"], f"{r['bytes'] / 1e6:.1f}", f"{a['prefill_tok_s']:.0f}",
                      f"{t['prefill_tok_s']:.0f}", f"{a['decode_tok_s']:.1f}", f"{t['decode_tok_s']:.1f}",
                      f"{a['decode_tok_s'] / t['decode_tok_s']:.2f}x")
    Console(width=160).print(table)
