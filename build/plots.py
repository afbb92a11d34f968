"""Plots of a finished build, drawn from its manifest, as PNG bytes.

matplotlib is imported inside the functions and drawn through its Agg canvas directly (no pyplot,
no global backend switch). PNGs carry no software/date metadata, so the same manifest gives the
same bytes.
"""
from __future__ import annotations

import io
import logging

from edgebuild.build.views import compression_ratio, final_stages, label, score_table

log = logging.getLogger(__name__)

PASSED_COLOUR, FAILED_COLOUR = "#2b7a3d", "#b3261e"


def all_plots(manifest: dict) -> dict:
    """``{name: png bytes}`` for every plot; a plot that cannot be drawn is logged and left out."""
    out = {}
    for name, fn in PLOTS:
        try:
            out[name] = fn(manifest)
        except (ImportError, ValueError, KeyError, TypeError) as e:
            log.warning("plot %s not drawn: %s", name, e)
    return out


def score_by_stage(manifest: dict) -> bytes:
    """One panel per benchmark: its score in the last attempt of each stage (``views.ScoreTable``,
    the series the W&B run draws as line plots); hollow: the benchmark failed that stage's gate."""
    table = score_table(manifest)
    cols = min(3, max(len(table.benchmarks), 1))
    rows = max(1, -(-len(table.benchmarks) // cols))
    fig = _figure(width=3.6 * cols, height=2.8 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, benchmark in zip(axes, table.benchmarks):
        _score_panel(ax, benchmark, table.series(benchmark), table.labels)
    for ax in axes[len(table.benchmarks):]:
        ax.set_axis_off()
    if not table.benchmarks:
        axes[0].set_axis_on()
        _legend_or_note(axes[0], False, "no stage was benchmarked")
    fig.suptitle("Score by stage (hollow: the benchmark failed that stage's gate)")
    return _png(fig)


def _score_panel(ax, benchmark: str, points: list, labels: list) -> None:
    ax.plot([p[0] for p in points], [p[2] for p in points], color="C0", linewidth=1.2)
    for x, _, y, passed in points:
        colour = FAILED_COLOUR if passed is False else PASSED_COLOUR
        ax.scatter([x], [y], color=colour, facecolors="none" if passed is False else colour, zorder=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30)
    ax.set_xlim(-0.4, max(len(labels), 1) - 0.6)
    if points:
        lo, hi = min(p[2] for p in points), max(p[2] for p in points)
        pad = max(0.05, 0.15 * (hi - lo))          # a flat series is not blown up to fill the panel
        ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
    ax.set_title(benchmark, fontsize=10)
    ax.set_ylabel("score", fontsize=8)


def _figure(width=7.0, height=4.2):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _quality_series(manifest: dict) -> dict:
    """``{series name: [(ratio, value, stage label, passed)]}``: retention per task and top-1 agreement."""
    series = {}
    for st in manifest.get("stages", []):
        ratio = compression_ratio(manifest, st)
        if ratio is None:
            continue
        point = (ratio, label(st), st.get("status") == "passed")
        for task, value in sorted((st.get("retention_vs_baseline") or {}).items()):
            if value is not None:
                series.setdefault(f"{task} retention", []).append((point[0], value, *point[1:]))
        top1 = (st.get("quality") or {}).get("top1_agreement")
        if top1 is not None:
            series.setdefault("top-1 agreement", []).append((point[0], top1, *point[1:]))
    return series


def quality_vs_compression(manifest: dict) -> bytes:
    """Quality against the baseline (per-task retention, top-1 agreement) vs compression ratio.

    Every attempt is a point; failed attempts are hollow.
    """
    fig = _figure()
    ax = fig.add_subplot()
    series = _quality_series(manifest)
    markers = "osD^vP*X"
    for i, (name, pts) in enumerate(sorted(series.items())):
        m = markers[i % len(markers)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=":", alpha=0.4, color=f"C{i}")
        for x, y, _, ok in pts:
            ax.scatter([x], [y], marker=m, color=f"C{i}", facecolors=f"C{i}" if ok else "none")
        ax.scatter([], [], marker=m, color=f"C{i}", label=name)
    for k, (x, y, text, _) in enumerate(series.get("top-1 agreement", [])):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 6 + 10 * (k % 2)), fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(xlabel="compression ratio (baseline bytes / stage bytes)", ylabel="against the baseline",
           title="Quality vs compression (hollow: failed its gates)")
    _legend_or_note(ax, bool(series), "no stage has both a size and a quality measurement")
    return _png(fig)


def _legend_or_note(ax, has_data: bool, note: str) -> None:
    if has_data:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


def _thresholds(st: dict) -> dict:
    """``{task: threshold}`` of the stage's retention checks."""
    out = {}
    for c in (st.get("gate") or {}).get("checks", []):
        if c.get("group") in ("core", "expert") and c.get("threshold") is not None:
            out[c["name"].split("/", 1)[-1]] = c["threshold"]
    return out


def retention_per_stage(manifest: dict) -> bytes:
    """Grouped bars: each benchmark's retention against the baseline, per stage (last attempt)."""
    stages = [st for st in final_stages(manifest) if st["stage"] != "baseline"]
    tasks = sorted({t for st in stages for t in (st.get("scores") or {})})
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / max(len(tasks), 1)
    for j, task in enumerate(tasks):
        xs, ys = [], []
        for i, st in enumerate(stages):
            value = (st.get("retention_vs_baseline") or {}).get(task)
            x = i - 0.4 + width * (j + 0.5)
            if value is None:
                ax.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
            else:
                xs.append(x)
                ys.append(value)
            thr = _thresholds(st).get(task)
            if thr is not None:
                ax.hlines(thr, x - width / 2, x + width / 2, color="black", linewidth=1.2)
        ax.bar(xs, ys, width=width * 0.95, label=task, color=f"C{j}")
    ax.set_xticks(range(len(stages)), [label(st) for st in stages])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(ylabel="score / baseline score", title="Retention per stage (black tick: gate threshold)")
    _legend_or_note(ax, bool(tasks and stages), "no compressed stage was benchmarked")
    return _png(fig)


def latency_per_stage(manifest: dict) -> bytes:
    """Box plots of the raw device samples per stage: decode ms/token and prefill ms."""
    stages = final_stages(manifest)
    fig = _figure(width=8.0)
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "decode_ms_per_token", "decode ms/token"), (axes[1], "prefill_ms", "prefill ms")):
        data, names = [], []
        for st in stages:
            samples = ((st.get("latency") or {}).get("samples") or {}).get(key)
            names.append(label(st) if samples else f"{label(st)}\n(not measured)")
            data.append(samples or [])
        measured = [i for i, d in enumerate(data) if d]
        if measured:
            ax.boxplot([data[i] for i in measured], positions=measured, widths=0.6)
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=30)
        ax.set_xlim(-0.6, max(len(names), 1) - 0.4)
        ax.set(title=title, ylabel="ms")
        if not measured:
            ax.text(0.5, 0.5, "device not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Device latency on {manifest.get('target', '?')} (raw samples)")
    return _png(fig)


PLOTS = (("score_by_stage", score_by_stage), ("quality_vs_compression", quality_vs_compression),
         ("retention_per_stage", retention_per_stage), ("latency_per_stage", latency_per_stage))
