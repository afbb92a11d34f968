"""The build report as one self-contained HTML file: ``<out>/<target>/report.html``.

Everything comes from the manifest. Plots are embedded as ``data:`` URIs, the CSS is inline, and the
page makes no external request; every value taken from the manifest is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

from edgebuild.core.errors import EXIT_CODE_HELP, ExitCode, UsageError
from edgebuild.core.files import write_text_atomic
from edgebuild.build.plots import compression_ratio, final_stages, label

log = logging.getLogger(__name__)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n, th.n { text-align: right; }
.pass { color: #1a6b2f; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.inconclusive { color: #9a6700; font-weight: 600; } .uninformative, .not_run, .skipped { color: #6e6e73; }
.passed { background: #eef8f0; } .failed { background: #fdeeee; }
.banner { padding: .6em 1em; border-radius: 6px; margin: 1em 0; }
.banner.ok { background: #eef8f0; border: 1px solid #9bd3a8; }
.banner.warn { background: #fff6e0; border: 1px solid #e6c36a; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
code { font-size: 12px; background: #f6f6f6; padding: 0 3px; } .muted { color: #6e6e73; }
"""


def e(value) -> str:
    """HTML-escaped text of any value (None as an em dash)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def num(value, spec: str = ".3f") -> str:
    """A formatted number, or an em dash."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return e(value)
    return e(format(value, spec))


def tag(name: str, body: str, cls: str = "") -> str:
    """``<name class=...>body</name>``; ``body`` must already be HTML."""
    attr = f' class="{e(cls)}"' if cls else ""
    return f"<{name}{attr}>{body}</{name}>"


def table(header: list, rows: list, numeric=(), row_classes: list | None = None) -> str:
    """A table of already-escaped cells; the columns whose index is in ``numeric`` are right-aligned."""
    def cells(kind, row):
        return "".join(tag(kind, c, "n" if i in numeric else "") for i, c in enumerate(row))
    body = [tag("tr", cells("td", r), (row_classes or [""] * len(rows))[i]) for i, r in enumerate(rows)]
    return tag("table", tag("thead", tag("tr", cells("th", [e(h) for h in header]))) + tag("tbody", "".join(body)))


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">'


def render(manifest: dict, plots: dict | None = None) -> str:
    """The whole report page for a manifest; ``plots`` maps a name to PNG bytes."""
    title = f"edgebuild report: {manifest.get('model')} → {manifest.get('target')}"
    parts = [tag("h1", e(title)), _banner(manifest), _summary(manifest),
             tag("h2", "Benchmarks"), _benchmarks(manifest),
             tag("h2", "Stages"), _stages(manifest),
             tag("h2", "Device latency"), _latency(manifest),
             tag("h2", "Host and device scores"), _device_scores(manifest),
             tag("h2", "Gate verdicts"), _gates(manifest),
             tag("h2", "Retries and knobs"), _retries(manifest),
             tag("h2", "Path taken"), _path(manifest),
             tag("h2", "Edge of chaos and eudaimonia"), _extra_sections(manifest),
             tag("h2", "Plots"), _plots(plots or {}),
             tag("h2", "Artifacts"), _artifacts(manifest), _method_facts(manifest)]
    head = f'<meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style>'
    return f"<!DOCTYPE html>\n<html lang=\"en\"><head>{head}</head><body>{''.join(parts)}</body></html>\n"


def _banner(m: dict) -> str:
    code = m.get("exit_code")
    try:
        meaning = EXIT_CODE_HELP[ExitCode(code)]
    except (ValueError, TypeError):
        meaning = "unknown exit code"
    ok = code == 0 and m.get("ready_for_edge_deployment")
    text = (f"Shipped stage: <b>{e(m.get('compression_level'))}</b> — exit code {e(code)} ({e(meaning)}). "
            f"Ready for edge deployment: <b>{e(m.get('ready_for_edge_deployment'))}</b>.")
    return tag("div", text, "banner ok" if ok else "banner warn")


