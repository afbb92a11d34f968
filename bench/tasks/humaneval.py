"""HumanEval (164 hand-written Python problems), from the OpenAI release.

``humaneval/HumanEval.jsonl.gz`` holds ``{"task_id", "prompt", "canonical_solution", "test",
"entry_point"}``: the Hugging Face ``openai/openai_humaneval`` layout. The model completes the
function after its prompt (greedy for ``humaneval``; lm-eval's ``humaneval_64`` sampling,
temperature 0.2 and top-p 0.95, for ``humaneval_pass10``), stopping at the next top-level
``def``/``class``/``if``/``print``/``#``. Each completion runs with the item's tests in
``edgebuild.bench.sandbox``; ``edgebuild.bench.codeexec`` scores it.

- ``humaneval``: pass@1 of the greedy completion (0 or 1 per item).
- ``humaneval_pass10``: pass@10 by the unbiased estimator over ``SAMPLES`` sampled completions
  per item (per item in [0, 1]; pass@1 of the same samples is logged too).

The built-in YAMLs are copied inline (not included): their helper module imports and runs
Hugging Face's in-process ``code_eval`` as soon as it is loaded.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, Generation, fixed_chance
from edgebuild.bench.codeexec import FILTER_NAME, task_overrides
from edgebuild.bench.data import convert_records, data_file, read_jsonl

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
SAMPLES = 10          # n per item for pass@10 (n >= k; more samples lower the variance)
MAX_GEN_TOKS = 256    # the built-in allows 1024; reference solutions are under 200 tokens


def humaneval_doc(raw: dict) -> dict:
    """One release record, its fields checked."""
    return {key: raw[key] for key in FIELDS}


def convert(data_dir: Path) -> Converted:
    """The 164 problems, in file order."""
    path = data_file(data_dir, "humaneval/HumanEval.jsonl.gz")
    return Converted(convert_records(path, read_jsonl(path), humaneval_doc))


HUMANEVAL = Benchmark(
    name="humaneval", lm_eval_task="humaneval", lm_eval_yaml="humaneval/humaneval.yaml",
    kind="core", metric="pass@1", num_fewshot=0, convert=convert, chance_of=fixed_chance(0.0),
    generation=Generation(max_gen_toks=MAX_GEN_TOKS, filter=FILTER_NAME, inline=True,
                          overrides=task_overrides("humaneval_outcomes", [1])),
)

HUMANEVAL_PASS10 = Benchmark(
    name="humaneval_pass10", lm_eval_task="humaneval_64",
    lm_eval_yaml="humaneval/humaneval_64.yaml", kind="core", metric="pass@10", num_fewshot=0,
    convert=convert, chance_of=fixed_chance(0.0),
    generation=Generation(max_gen_toks=MAX_GEN_TOKS, repeats=SAMPLES, filter=FILTER_NAME,
                          inline=True, overrides=task_overrides("humaneval_outcomes", [1, 10])),
)
