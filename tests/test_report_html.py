"""The HTML report: self-contained, escaped, with every table a reader needs.

``make_build`` (also used by the tracking, JUnit and package tests) runs the real manifest writer
and the real gates on a synthetic build: a retried stage, a failed stage with an unreachable device,
a fallback, and a model name full of HTML.
"""
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgebuild.build import gates, report_html, views
from edgebuild.build.config import BuildConfig
from edgebuild.core.errors import ExitCode
from edgebuild.build.manifest import write_manifest
from edgebuild.build.pipeline import BuildResult, StageRun

REPO = Path(__file__).resolve().parents[1]
NASTY_MODEL = 'tiny<script>alert("x")</script>&model'
TASKS = {"arc_easy": ("core", 0.25), "piqa": ("core", 0.5), "pubmedqa": ("expert", 1 / 3)}
MMLU_SUBJECTS = ("abstract_algebra", "anatomy", "astronomy", "virology")
BUDGETS = {"decode_ms_per_token_p95": 50.0, "prefill_ms": 500.0, "peak_rss_mb": 4096.0, "artifact_mb": 100.0}


def _items(rng, n: int, p: float) -> list:
    return [[i, int(rng.random() < p)] for i in range(n)]


def _host(seed: int, p: float, damage: int, mmlu: bool = False) -> dict:
    """Per-task results: items drawn at accuracy ``p``, then the first ``damage`` correct items flipped.
    With ``mmlu``, MMLU too: 20 items in each of ``MMLU_SUBJECTS``, scored as the runner scores strata."""
    out = {}
    tasks = {**TASKS, "mmlu": ("core", 0.25)} if mmlu else TASKS
    for j, (task, (kind, chance)) in enumerate(tasks.items()):
        items = _items(np.random.default_rng(100 + j), 80, p)
        flips = [i for i, (_, c) in enumerate(items) if c][:damage]
        for i in flips:
            items[i][1] = 0
        score = float(np.mean([c for _, c in items]))
        out[task] = {"score": score, "n": len(items), "chance": chance, "kind": kind, "items": items}
    if mmlu:
        strata = {s: {"score": float(np.mean([c for _, c in out["mmlu"]["items"][20 * k:20 * k + 20]])), "n": 20}
                  for k, s in enumerate(MMLU_SUBJECTS)}
        out["mmlu"].update(score=float(np.mean([r["score"] for r in strata.values()])), details={"strata": strata})
    return out


def _device(rng, ok: bool, scale: float) -> dict:
    if not ok:
        return {"status": "unreachable", "error": "ssh: connection refused <pi@10.0.0.7>"}
    return {"status": "ok", "prefill_ms": list(scale * (20 + rng.random(5))),
            "decode_ms_per_token": list(scale * (4 + rng.random(7))), "peak_rss_mb": 300.0 * scale}


def _stage(tmp, name, method, knobs, attempt, source, nbytes, damage, kl, device_ok=True, mmlu=False) -> StageRun:
    rng = np.random.default_rng(nbytes)
    packed = tmp / "cache" / "pack" / f"{name}{attempt}" / "weights.ebpk"
    packed.parent.mkdir(parents=True, exist_ok=True)
    packed.write_bytes(rng.bytes(nbytes))
    bits = 32.0 * nbytes / 4_000_000
    run = StageRun(name, method, knobs, attempt, source, keys={"graph": "g0"},
                   pack={"bytes": nbytes, "path": str(packed), "reference_method": method == "rtn",
                         "stats": {"bits_per_weight": bits, "bits_per_weight_all": bits, "compressed_weights": 1},
                         "facts": {method: {"relative_error": 0.01 * (damage + 1), "note": "<b>bold</b>"}}},
                   host=_host(7, 0.8, damage, mmlu), quality={"kl": kl, "top1_agreement": 1 - kl / 2, "ppl_ratio": 1 + kl},
                   device=_device(rng, device_ok, nbytes / 1e6), verify={"max_abs_diff": 1e-6})
    return run


def _gate(run: StageRun, reference: StageRun, baseline: StageRun) -> None:
    ev = gates.StageEvidence(run.stage, run.host, reference.host, baseline.host, run.quality, run.device,
                             run.pack["bytes"], BUDGETS)
    report = gates.evaluate(ev, BuildConfig().gates, seed=0)
    if run.stage == "baseline":
        checks = [c for c in report.checks if c.group == "device"]
        report = gates.GateReport("baseline", True, False, checks, [])
    run.gate = report.to_dict()
    run.status = "passed" if report.passed else "failed"