def _summary(m: dict) -> str:
    rows = [("model", e(m.get("model"))), ("model fingerprint", tag("code", e(m.get("model_fingerprint")))),
            ("target", e(m.get("target"))),
            ("hardware", e((m.get("recommended_hardware") or {}).get("description"))),
            ("shipped size", f"{num(m.get('size_bytes'), ',')} bytes ({num(m.get('size_mb'), '.2f')} MB)"),
            ("original size", f"{num(m.get('original_size_bytes'), ',')} bytes "
                              f"({num(m.get('original_size_mb'), '.2f')} MB)"),
            ("compression ratio", f"{num(m.get('compression_ratio'), '.2f')}×"),
            ("bits per weight (compressed tensors)", num(m.get("bits_per_weight"), ".2f")),
            ("profile / tasks", f"{e(m.get('profile'))} / {e(', '.join(m.get('tasks') or []))}"),
            ("edgebuild version", e(m.get("edgebuild_version")))]
    return table(["", "value"], [[e(k), v] for k, v in rows])


def _benchmarks(m: dict) -> str:
    stages = final_stages(m)
    tasks = sorted({t for st in stages for t in (st.get("scores") or {})})
    shipped = next((st for st in stages if st["stage"] == m.get("compression_level")), {})
    header = ["benchmark", *(label(st) for st in stages), f"final retention ({m.get('compression_level')})"]
    rows = []
    for t in tasks:
        scores = [num((st.get("scores") or {}).get(t)) for st in stages]
        rows.append([e(t), *scores, num((shipped.get("retention_vs_baseline") or {}).get(t))])
    note = tag("p", "Scores on the profile's fixed sample; retention is score / baseline score.", "muted")
    return table(header, rows, numeric=range(1, len(header))) + note


def _stages(m: dict) -> str:
    header = ["stage", "method", "source", "status", "bytes", "MB", "ratio", "bits/w (compressed)",
              "bits/w (all)", "KL", "top-1", "export max |Δ|", "note"]
    rows, classes = [], []
    for st in m.get("stages", []):
        method = e(st.get("method")) + (" <i>(reference method)</i>" if st.get("reference_method") else "")
        q, x = st.get("quality") or {}, st.get("export_check") or {}
        rows.append([e(label(st)), method, e(st.get("source")), tag("span", e(st.get("status")), _status_class(st)),
                     num(st.get("bytes"), ","), num(st.get("size_mb"), ".2f"),
                     num(compression_ratio(m, st), ".2f"), num(st.get("bits_per_weight"), ".2f"),
                     num(st.get("bits_per_weight_all"), ".2f"), num(q.get("kl"), ".4f"),
                     num(q.get("top1_agreement"), ".3f"), num(x.get("max_abs_diff"), ".2e"), e(st.get("note") or "")])
        classes.append(st.get("status") if st.get("status") in ("passed", "failed") else "")
    return table(header, rows, numeric=range(4, 12), row_classes=classes)


def _status_class(st: dict) -> str:
    return {"passed": "pass", "failed": "fail"}.get(st.get("status"), "skipped")


def _latency(m: dict) -> str:
    header = ["stage", "status", "prefill ms p50", "decode ms/token p50", "decode ms/token p95", "tokens/s",
              "peak RSS MB", "samples", "error"]
    rows = []
    for st in m.get("stages", []):
        lat = st.get("latency") or {}
        n = len((lat.get("samples") or {}).get("decode_ms_per_token") or [])
        status = "measured" if lat.get("measured") else lat.get("status", "not run")
        rows.append([e(label(st)), e(status), num(lat.get("prefill_ms_p50"), ".2f"),
                     num(lat.get("decode_ms_per_token_p50"), ".3f"), num(lat.get("decode_ms_per_token_p95"), ".3f"),
                     num(lat.get("decode_tokens_per_s"), ".1f"), num(lat.get("peak_rss_mb"), ".1f"), e(n or None),
                     e(lat.get("error") or "")])
    return table(header, rows, numeric=range(2, 8)) + tag("p", f"Measured on target {e(m.get('target'))}; "
                                                  "statistics computed on the host from raw samples.", "muted")


def _device_scores(m: dict) -> str:
    """Each stage's host and device scores side by side, with their agreement."""
    header = ["stage", "task", "host score (same items)", "device score", "n", "same prediction", "max log-lik diff"]
    rows = []
    for st in m.get("stages", []):
        dev = st.get("device_scores") or {}
        agree = (dev.get("agreement") or {}).get("tasks") or {}
        for task, d in (dev.get("tasks") or {}).items():
            a = agree.get(task, {})
            rows.append([e(label(st)), e(task), num(d.get("host_score")), num(d.get("score")),
                         e(d.get("n")), num(a.get("same_prediction")), num(a.get("max_loglik_diff"), ".2e")])
    if not rows:
        return tag("p", "The device scored no benchmarks in this build.", "muted")
    return table(header, rows, numeric=range(2, 7)) + tag(
        "p", "Device scores come from the agent on the target (onnxruntime), on the first items of the "
        "host's seeded sample; agreement is over the items both scored.", "muted")


