"""``edgebuild measure compress`` (``make bench-compress``): each method and config side by side on one model, in one run.

For every configuration: packed bytes (the artifact as written), bits per compressed weight, KL
divergence and top-1 agreement of next-token distributions against the uncompressed model, the
perplexity ratio, wall time and CPU time (all threads; less sensitive than wall time to other work on
the machine); ``rtn`` runs at matching bits/weight next to each method. Settings
reduced for a CPU (for example a restricted SeedLM seed budget) are labelled in the table.

    edgebuild measure compress --model smollm2-135m --data-dir DATA
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

CONFIGS = [
    # label, method, knobs, note — each method next to rtn at about the same bits/weight
    ("rtn 4b g128", "rtn", {"bits": 4, "group_size": 128}, ""),
    ("seedlm C8 P3", "seedlm", {}, ""),
    ("seedlm C8 P3, all seeds", "seedlm", {"seed_budget": "all"}, ""),
    ("vptq v2 8b, 1% fp16 cols", "vptq", {}, ""),
    ("rtn 4b g64", "rtn", {"bits": 4, "group_size": 64}, ""),
    ("vptq v2 8b, 3% fp16 cols", "vptq", {"outlier_fraction": 0.03}, ""),
    ("rtn 3b g128", "rtn", {"bits": 3, "group_size": 128}, ""),
    ("seedlm C12 P4", "seedlm", {"block_size": 12, "latent_dim": 4}, ""),
    ("vptq v4 8+4b, 1% fp16 cols", "vptq", {"vector_len": 4, "residual_codebook_bits": 4}, ""),
    ("rtn 6b g128", "rtn", {"bits": 6, "group_size": 128}, ""),
    ("hyper m2 θ12", "hyper", {}, ""),
]


def run_config(base, tok, method, knobs, ctx_kwargs, texts, ref) -> dict:
    from edgebuild.bench import quality
    from edgebuild.compress import apply_records, pack_model, packed_stats
    from edgebuild.compress.base import CompressContext
    from edgebuild.device_agent import packed
    model = copy.deepcopy(base)
    ctx = CompressContext(model=model, tokenizer=tok, **ctx_kwargs)
    t0, c0 = time.time(), time.process_time()
    records = pack_model(model, method, knobs, ctx)
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.ebpk"
        packed.write(path, records)
        size = path.stat().st_size
        _, records = packed.read(path)
    apply_records(model, records)
    q = quality.compare(model, tok, texts, ref)
    return {"bytes": size, "bits_per_weight": packed_stats(records)["bits_per_weight"], "seconds": seconds,
            "cpu_seconds": cpu_seconds, "facts": ctx.log, **q}


def run(model_spec: str, data_dir, configs=CONFIGS, on_row=None) -> list:
    """One row per configuration, measured in one run against the same reference log-probabilities."""
    from edgebuild.bench import quality
    from edgebuild.core import models
    base, tok = models.load(models.resolve(model_spec))
    texts = quality.quality_texts(data_dir)
    calib = quality.quality_texts(data_dir, 32, seed=1)
    ref = quality.reference_logprobs(base, tok, texts)
    ctx_kwargs = {"calibration_texts": calib, "device": _device()}
    rows = []
    for label, method, knobs, note in configs:
        row = {"label": label, "method": method, "knobs": knobs,
               **run_config(base, tok, method, knobs, ctx_kwargs, texts, ref)}
        row["note"] = note or _note(row["facts"])
        rows.append(row)
        if on_row:
            on_row(rows)
    return rows


def _note(facts: dict) -> str:
    """Say when a setting was reduced for the hardware (e.g. SeedLM's seed budget on a CPU)."""
    s = facts.get("seedlm")
    if s and s.get("seeds_searched") is not None and s.get("seeds_searched") < s.get("of", 0):
        return f"reduced: {s['seeds_searched']} of {s['of']} seeds searched ({s.get('device', 'cpu')})"
    return ""


def _device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def print_table(rows, model) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"compression methods on {model} (KL etc. against the uncompressed model)")
    for col in ("config", "bytes", "bits/w", "KL", "top-1", "ppl ratio", "seconds", "CPU s", "note"):
        t.add_column(col, justify="left" if col in ("config", "note") else "right")
    for r in rows:
        t.add_row(r["label"], f"{r['bytes']:,}", f"{r['bits_per_weight']:.3f}", f"{r['kl']:.4f}",
                  f"{r['top1_agreement']:.3f}", f"{r['ppl_ratio']:.3f}", f"{r['seconds']:.1f}",
                  f"{r.get('cpu_seconds', float('nan')):.1f}", r["note"])
    Console(width=200).print(t)

