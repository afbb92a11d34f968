"""The build report as one self-contained HTML file: ``<out>/<target>/report.html``.

Everything comes from the manifest, rendered through ``templates/report.html.j2`` and one template
per section (``report_sections.SECTIONS``). Plots are embedded as ``data:`` URIs, the CSS is
inline, and the page makes no external request; the templates are autoescaped, so every value
taken from the manifest shows as text.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from edgebuild.build.report_sections import sections
from edgebuild.build.templating import render as render_template
from edgebuild.core.errors import UsageError
from edgebuild.core.files import write_text_atomic

log = logging.getLogger(__name__)


def title(manifest: dict) -> str:
    return f"edgebuild report: {manifest.get('model')} → {manifest.get('target')}"


def render(manifest: dict, plots: dict | None = None) -> str:
    """The whole report page for a manifest; ``plots`` maps a name to PNG bytes (``plots.all_plots``)."""
    return render_template("report.html.j2", title=title(manifest), m=manifest, plots=plots or {},
                           summary=None, sections=sections("html", manifest))


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
    return write_text_atomic(build_dir / "report.html", render(manifest, pngs))
