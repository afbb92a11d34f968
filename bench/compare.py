"""``edgebuild measure host`` (``make bench-host``): edgebuild's host benchmarks next to lm-eval's stock ``hf`` model, same items.

Both sides evaluate the same in-memory model on the same generated lm-eval tasks (built-in task
definitions, local data, the profile's seeded sample, the same few-shot examples): edgebuild through
``HostLM`` (packed log-likelihoods with shared few-shot prefixes, see ``edgebuild.bench.prefix_scoring``),
lm-eval through its own ``HFLM`` (what ``lm_eval --model hf`` runs) wrapping the same model object,
each task in its own ``simple_evaluate`` call per side. Printed per task: score and n of each, the
score difference in points, on how many items both gave the same per-item result, items/s of each
and their ratio; then the totals. Model loading is outside both timings.

    edgebuild measure host --model smollm2-135m --data-dir DATA --profile full
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["arc_easy", "piqa", "hellaswag"]


def run_lm_eval_hf(model, tokenizer, tasks, profile, data_dir, cache_dir, *, seed=0, batch_size=16,
                   num_fewshot=None) -> dict:
    """``{task: TaskResult}`` from lm-eval's ``HFLM`` on the tasks and items ``run_host`` uses."""
    from lm_eval.models.huggingface import HFLM

    from edgebuild.bench.runner import run_lm

    return run_lm(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks, profile,
                  data_dir, cache_dir, seed=seed, num_fewshot=num_fewshot)


def _convert(tasks, profile, data_dir, cache_dir, seed) -> None:
    from edgebuild.bench import benchmarks
    from edgebuild.bench.profiles import get_profile
    from edgebuild.bench.runner import prepare

    with tempfile.TemporaryDirectory(dir=cache_dir) as task_dir:
        for t in tasks:
            prepare(benchmarks.get(t), data_dir, cache_dir, Path(task_dir), get_profile(profile), seed)


def compare(model_spec: str, data_dir, tasks, profile: str, seed: int = 0, device: str = "cpu",
            dtype: str = "float32", num_fewshot: int | None = None, on_row=None) -> list:
    """One row per task: both sides' score, n, seconds and items/s, measured in one run (each
    task in its own ``simple_evaluate`` call per side, the two sides one after the other).
    ``num_fewshot`` (None: each benchmark's own count) applies to both sides;
    ``on_row(rows so far)`` is called after each side of each task (the last row may then lack
    the other side)."""
    from edgebuild.bench.runner import run_host
    from edgebuild.core import models

    model, tok = models.load(models.resolve(model_spec), dtype=dtype)
    model = model.to(device)
    warm_up(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgebuild-compare-") as cache:
        _convert(tasks, profile, data_dir, cache, seed)      # both sides then read the same cache
        for task in tasks:
            row, items = {"task": task}, {}
            for side, fn in (("edgebuild", run_host), ("lm_eval_hf", run_lm_eval_hf)):
                start = time.perf_counter()
                result = fn(model, tok, [task], profile, data_dir, cache, seed=seed,
                            num_fewshot=num_fewshot)[task]
                seconds = time.perf_counter() - start
                row[side] = {"score": result.score, "n": result.n, "seconds": seconds,
                             "items_per_s": result.n / seconds}
                items[side] = dict((doc_id, correct) for doc_id, correct in result.items)
                print(json.dumps({"task": task, side: row[side]}), file=sys.stderr, flush=True)
                if on_row is not None:                # one side measured: keep it already
                    on_row(rows + [row])
            row["same_items"] = sum(items["edgebuild"].get(d) == c
                                    for d, c in items["lm_eval_hf"].items())
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def warm_up(model) -> None:
    """One short forward pass, so that neither side's timing holds the device's first-use costs
    (kernel selection, library handles; seconds on a GPU)."""
    import torch

    with torch.inference_mode():
        model(input_ids=torch.ones(1, 8, dtype=torch.long, device=model.device))


def total(rows: list) -> dict:
    """Items/s of each side over all tasks together."""
    out = {"task": "all"}
    for side in ("edgebuild", "lm_eval_hf"):
        n = sum(r[side]["n"] for r in rows)
        seconds = sum(r[side]["seconds"] for r in rows)
        out[side] = {"n": n, "seconds": seconds, "items_per_s": n / seconds}
    return out


def print_table(rows: list, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "n", "edgebuild", "lm_eval hf", "diff (points)", "same per item",
                "edgebuild items/s", "lm_eval hf items/s", "speed-up"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows + [total(rows)]:
        e, h = r["edgebuild"], r["lm_eval_hf"]
        scores = ((f"{e['score']:.4f}", f"{h['score']:.4f}",
                   f"{100 * (e['score'] - h['score']):+.2f}", f"{r['same_items']}/{h['n']}")
                  if "score" in e else ("", "", "", ""))
        table.add_row(r["task"], str(e["n"]), *scores, f"{e['items_per_s']:.1f}",
                      f"{h['items_per_s']:.1f}", f"{e['items_per_s'] / h['items_per_s']:.2f}x")
    Console(width=160).print(table)
    print("each task in its own simple_evaluate call per side; model loading excluded")
