"""The names and values of a build's W&B run, computed from manifest entries (``tracking`` logs them).

Names, per stage attempt (one step each, in build order; a retried stage logs each attempt)::

    {stage}/{benchmark}             score on the benchmark
    {stage}/passed/{benchmark}      1 when no gate check about the benchmark failed the stage, else 0
    {stage}/retention/{benchmark}, {stage}/degradation/{benchmark}   score / baseline, 1 - that
    {stage}/passed, {stage}/attempt, {stage}/num_failed_checks, {stage}/size_mb,
    {stage}/bits_per_weight, {stage}/kl, {stage}/top1_agreement, {stage}/latency/...,
    {stage}/edge_of_chaos/..., {stage}/eudaimonia/...        when measured

and once, at the end (the shipped stage's numbers; also in the run's summary)::

    expert/{expert}                 score on each expert benchmark
    mmlu/{subject}                  MMLU score per subject (when the build ran MMLU)
    benchmark_by_stage              wandb.Table, benchmark × stage (views.ScoreTable, as report.html)
    score_by_stage/{benchmark}      wandb.plot.line of the benchmark's score by stage
    stage_comparison                wandb.Table, one row per stage attempt
    plots/{name}                    the report's plots, as images
    model_size_mb, compression_ratio, bits_per_weight, overall_passed, num_failed_benchmarks, exit_code
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from edgebuild.build.views import (benchmark_verdicts, compression_ratio, counts_against, final_stages, label,
                                   score_table)

LATENCY_KEYS = ("decode_ms_per_token_p50", "decode_ms_per_token_p95", "prefill_ms_p50", "decode_tokens_per_s",
                "peak_rss_mb")


# -- the names of one stage attempt ------------------------------------------------------------------
def stage_metrics(st: dict, manifest: dict | None = None) -> dict:
    """The metrics of one stage attempt (a manifest stage entry), named ``{stage}/...``."""
    s, out = st["stage"], {}
    verdicts = benchmark_verdicts(st)
    for task, score in sorted((st.get("scores") or {}).items()):
        out[f"{s}/{task}"] = score
        out[f"{s}/passed/{task}"] = int(verdicts[task])
        ret = (st.get("retention_vs_baseline") or {}).get(task)
        if ret is not None:
            out[f"{s}/retention/{task}"] = ret
            out[f"{s}/degradation/{task}"] = 1.0 - ret
    for key in ("edge_of_chaos", "eudaimonia"):
        section = _measured(manifest or {}, st, key)
        if section:
            _flatten(f"{s}/{key}", section, out)
    out.update(_stage_facts(st))
    return out


def _flatten(prefix: str, obj, out: dict) -> None:
    """Numbers (booleans as 0/1) of nested dicts and short lists under ``prefix/key/...``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(obj, (list, tuple)) and len(obj) <= 8:
        for i, v in enumerate(obj):
            _flatten(f"{prefix}/{i}", v, out)
    elif isinstance(obj, bool):
        out[prefix] = int(obj)
    elif isinstance(obj, (int, float)):
        out[prefix] = obj


def _measured(manifest: dict, st: dict, key: str):
    """A stage's ``edge_of_chaos``/``eudaimonia`` section; the build-level one belongs to the shipped stage."""
    section = st.get(key)
    unmeasured = not isinstance(section, dict) or section.get("measured") is False
    if unmeasured and st["stage"] == manifest.get("compression_level"):
        section = manifest.get(key)
    if not isinstance(section, dict) or section.get("measured") is False:
        return None
    return {k: v for k, v in section.items() if k != "measured"}


def _stage_facts(st: dict) -> dict:
    s, quality, lat = st["stage"], st.get("quality") or {}, st.get("latency") or {}
    size = st.get("size_mb") if st.get("bytes") is not None else None     # a skipped stage has no artifact
    facts = {f"{s}/size_mb": size, f"{s}/bits_per_weight": st.get("bits_per_weight"),
             f"{s}/kl": quality.get("kl"), f"{s}/top1_agreement": quality.get("top1_agreement"),
             f"{s}/passed": int(st.get("status") == "passed"), f"{s}/attempt": st.get("attempt", 0) + 1,
             f"{s}/num_failed_checks": len(_failed_checks(st))}
    facts.update({f"{s}/latency/{k}": lat.get(k) for k in LATENCY_KEYS})
    return {k: v for k, v in facts.items() if v is not None}


