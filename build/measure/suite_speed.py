"""``edgebuild measure suite`` (``make bench-suite``): edgebuild's host scorer next to the ``lm_eval`` command-line tool, same items.

For each task, in one run: edgebuild scores the profile's seeded items in this process
(``edgebuild.bench.runner.run_host``: packed log-likelihoods with the few-shot prefix computed
once, batched generation with the shared prompt prefix stored once), then the ``lm_eval`` command
runs as its own process (``lm_eval --model hf --model_args pretrained=<model dir>``) on the same
lm-eval task YAMLs (``--include_path``: built-in task definitions, the data dir's documents, the
same few-shot examples) and the same items (``--samples``). Its per-item log is scored exactly as
edgebuild scores its own. Printed per task: both scores and their difference in points (the two
must agree within ``TOLERANCE_POINTS``), per-item agreement and items/s of each side: edgebuild's
without model loading (the model is loaded once for the run), lm_eval's over its process wall
time and over its evaluation alone (``lm_eval`` reports how long ``simple_evaluate`` took, model
loading included).

    edgebuild measure suite --model smollm2-135m --data-dir DATA --profile quick
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgebuild.core.errors import ConfigError, DataError

TOLERANCE_POINTS = 1.0
TASKS = ["arc_easy", "piqa", "hellaswag", "gsm8k"]


@dataclass
class Setup:
    """What both sides share: model, profile, seed, batch size, few-shot count."""

    model_spec: str
    data_dir: Path
    profile: str = "quick"
    seed: int = 0
    batch_size: int = 16
    num_fewshot: int | None = None
    timeout_s: float = 3600.0


def lm_eval_command() -> str:
    """The ``lm_eval`` executable next to this Python, else on PATH."""
    here = Path(sys.executable).parent / "lm_eval"
    found = str(here) if here.is_file() else shutil.which("lm_eval")
    if found is None:
        raise DataError("the lm_eval command is not installed", hint="pip install lm-eval")
    return found


def check_tasks(tasks: list[str]) -> None:
    """Only benchmarks that the stock ``lm_eval`` command can score: code tasks need edgebuild's
    sandbox filter, which exists only inside edgebuild's process."""
    from edgebuild.bench import benchmarks
    from edgebuild.bench.codeexec import FILTER_NAME

    for name in tasks:
        generation = benchmarks.get(name).generation
        if generation is not None and generation.filter == FILTER_NAME:
            raise ConfigError(f"{name}: code benchmarks run their programs in edgebuild's sandbox, "
                              "which the lm_eval command lacks; choose other tasks")


