"""MMLU (57 subjects), test split, 5-shot from the dev split, from the original CSV release.

``mmlu/{test,dev}/<subject>_{test,dev}.csv`` hold header-less rows ``question,A,B,C,D,answer``
(answer a letter). The built-in ``mmlu_<subject>`` tasks expect the ``cais/mmlu`` layout
``{"question", "subject", "choices": [4], "answer": 0-3}`` and take their 5 shots from ``dev``
in file order. Documents are numbered across subjects in sorted subject order; each subject is
one lm-eval task, and the score is the mean over subjects of the subject accuracies (not
lm-eval's item-weighted group average). Metric: ``acc``.
"""
from __future__ import annotations

from pathlib import Path

from edgebuild.bench.base import Benchmark, Converted, fixed_chance
from edgebuild.bench.data import DATA_HINT, convert_records, data_file, read_csv
from edgebuild.core.errors import DataError

LETTERS = "ABCD"


def subjects(data_dir: Path) -> list[str]:
    """Sorted subject names, from the files in ``mmlu/test``."""
    folder = Path(data_dir) / "mmlu" / "test"
    names = sorted(p.name[: -len("_test.csv")] for p in folder.glob("*_test.csv"))
    if not names:
        raise DataError(f"no MMLU test files (*_test.csv) found in {folder}", hint=DATA_HINT)
    return names


def _reader(subject: str):
    def mmlu_doc(row: list[str]) -> dict:
        question, *choices, answer = row
        return {"question": question, "subject": subject, "choices": choices,
                "answer": LETTERS.index(answer.strip())}
    return mmlu_doc


def read_split(data_dir: Path, subject: str, split: str) -> list[dict]:
    """The documents of one subject's split (``test`` or ``dev``)."""
    path = data_file(data_dir, f"mmlu/{split}/{subject}_{split}.csv")
    return convert_records(path, read_csv(path, 6), _reader(subject))


def convert(data_dir: Path) -> Converted:
    """All subjects' test documents, and their dev documents for the few-shot examples."""
    names = subjects(data_dir)
    eval_docs = [doc for name in names for doc in read_split(data_dir, name, "test")]
    fewshot = [doc for name in names for doc in read_split(data_dir, name, "dev")]
    return Converted(eval_docs, fewshot)


MMLU = Benchmark(
    name="mmlu", lm_eval_task="mmlu_{stratum}", lm_eval_yaml="mmlu/default/mmlu_{stratum}.yaml",
    kind="core", metric="acc", num_fewshot=5, convert=convert, chance_of=fixed_chance(0.25),
    strata_key="subject",
)