def _failed_checks(st: dict) -> list:
    gate = st.get("gate") or {}
    return [c for c in gate.get("checks", []) if counts_against(c, gate)]


# -- the names of the whole build ----------------------------------------------------------------------
def failed_benchmarks(manifest: dict) -> set:
    """Benchmarks that failed a gate check in the last attempt of any stage."""
    return {t for st in final_stages(manifest) for t, ok in benchmark_verdicts(st).items() if not ok}


def build_metrics(manifest: dict, subjects: dict | None = None) -> dict:
    """Build-level numbers, ``expert/{expert}`` and ``mmlu/{subject}`` (``subjects``: ``{subject:
    score}`` of the shipped stage; the manifest does not keep them)."""
    top = {"model_size_mb": manifest.get("size_mb"), "compression_ratio": manifest.get("compression_ratio"),
           "bits_per_weight": manifest.get("bits_per_weight"), "exit_code": manifest.get("exit_code"),
           "overall_passed": bool((manifest.get("quality_gates") or {}).get("passed")),
           "num_failed_benchmarks": len(failed_benchmarks(manifest))}
    out = {k: v for k, v in top.items() if v is not None}
    out.update({f"expert/{t}": r["score"] for t, r in sorted((manifest.get("expert_benchmarks") or {}).items())})
    out.update({f"mmlu/{s}": score for s, score in sorted((subjects or {}).items())})
    return out


def metrics(manifest: dict) -> dict:
    """Every scalar of a build: each stage (last attempt) and the build-level ones."""
    out = {}
    for st in final_stages(manifest):
        out.update(stage_metrics(st, manifest))
    out.update(build_metrics(manifest))
    return out


def mmlu_subjects(host: dict) -> dict:
    """``{subject: score}`` from a stage's host results (``bench.runner`` keeps them per stratum)."""
    strata = ((host.get("mmlu") or {}).get("details") or {}).get("strata") or {}
    return {s: r["score"] for s, r in strata.items()}


def stage_table(manifest: dict) -> tuple:
    """``(columns, rows)``: one row per stage attempt, for a side-by-side comparison."""
    tasks = score_table(manifest).benchmarks
    columns = ["stage", "attempt", "method", "reference_method", "source", "knobs", "status", "note", "bytes",
               "size_mb", "bits_per_weight", "compression_ratio", "kl", "top1_agreement", *LATENCY_KEYS,
               "failed_checks", *(f"score/{t}" for t in tasks), *(f"retention/{t}" for t in tasks)]
    return columns, [_table_row(manifest, st, tasks) for st in manifest.get("stages", [])]


def _table_row(manifest: dict, st: dict, tasks: list) -> list:
    quality, lat = st.get("quality") or {}, st.get("latency") or {}
    failed = "; ".join(c["name"] for c in _failed_checks(st))
    return [st["stage"], st.get("attempt", 0) + 1, st.get("method"), bool(st.get("reference_method")),
            st.get("source") or "", json.dumps(st.get("knobs") or {}, sort_keys=True), st.get("status"),
            st.get("note") or "", st.get("bytes"), st.get("size_mb"), st.get("bits_per_weight"),
            compression_ratio(manifest, st), quality.get("kl"), quality.get("top1_agreement"),
            *(lat.get(k) for k in LATENCY_KEYS), failed,
            *((st.get("scores") or {}).get(t) for t in tasks),
            *((st.get("retention_vs_baseline") or {}).get(t) for t in tasks)]


def run_config(manifest: dict) -> dict:
    """The run's config: what was built, for whom, how."""
    keys = ("model", "model_fingerprint", "target", "profile", "tasks", "compression_level", "edgebuild_version")
    cfg = {k: manifest.get(k) for k in keys}
    cfg["stages"] = {label(st): {"method": st.get("method"), "knobs": st.get("knobs"), "source": st.get("source")}
                     for st in manifest.get("stages", [])}
    return cfg


def artifact_name(kind: str, manifest: dict) -> str:
    """A wandb-legal artifact name: ``{kind}-{model}-{target}``."""
    raw = f"{kind}-{Path(str(manifest.get('model', 'model'))).name}-{manifest.get('target', 'target')}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)
