"""HellaSwag, validation split (10042 items), from the plain-text format made for llama.cpp.

The file has 6 lines per item: ``activity_label + ": " + ctx``, the gold label (0-3), then the four
endings, with WikiHow markup already turned into text the way lm-eval's ``preprocess`` does
(`` [title]`` -> ``". "``). The built-in ``hellaswag`` task's ``process_docs`` builds its query as
``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``, so ``ctx_b`` (the
unfinished last sentence that the endings complete) must be split off again for its first letter
to be capitalised as lm-eval does:

- WikiHow items end with a full sentence (every one ends with ``.``): their ``ctx_b`` is empty.
- ActivityNet items end with an unfinished, lower-case sentence: ``ctx_b`` is the text after the
  last sentence end (``". "``, ``"! "``, ``"? "``), or all of it when there is none.

Re-applying ``preprocess`` to text that went through it is a no-op except for leftover bracketed
text (a few URLs and placeholders), which it removes just as it does on the original release.
Metric: ``acc_norm``, as commonly reported for HellaSwag. 10-shot: the data dir holds only the
validation split, so 10 items (a fixed seeded draw) are held out of it as the examples; 10,032
items are evaluated.
"""
from __future__ import annotations

import re
from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, fixed_chance, hold_out
from edgebuild.bench.data import DATA_HINT, convert_records, data_file, read_lines
from edgebuild.core.errors import DataError

LINES_PER_ITEM = 6
FEWSHOT = 10
_SENTENCE_END = re.compile(r"[.!?] ")


def split_context(ctx: str) -> tuple[str, str]:
    """``(ctx_a, ctx_b)`` of a context whose markup was already processed (see module doc)."""
    if ctx.endswith("."):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return "", ctx
    cut = ends[-1].end()
    return ctx[:cut - 1], ctx[cut:]


def hellaswag_doc(block: tuple[int, list[str]]) -> dict:
    """One 6-line item in the ``Rowan/hellaswag`` layout."""
    index, (first, label, *endings) = block
    activity_label, ctx = first.split(": ", 1)
    if label not in ("0", "1", "2", "3"):
        raise ValueError(f"label {label!r} is not 0-3")
    ctx_a, ctx_b = split_context(ctx)
    return {"ind": index, "activity_label": activity_label, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": ctx, "endings": endings, "label": label, "split": "val"}


def convert(data_dir: Path) -> Converted:
    """Parse ``hellaswag/hellaswag_val_full.txt.gz``."""
    path = data_file(data_dir, "hellaswag/hellaswag_val_full.txt.gz")
    lines = read_lines(path)
    if len(lines) % LINES_PER_ITEM:
        raise DataError(f"{path} has {len(lines)} lines, not a multiple of {LINES_PER_ITEM}",
                        hint=DATA_HINT)
    blocks = [(i // LINES_PER_ITEM, lines[i:i + LINES_PER_ITEM])
              for i in range(0, len(lines), LINES_PER_ITEM)]
    return hold_out(convert_records(path, blocks, hellaswag_doc), FEWSHOT, "hellaswag")


HELLASWAG = Benchmark(
    name="hellaswag", lm_eval_task="hellaswag", lm_eval_yaml="hellaswag/hellaswag.yaml",
    kind="core", metric="acc_norm", num_fewshot=FEWSHOT, convert=convert,
    chance_of=fixed_chance(0.25),
)
