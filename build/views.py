"""What the reports and the W&B run show of a build, computed from its manifest in one place.

The benchmark × stage table (each benchmark's score in the last attempt of every stage, and its
gate verdict there) and the score-by-stage series drawn from it are built here once; the HTML and
Markdown reports render them through their templates, ``plots`` draws them, and ``tracking`` logs
them as a ``wandb.Table`` and one ``wandb.plot.line`` per benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BAD_VERDICTS = ("fail",)


def final_stages(manifest: dict) -> list:
    """The last attempt of each stage, in build order."""
    last = {}
    for st in manifest.get("stages", []):
        last[st["stage"]] = st
    return list(last.values())


def label(st: dict) -> str:
    """``stage#attempt`` (attempts counted from 1), as the tables print it."""
    return f"{st['stage']}#{st.get('attempt', 0) + 1}"


def compression_ratio(manifest: dict, st: dict):
    """Baseline bytes over this stage's bytes, or None when either is unknown."""
    base = manifest.get("original_size_bytes")
    return base / st["bytes"] if base and st.get("bytes") else None


def checked_benchmarks(check: dict, tasks) -> set:
    """The benchmarks among ``tasks`` a gate check is about: ``core/piqa`` and
    ``critical/core_floor/piqa`` are about piqa, ``critical/mmlu+gsm8k`` about both, the
    eudaimonia rules (``critical/eudaimonia/<rule>``) about the eudaimonia benchmark."""
    parts = check.get("name", "").split("/")
    named = {t for t in parts[-1].split("+") if t in tasks}
    if len(parts) > 2 and parts[1] == "eudaimonia" and "eudaimonia" in tasks:
        named.add("eudaimonia")
    return named


def counts_against(check: dict, gate: dict) -> bool:
    """Whether the check failed its stage: a ``fail``, or an ``inconclusive`` the gate counted as
    one (``gates.on_inconclusive = "fail"``; such a check is then among the gate's reasons)."""
    if check.get("verdict") in BAD_VERDICTS:
        return True
    reasons = {r.split(": ", 1)[0] for r in gate.get("reasons") or []}
    return check.get("verdict") == "inconclusive" and check.get("name") in reasons


def benchmark_verdicts(st: dict) -> dict:
    """``{benchmark: passed}`` for each benchmark a stage scored: False when a gate check about the
    benchmark (retention, critical floor, eudaimonia, edge band) failed the stage."""
    tasks = set(st.get("scores") or {})
    gate = st.get("gate") or {}
    out = {t: True for t in sorted(tasks)}
    for check in gate.get("checks", []):
        if counts_against(check, gate):
            out.update({t: False for t in checked_benchmarks(check, tasks)})
    return out


@dataclass
class ScoreTable:
    """Benchmark × stage: each benchmark's score in the last attempt of every stage."""

    stages: list                                   # the last attempt of each stage (manifest dicts)
    shipped: str | None
    benchmarks: list = field(default_factory=list)
    scores: dict = field(default_factory=dict)     # {benchmark: [score or None, one per stage]}
    passed: dict = field(default_factory=dict)     # {benchmark: [True/False or None, one per stage]}
    retention: dict = field(default_factory=dict)  # {benchmark: the shipped stage's retention}

    @property
    def labels(self) -> list:
        return [label(st) for st in self.stages]

    def header(self) -> list:
        return ["benchmark", *self.labels, f"final retention ({self.shipped})"]

    def rows(self) -> list:
        """One row per benchmark, as ``header()`` names the columns (numbers, or None)."""
        return [[b, *self.scores[b], self.retention.get(b)] for b in self.benchmarks]

    def series(self, benchmark: str) -> list:
        """``[(stage index, stage label, score, passed)]`` of the stages that scored ``benchmark``."""
        points = zip(range(len(self.stages)), self.labels, self.scores[benchmark], self.passed[benchmark])
        return [p for p in points if p[2] is not None]


def score_table(manifest: dict) -> ScoreTable:
    """The benchmark × stage table of a build (stages in build order, benchmarks sorted)."""
    stages = final_stages(manifest)
    shipped_name = manifest.get("compression_level")
    shipped = next((st for st in stages if st["stage"] == shipped_name), {})
    table = ScoreTable(stages, shipped_name)
    table.benchmarks = sorted({t for st in stages for t in (st.get("scores") or {})})
    verdicts = [benchmark_verdicts(st) for st in stages]
    for b in table.benchmarks:
        table.scores[b] = [(st.get("scores") or {}).get(b) for st in stages]
        table.passed[b] = [v.get(b) for v in verdicts]
        table.retention[b] = (shipped.get("retention_vs_baseline") or {}).get(b)
    return table
