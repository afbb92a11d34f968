"""The per-stage table printed at the end of a build, and its JSON form."""
from __future__ import annotations

import sys

import numpy as np

from edgebuild.build.manifest import latency
from edgebuild.core.steps import NOT_GATED


def _tasks(result) -> list:
    names = []
    for run in result.runs:
        for t in run.host:
            if t not in names:
                names.append(t)
    return names


def _baseline(result):
    return next((r for r in result.runs if r.stage == "baseline"), None)


def row(run, base, tasks) -> dict:
    stats = run.pack.get("stats", {})
    lat = latency(run.device)
    cells = {}
    for t in tasks:
        r = run.host.get(t)
        if r is None:
            cells[t] = None
            continue
        b = base.host.get(t, {}).get("score") if base else None
        cells[t] = {"score": r["score"], "n": r["n"], "retention": (r["score"] / b) if b else None}
    return {"stage": run.stage, "attempt": run.attempt + 1, "method": run.method,
            "reference_method": run.pack.get("reference_method", False), "knobs": run.knobs,
            "bytes": run.pack.get("bytes"), "runtime_bytes": (run.pack.get("runtime") or {}).get("bytes"),
            "bits_per_weight": bits_per_weight(stats),
            "tasks": cells, "kl": (run.quality or {}).get("kl"),
            "decode_ms_per_token_p50": lat.get("decode_ms_per_token_p50"), "stage_rss_mb": lat.get("stage_rss_mb"),
            "prefill_ms_p50": lat.get("prefill_ms_p50"), "device": (run.device or {}).get("status"),
            "status": run.status, "note": run.note, "reasons": (run.gate or {}).get("reasons", [])}


def bits_per_weight(stats: dict):
    """Bits per compressed weight; for a stage that compresses nothing, bits per stored weight."""
    if not stats:
        return None
    return stats.get("bits_per_weight") if stats.get("compressed_weights") else stats.get("bits_per_weight_all")


def as_dict(result, manifest_path=None) -> dict:
    base, tasks = _baseline(result), _tasks(result)
    return {"shipped": None if result.partial else result.shipped,
            "exit_code": 0 if result.partial else int(result.exit_code),
            "manifest": str(manifest_path) if manifest_path else None,
            "cache": {"hits": result.cache_hits, "misses": result.cache_misses},
            "stages": [row(r, base, tasks) for r in result.runs]}