def make_result(tmp_path: Path, *, nasty: bool = True, mmlu: bool = False) -> BuildResult:
    """A synthetic build's result (its runs gated by the real gates), its files under ``tmp_path/out``:
    baseline, seedlm, vptq failed then retried and passed, hyper failed with its device unreachable."""
    out = tmp_path / "out"
    graph = out / "cache" / "graph" / "g0"
    graph.mkdir(parents=True)
    (graph / "model.onnx").write_bytes(b"onnx-graph-bytes")
    (graph / "graph.json").write_text('{"format": 1}')
    base = _stage(out, "baseline", "raw", {}, 0, None, 16000, 0, 0.0, mmlu=mmlu)
    seed = _stage(out, "seedlm", "seedlm", {"C": 8, "P": 3}, 0, "baseline", 5000, 0, 0.05, mmlu=mmlu)
    vptq1 = _stage(out, "vptq", "vptq", {"vector_len": 4}, 0, "seedlm", 3000, 8, 0.9, mmlu=mmlu)
    vptq2 = _stage(out, "vptq", "vptq", {"vector_len": 2}, 1, "seedlm", 3500, 0, 0.1, mmlu=mmlu)
    hyper = _stage(out, "hyper", "rtn", {"bits": 2}, 0, "vptq", 1200, 40, 2.5, device_ok=False, mmlu=mmlu)
    for run, ref in ((base, base), (seed, base), (vptq1, seed), (vptq2, seed), (hyper, vptq2)):
        _gate(run, ref, base)
    runs = [base, seed, vptq1, vptq2, hyper]
    tasks = list(base.host)
    return BuildResult(runs, "vptq", ExitCode.FALLBACK, 3, 9,
                       SimpleNamespace(name="local", description="bench <host> & friends"),
                       SimpleNamespace(spec=NASTY_MODEL if nasty else "tiny-random", fingerprint="f" * 64),
                       SimpleNamespace(profile="reduced", tasks=tasks, experts=["general"]),
                       out / "local")


def make_build(tmp_path: Path, *, nasty: bool = True, mmlu: bool = False):
    """Write a synthetic build to ``tmp_path/out/local`` with the real manifest code; return (dir, manifest)."""
    path = write_manifest(make_result(tmp_path, nasty=nasty, mmlu=mmlu))
    return path.parent, json.loads(path.read_text())


class Page(HTMLParser):
    """Collects tags, tables (rows of cell texts), images and every URL-bearing attribute."""

    def __init__(self):
        super().__init__()
        self.tags, self.tables, self.images, self.urls, self.text = [], [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "action", "srcset") and v]
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def table_with(page: Page, header_cell: str) -> list:
    return next(t for t in page.tables if t and header_cell in t[0])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    build_dir, manifest = make_build(tmp_path_factory.mktemp("html"))
    path = report_html.write_html_report(build_dir)
    return manifest, path, parse(path.read_text(encoding="utf-8"))


def test_report_is_self_contained_and_escaped(built):
    manifest, path, page = built
    assert path.name == "report.html" and path.parent.name == "local"
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(u.startswith("data:image/png;base64,") for u in page.urls), page.urls
    assert NASTY_MODEL in "".join(page.text)          # shown as text, never as markup
    assert "<b>bold</b>" in "".join(page.text)        # method facts escaped too
    raw = path.read_text()
    assert "<script>" not in raw and "http://" not in raw and "https://" not in raw


