"""``make bench-host``: edgebuild's host benchmarks next to lm-eval's stock ``hf`` model, same items.

Both sides evaluate the same in-memory model on the same generated lm-eval tasks (built-in task
definitions, local data, the profile's seeded sample): edgebuild through ``HostLM`` (token-bounded
batches, no trial runs), lm-eval through its own ``HFLM`` wrapping the same model object, each in one
``simple_evaluate`` call. Printed per task: score and n of each, the score difference in points, and
items/s of each with their ratio. Model loading is outside both timings.

    python -m edgebuild.bench.compare --model smollm2-135m --data-dir DATA --profile full
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["arc_easy", "piqa", "hellaswag"]


def run_lm_eval_hf(model, tokenizer, tasks, profile, data_dir, cache_dir, *, seed=0, batch_size=16) -> dict:
    """``{task: TaskResult}`` from lm-eval's ``HFLM`` on the tasks and items ``run_host`` uses."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from edgebuild.bench import benchmarks
    from edgebuild.bench.profiles import get_profile
    from edgebuild.bench.runner import _offline, _task_result, prepare

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _offline(), tempfile.TemporaryDirectory(dir=cache_dir, prefix="tasks-") as task_dir:
        prepared = [prepare(benchmarks.get(t), data_dir, cache_dir, Path(task_dir), get_profile(profile), seed)
                    for t in tasks]
        parts = [part for p in prepared for part in p.parts]
        samples = {p.task_name: p.selected for p in parts if len(p.selected) < len(p.doc_ids)}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=[p.task_name for p in parts], samples=samples or None,
                              log_samples=True, bootstrap_iters=0,
                              task_manager=TaskManager(include_path=task_dir, include_defaults=False))
    return {p.bench.name: _task_result(p, out["samples"]) for p in prepared}


def _convert(tasks, profile, data_dir, cache_dir, seed) -> None:
    from edgebuild.bench import benchmarks
    from edgebuild.bench.profiles import get_profile
    from edgebuild.bench.runner import prepare

    with tempfile.TemporaryDirectory(dir=cache_dir) as task_dir:
        for t in tasks:
            prepare(benchmarks.get(t), data_dir, cache_dir, Path(task_dir), get_profile(profile), seed)


def compare(model_spec: str, data_dir, tasks, profile: str, seed: int = 0) -> list:
    """One row per task: both sides' score, n and items/s, measured in one run."""
    from edgebuild.bench.runner import run_host
    from edgebuild.build import model as models

    model, tok = models.load(models.resolve(model_spec))
    with tempfile.TemporaryDirectory(prefix="edgebuild-compare-") as cache:
        _convert(tasks, profile, data_dir, cache, seed)      # both sides then read the same cache
        timed = {}
        for side, fn in (("edgebuild", run_host), ("lm_eval_hf", run_lm_eval_hf)):
            start = time.perf_counter()
            results = fn(model, tok, tasks, profile, data_dir, cache, seed=seed)
            timed[side] = (results, time.perf_counter() - start)
    rows = []
    for task in tasks:
        row = {"task": task}
        for side, (results, seconds) in timed.items():
            r = results[task]
            items = sum(len(results[t].items) for t in tasks)
            row[side] = {"score": r.score, "n": r.n, "items_per_s": items / seconds, "seconds": seconds}
        rows.append(row)
    return rows


def print_table(rows: list, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "n", "edgebuild", "lm_eval hf", "diff (points)", "edgebuild items/s",
                "lm_eval hf items/s", "speed-up"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows:
        e, h = r["edgebuild"], r["lm_eval_hf"]
        table.add_row(r["task"], str(e["n"]), f"{e['score']:.4f}", f"{h['score']:.4f}",
                      f"{100 * (e['score'] - h['score']):+.2f}", f"{e['items_per_s']:.1f}",
                      f"{h['items_per_s']:.1f}", f"{e['items_per_s'] / h['items_per_s']:.2f}x")
    Console(width=160).print(table)
    print("items/s are over all tasks of one simple_evaluate call per side (model loading excluded)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--profile", default="reduced", choices=("smoke", "reduced", "full"))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--json", dest="json_out", type=Path, default=None)
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    rows = compare(args.model, args.data_dir, tasks, args.profile)
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    print_table(rows, f"host benchmarks on {args.model}, profile {args.profile}: edgebuild vs lm_eval --model hf")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