def _fmt(v, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def print_table(result, manifest_path=None) -> None:
    """Two tables, each readable at a CI log's width: one row per stage attempt (size, KL, device
    figures, verdict), then one row per benchmark with a column per attempt; then each attempt's
    note and gate reasons, the shipped stage and the manifest."""
    data = as_dict(result, manifest_path)
    console = _console()
    console.print(stage_table(data, f"edgebuild: {result.model_ref.spec} → {result.target.name}"))
    console.print(task_table(data, _tasks(result)))
    for r in data["stages"]:
        note = [r["note"]] if r["note"] and r["note"] != NOT_GATED else []
        for line in note + r["reasons"]:
            console.print(f"  {r['stage']}#{r['attempt']}: {line}", highlight=False)
    work = _work(result)
    if result.partial:
        console.print(f"partial build (no gates, nothing shipped); {work}")
    else:
        console.print(f"shipped: [bold]{result.shipped}[/bold] (exit code {int(result.exit_code)}); {work}")
    if manifest_path:
        console.print(f"manifest: {manifest_path}", highlight=False)


def _console():
    from rich.console import Console
    return Console(width=None if sys.stdout.isatty() else 200)


def stage_table(data: dict, title: str):
    """One row per stage attempt: sizes, bits per weight, KL, device figures and verdict."""
    from rich.table import Table
    table = Table(title=title)
    for col in ["stage", "method", "MB", "runtime MB", "bits/w", "KL", "decode ms/tok", "prefill ms", "RSS MB",
                "verdict"]:
        table.add_column(col, justify="left" if col in ("stage", "method", "verdict") else "right")
    for r in data["stages"]:
        method = r["method"] + (" (reference)" if r["reference_method"] else "")
        runtime_mb = r["runtime_bytes"] / 1e6 if r["runtime_bytes"] else None
        table.add_row(_label(r), method, _fmt((r["bytes"] or 0) / 1e6, ".1f"), _fmt(runtime_mb, ".1f"),
                      _fmt(r["bits_per_weight"], ".2f"), _fmt(r["kl"], ".3f"),
                      _fmt(r["decode_ms_per_token_p50"], ".1f"), _fmt(r["prefill_ms_p50"], ".0f"),
                      _fmt(r["stage_rss_mb"], ".0f"), _verdict(r))
    return table


def task_table(data: dict, tasks: list):
    """One row per benchmark, one column per stage attempt: score and its ratio to the baseline's
    (— where the attempt did not run the benchmark, e.g. it stopped early)."""
    from rich.table import Table
    table = Table(title="host benchmarks: score (of baseline)")
    table.add_column("benchmark", justify="left")
    for r in data["stages"]:
        table.add_column(_label(r), justify="right")
    for t in tasks:
        table.add_row(t, *[_task_cell(r["tasks"].get(t)) for r in data["stages"]])
    return table


def _label(r) -> str:
    return f"{r['stage']}#{r['attempt']}"


def _work(result) -> str:
    """The steps the build ran and reused, and the trials it compressed ahead as tasks."""
    ahead = sum(s["compressed"] for s in (getattr(result, "compressed_ahead", None) or {}).values())
    if result.cache_misses == 0 and not ahead:
        return "did no work (every step was cached)"
    tasks = f", compressed {ahead} trial(s) ahead as tasks" if ahead else ""
    return f"ran {result.cache_misses} step(s){tasks}, reused {result.cache_hits}"


def _task_cell(c) -> str:
    if c is None:
        return "—"
    ret = f" ({c['retention'] * 100:.0f}%)" if c["retention"] is not None else ""
    return f"{c['score']:.3f}{ret}"


def _verdict(r) -> str:
    if r["note"] == NOT_GATED:
        return "built"
    dev = "" if r["device"] in (None, "ok") else f", device {r['device']}"
    return f"{r['status']}{dev}"


def benchmark_rows(result, confidence: float = 0.95) -> list[dict]:
    """The baseline's benchmarks, core first: name, kind, metric, score, n, the ``confidence``
    bootstrap interval of the mean (``[lo, hi]``; None for fewer than two items) and chance."""
    from edgebuild.bench.stats import mean_interval
    base = _baseline(result)
    order = {"core": 0, "expert": 1}
    rows = sorted((base.host if base else {}).items(), key=lambda kv: (order.get(kv[1].get("kind"), 2), kv[0]))
    out = []
    for task, r in rows:
        values = [c for _, c in r.get("items", [])]
        lo, hi = mean_interval(values, confidence) if len(values) > 1 else (None, None)
        out.append({"benchmark": task, "kind": r.get("kind"), "metric": r.get("metric"), "score": r.get("score"),
                    "n": r.get("n", len(values)), "interval": [_num(lo), _num(hi)], "confidence": confidence,
                    "chance": r.get("chance")})
    return out


def _num(v):
    return None if v is None else float(v)


def print_benchmarks(result, confidence: float = 0.95, unavailable: dict | None = None) -> None:
    """One row per benchmark of the baseline: kind, metric, score, n, bootstrap interval, chance;
    then one row per benchmark that could not run (``unavailable``: name -> reason)."""
    from rich.table import Table

    table = Table(title=f"benchmarks: {result.model_ref.spec} (profile {result.config.profile})")
    for col in ("benchmark", "kind", "metric", "score", "n", f"{confidence:.0%} interval", "chance"):
        table.add_column(col, justify="left" if col in ("benchmark", "kind", "metric") else "right")
    for r in benchmark_rows(result, confidence):
        lo, hi = r["interval"]
        table.add_row(r["benchmark"], str(r["kind"] or ""), str(r["metric"] or ""), _fmt(r["score"], ".4f"),
                      str(r["n"]), f"[{_fmt(lo, '.3f')}, {_fmt(hi, '.3f')}]", _fmt(r["chance"], ".3f"))
    console = _console()
    console.print(table)
    for name, reason in (unavailable or {}).items():
        console.print(f"{name}: unavailable: {reason}", markup=False, highlight=False)