def _ci(ci) -> str:
    return f"[{num(ci[0])}, {num(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "—"


def _gates(m: dict) -> str:
    out = []
    for st in m.get("stages", []):
        gate = st.get("gate") or {}
        out.append(tag("h3", f"{e(label(st))}: " + tag("span", e(st.get("status")), _status_class(st))))
        checks = gate.get("checks", [])
        if not checks:
            out.append(tag("p", e(st.get("note") or "no gate checks ran"), "muted"))
            continue
        rows = [[e(c.get("name")), e(c.get("group")), tag("span", e(c.get("verdict")), c.get("verdict", "")),
                 num(c.get("value")), num(c.get("threshold")), _ci(c.get("ci")), e(c.get("detail"))]
                for c in checks]
        out.append(table(["check", "group", "verdict", "value", "threshold", "confidence interval", "detail"],
                         rows, numeric=(3, 4, 5)))
        if gate.get("reasons"):
            out.append(tag("ul", "".join(tag("li", e(r)) for r in gate["reasons"])))
        if gate.get("critical"):
            out.append(tag("p", "Critical failure: no retry.", "fail"))
    return "".join(out)


def _retries(m: dict) -> str:
    qg = m.get("quality_gates") or {}
    rows = [[e(label(st)), e(st.get("method")), tag("code", e(json.dumps(st.get("knobs") or {}, sort_keys=True))),
             tag("span", e(st.get("status")), _status_class(st)), e(st.get("note") or "")]
            for st in m.get("stages", []) if st["stage"] != "baseline"]
    intro = tag("p", f"Retries: {e(qg.get('retries', 0))}. A failed attempt is retried with the knobs the "
                     "method recommends; the knobs below are those each attempt ran with.")
    return intro + table(["attempt", "method", "knobs", "status", "note"], rows)


def _path(m: dict) -> str:
    steps = " → ".join(tag("code", e(p)) for p in m.get("fallback_path") or [])
    return tag("p", steps or "—") + tag("p", f"Shipped: <b>{e(m.get('compression_level'))}</b>.")


def _extra_sections(m: dict) -> str:
    out = []
    for key, title in (("edge_of_chaos", "Edge of chaos"), ("eudaimonia", "Eudaimonia")):
        section = m.get(key) or {}
        if section.get("measured") is False:
            out.append(tag("p", f"{title}: not measured ({e(section.get('reason', ''))})."))
            continue
        rows = [[e(k), e(json.dumps(v, sort_keys=True, default=str))] for k, v in sorted(section.items())]
        out.append(tag("h3", title) + table(["key", "value"], rows))
    return "".join(out)


def _plots(plots: dict) -> str:
    if not plots:
        return tag("p", "No plots (matplotlib unavailable or nothing to draw).", "muted")
    return "".join(tag("figure", img(png, name.replace("_", " "))) for name, png in plots.items())


def _artifacts(m: dict) -> str:
    shipped = m.get("compression_level")
    rows = [[e(a.get("path")), num(a.get("bytes"), ","), tag("code", e(a.get("sha256")))]
            for a in (m.get("artifacts") or {}).get(shipped, [])]
    return table(["file (shipped stage)", "bytes", "sha256"], rows, numeric=(1,))


def _method_facts(m: dict) -> str:
    items = []
    for st in m.get("stages", []):
        facts = st.get("method_facts") or {}
        if facts:
            text = json.dumps(facts, sort_keys=True, indent=1, default=str)
            items.append(tag("h3", e(label(st))) + tag("pre", e(text)))
    if not items:
        return ""
    return tag("h2", "Method facts") + tag("details", tag("summary", "recorded by each method") + "".join(items))


def write_html_report(build_dir: Path, *, plots: bool = True) -> Path:
    """Render ``<build_dir>/manifest.json`` to ``<build_dir>/report.html`` (atomically); return its path."""
    build_dir = Path(build_dir)
    manifest_path = build_dir / "manifest.json"
    if not manifest_path.is_file():
        raise UsageError(f"no manifest at {manifest_path}", hint="run `edgebuild all` first")
    manifest = json.loads(manifest_path.read_text())
    pngs = {}
    if plots:
        from edgebuild.build.plots import all_plots
        pngs = all_plots(manifest)
    path = build_dir / "report.html"
    return write_text_atomic(path, render(manifest, pngs))