def test_report_embeds_four_decodable_plots(built):
    import base64
    _, path, page = built
    assert [im["alt"] for im in page.images] == ["score by stage", "quality vs compression", "retention per stage",
                                                 "latency per stage"]
    for im in page.images:
        png = base64.b64decode(im["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000 and im["alt"]
    raw = path.read_text()                     # score by stage sits under the benchmark table
    assert raw.index("<h2>Benchmarks</h2>") < raw.index('alt="score by stage"') < raw.index("<h2>Stages</h2>")


def test_benchmark_table_is_the_trackers_table(built):
    """The page's benchmark × stage table is ``views.score_table``, the table the W&B run logs."""
    manifest, path, page = built
    table = views.score_table(manifest)
    shown = table_with(page, "benchmark")
    assert shown[0] == table.header()
    assert [r[0] for r in shown[1:]] == table.benchmarks == ["arc_easy", "piqa", "pubmedqa"]
    for cells, row in zip(shown[1:], table.rows()):
        assert cells[1:] == ["—" if v is None else f"{v:.3f}" for v in row[1:]]
    assert table.passed["piqa"] == [True, True, True, False]          # hyper failed every benchmark
    assert path.read_text().count('<td class="n fail">') == 3


def test_benchmark_verdicts_follow_the_checks_about_each_benchmark():
    st = {"scores": {"mmlu": 0.3, "gsm8k": 0.1, "piqa": 0.6, "eudaimonia": 0.7},
          "gate": {"checks": [{"name": "core/piqa", "verdict": "inconclusive"},
                              {"name": "critical/mmlu+gsm8k", "verdict": "fail"},
                              {"name": "critical/eudaimonia/harm", "verdict": "pass"},
                              {"name": "kl", "verdict": "fail"}],
                   "reasons": ["critical/mmlu+gsm8k: combined drop 0.3", "kl: KL 2.0"]}}
    assert views.benchmark_verdicts(st) == {"eudaimonia": True, "gsm8k": False, "mmlu": False, "piqa": True}
    st["gate"]["reasons"].append("core/piqa: inconclusive")        # on_inconclusive = "fail" counted it
    assert views.benchmark_verdicts(st)["piqa"] is False
    st["gate"]["checks"][2]["verdict"] = "fail"
    assert views.benchmark_verdicts(st)["eudaimonia"] is False


def test_stage_and_benchmark_tables(built):
    manifest, _, page = built
    stages = table_with(page, "bits/w (compressed)")
    labels = [r[0] for r in stages[1:]]
    assert labels == ["baseline#1", "seedlm#1", "vptq#1", "vptq#2", "hyper#1"]
    header = stages[0]
    vptq2 = dict(zip(header, stages[4]))
    assert vptq2["status"] == "passed" and vptq2["bytes"] == "3,500"
    assert float(vptq2["bits/w (compressed)"]) == pytest.approx(32 * 3500 / 4e6, abs=0.01)
    assert dict(zip(header, stages[5]))["method"] == "rtn (reference method)"
    bench = table_with(page, "benchmark")
    assert bench[0] == ["benchmark", "baseline#1", "seedlm#1", "vptq#2", "hyper#1", "final retention (vptq)"]
    piqa = dict(zip(bench[0], next(r for r in bench if r[0] == "piqa")))
    ret = manifest["benchmarks"]["retention"]["piqa"]
    assert piqa["final retention (vptq)"] == f"{ret:.3f}"


def test_gate_verdicts_show_intervals_reasons_and_not_run(built):
    manifest, _, page = built
    gate_tables = [t for t in page.tables if t and t[0][:3] == ["check", "group", "verdict"]]
    assert len(gate_tables) == len(manifest["stages"])
    vptq1 = {r[0]: r for r in gate_tables[2][1:]}
    assert vptq1["core/arc_easy"][2] in ("fail", "inconclusive")
    assert vptq1["core/arc_easy"][5].startswith("[") and "," in vptq1["core/arc_easy"][5]
    hyper = {r[0]: r for r in gate_tables[4][1:]}
    assert hyper["device/prefill_ms"][2] == "not_run"
    text = "".join(page.text)
    assert all(reason in text for reason in manifest["stages"][4]["gate"]["reasons"])


def test_latency_retries_and_path(built):
    manifest, _, page = built
    lat = table_with(page, "decode ms/token p50")
    rows = {r[0]: dict(zip(lat[0], r)) for r in lat[1:]}
    assert rows["hyper#1"]["status"] == "unreachable" and "connection refused" in rows["hyper#1"]["error"]
    p50 = manifest["stages"][1]["latency"]["decode_ms_per_token_p50"]
    assert rows["seedlm#1"]["decode ms/token p50"] == f"{p50:.3f}"
    trials = [[r[1] for r in t[1:]] for t in page.tables if t and "layers kept at 8 bits" in t[0]]
    assert trials == [['{"C": 8, "P": 3}'], ['{"vector_len": 4}', '{"vector_len": 2}'], ['{"bits": 2}']]
    text = "".join(page.text)
    assert " → ".join(manifest["fallback_path"]) in text and "4 trial(s)" in text


def test_report_without_plots_still_renders(tmp_path):
    build_dir, manifest = make_build(tmp_path, nasty=False)
    page = parse(report_html.write_html_report(build_dir, plots=False).read_text())
    assert page.images == [] and len(page.tables) > 5
    assert "No plots (matplotlib unavailable or nothing to draw)." in "".join(page.text)


def test_every_section_has_its_heading_in_page_order(built):
    _, path, page = built
    raw = path.read_text()
    titles = ["Benchmarks", "Stages", "Device latency", "Host and device scores", "Gate verdicts",
              "Search: every trial", "Not evaluated", "Path taken", "Edge of chaos and eudaimonia", "Plots", "Artifacts", "Method facts"]
    positions = [raw.index(f"<h2>{t}</h2>") for t in titles]
    assert positions == sorted(positions)
    assert raw.index('class="banner warn"') < positions[0] and "exit code 10" in "".join(page.text)


def test_a_missing_manifest_is_a_usage_error(tmp_path):
    from edgebuild.core.errors import UsageError
    with pytest.raises(UsageError, match="no manifest"):
        report_html.write_html_report(tmp_path)


def chromium() -> str | None:
    """A headless Chromium on this machine, if any."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from screenshot_report import find_browser
        return find_browser()
    finally:
        sys.path.pop(0)


@pytest.mark.slow
def test_screenshot_of_the_report(built, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no headless Chromium found (apt install chromium-headless-shell, or set EDGEBUILD_CHROMIUM)")
    _, path, _ = built
    png = tmp_path / "report.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "screenshot_report.py"), str(path), str(png)],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from PIL import Image
    with Image.open(png) as im:
        assert im.width == 1280 and im.height > 1500
        assert len(set(im.convert("L").resize((64, 64)).tobytes())) > 10   # not a blank page
    assert shutil.which(browser) or Path(browser).exists()