def run(setup: Setup, tasks: list[str], on_row=None) -> list[dict]:
    """One row per task: each side's score, n, seconds and items/s, and the per-item agreement.
    ``on_row(rows so far)`` is called after each task."""
    from edgebuild.bench.compare import warm_up
    from edgebuild.core import models

    check_tasks(tasks)
    ref = models.resolve(setup.model_spec)
    if not Path(ref.path).is_dir():
        raise ConfigError(f"{setup.model_spec}: the lm_eval command needs a Hugging Face model folder",
                          hint="fetch an embedded model or give a local model folder")
    model, tokenizer = models.load(ref)
    warm_up(model)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgebuild-suite-") as work:
        for task in tasks:
            rows.append(_task_row(setup, Path(ref.path), model, tokenizer, task, Path(work)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def _task_row(setup: Setup, model_dir: Path, model, tokenizer, task: str, work: Path) -> dict:
    from edgebuild.bench.runner import run_host

    cache = work / "cache"
    start = time.perf_counter()
    ours = run_host(model, tokenizer, [task], setup.profile, setup.data_dir, cache, seed=setup.seed,
                    batch_size=setup.batch_size, num_fewshot=setup.num_fewshot)[task]
    seconds = time.perf_counter() - start
    theirs, wall, evaluation = run_lm_eval_cli(setup, model_dir, task, work / task, cache)
    same = dict((d, c) for d, c in ours.items)
    return {"task": task, "n": ours.n,
            "edgebuild": {"score": ours.score, "seconds": seconds, "items_per_s": ours.n / seconds},
            "lm_eval_cli": {"score": theirs.score, "n": theirs.n, "seconds": wall,
                            "items_per_s": theirs.n / wall, "eval_seconds": evaluation,
                            "eval_items_per_s": theirs.n / evaluation if evaluation else None},
            "diff_points": 100 * (ours.score - theirs.score),
            "same_items": sum(same.get(d) == c for d, c in theirs.items)}


def run_lm_eval_cli(setup: Setup, model_dir: Path, task: str, work: Path, cache: Path):
    """``(TaskResult, process seconds, lm-eval's evaluation seconds)`` of the ``lm_eval`` command
    on the task's items, from task YAMLs written as ``run_host`` writes them."""
    from edgebuild.bench import benchmarks
    from edgebuild.bench.profiles import get_profile
    from edgebuild.bench.runner import prepare

    task_dir, out = work / "tasks", work / "out"
    task_dir.mkdir(parents=True)
    prepared = prepare(benchmarks.get(task), setup.data_dir, cache, task_dir, get_profile(setup.profile),
                       setup.seed, num_fewshot=setup.num_fewshot)
    names = [part.task_name for part in prepared.parts]
    command = [lm_eval_command(), "--model", "hf",
               "--model_args", f"pretrained={model_dir},dtype=float32",
               "--tasks", ",".join(names), "--include_path", str(task_dir),
               "--samples", json.dumps({part.task_name: part.selected for part in prepared.parts}),
               "--batch_size", str(setup.batch_size), "--device", "cpu",
               "--output_path", str(out), "--log_samples"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=setup.timeout_s,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
                          stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"lm_eval failed on {task} (exit {done.returncode}): {tail[0]}",
                        hint=f"run it by hand: {' '.join(command)}")
    samples, evaluation = read_output(out, names)
    from edgebuild.bench.runner import result_from_samples
    return result_from_samples(prepared, samples), wall, evaluation


def read_output(out: Path, names: list[str]) -> tuple[dict, float | None]:
    """``({task name: logged samples}, evaluation seconds)`` from an ``lm_eval --output_path`` folder."""
    samples = {}
    for name in names:
        files = sorted(out.rglob(f"samples_{name}_*.jsonl"))
        if not files:
            raise DataError(f"lm_eval wrote no per-item log for {name} under {out}",
                            hint="check that the installed lm-eval supports --log_samples")
        samples[name] = [_in_process_form(json.loads(line))
                         for line in files[-1].read_text().splitlines() if line.strip()]
    results = sorted(out.rglob("results_*.json"))
    seconds = json.loads(results[-1].read_text()).get("total_evaluation_time_seconds") if results else None
    return samples, float(seconds) if seconds is not None else None


def _in_process_form(sample: dict) -> dict:
    """A logged sample as ``simple_evaluate`` returns it: the written log keeps each request's
    arguments as ``{"gen_args_0": {"arg_0": ..., "arg_1": ...}}``, the returned one as a list of tuples."""
    arguments = sample.get("arguments")
    if isinstance(arguments, dict):
        sample["arguments"] = [tuple(args.values()) for args in arguments.values()]
    return sample


def total(rows: list) -> dict:
    """Items/s of each side over all tasks together."""
    n = sum(r["n"] for r in rows)
    ours = sum(r["edgebuild"]["seconds"] for r in rows)
    wall = sum(r["lm_eval_cli"]["seconds"] for r in rows)
    evaluation = [r["lm_eval_cli"]["eval_seconds"] for r in rows]
    eval_total = sum(evaluation) if all(evaluation) else None
    return {"task": "all", "n": n, "edgebuild": {"seconds": ours, "items_per_s": n / ours},
            "lm_eval_cli": {"seconds": wall, "items_per_s": n / wall, "eval_seconds": eval_total,
                            "eval_items_per_s": n / eval_total if eval_total else None}}


def agree(rows: list) -> bool:
    """Whether every task's two scores are within ``TOLERANCE_POINTS``."""
    return all(abs(r["diff_points"]) <= TOLERANCE_POINTS for r in rows)


def print_table(rows: list, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("task", "n", "edgebuild", "lm_eval", "diff (points)", "same per item", "edgebuild items/s",
                "lm_eval items/s (process)", "lm_eval items/s (evaluate)", "speed-up (process)"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows + [total(rows)]:
        e, c = r["edgebuild"], r["lm_eval_cli"]
        scores = ((f"{e['score']:.4f}", f"{c['score']:.4f}", f"{r['diff_points']:+.2f}",
                   f"{r['same_items']}/{c['n']}") if "score" in e else ("", "", "", ""))
        evaluate = f"{c['eval_items_per_s']:.2f}" if c["eval_items_per_s"] else "-"
        table.add_row(r["task"], str(r["n"]), *scores, f"{e['items_per_s']:.2f}", f"{c['items_per_s']:.2f}",
                      evaluate, f"{e['items_per_s'] / c['items_per_s']:.2f}x")
    Console(width=180).print(table)
    verdict = "within" if agree(rows) else "NOT within"
    print(f"scores {verdict} {TOLERANCE_POINTS:g} point of each other on every task; edgebuild's time "
          "excludes model loading, lm_eval's process time includes its start and model loading")
