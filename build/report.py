"""Human-readable build report (Markdown), written next to the manifest.

Rendered through ``templates/report.md.j2`` and the Markdown template of each section of
``report_sections.SECTIONS`` (the sections report.html shows, less the plots); the stage table at
the top is the one the build prints (``summary.as_dict``).
"""
from __future__ import annotations

import json
from pathlib import Path

from edgebuild.build.report_sections import sections
from edgebuild.build.summary import as_dict
from edgebuild.build.templating import render
from edgebuild.core.files import write_text_atomic


def write_reports(result, manifest_path: Path) -> Path:
    manifest = json.loads(Path(manifest_path).read_text())
    path = result.out_dir / "report.md"
    return write_text_atomic(path, render_markdown(result, manifest))


def render_markdown(result, manifest: dict) -> str:
    """The Markdown report of a build (``result`` None: from the manifest alone, without the stage table)."""
    summary = as_dict(result) if result is not None else None
    return render("report.md.j2", m=manifest, summary=summary, plots={}, sections=sections("md", manifest))
