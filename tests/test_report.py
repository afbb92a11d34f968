"""The Markdown report, the section list both reports share, and the templates shipped as package data."""
import re
import sys
from pathlib import Path

import pytest

from edgebuild.build import report, report_html, report_sections
from edgebuild.build.manifest import build_manifest
from edgebuild.build.templating import environment
from test_report_html import NASTY_MODEL, make_result, parse, table_with

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "build" / "templates"
DEVICE_SCORES = {"profile": "smoke", "agreement": {"tasks": {"piqa": {"same_prediction": 0.875,
                                                                      "max_loglik_diff": 3e-4,
                                                                      "max_loglik_diff_per_token": 2e-5}}},
                 "tasks": {"piqa": {"score": 0.625, "n": 8, "host_score": 0.75}}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    result = make_result(tmp_path_factory.mktemp("md"))
    manifest = build_manifest(result)
    manifest["stages"][1]["device_scores"] = DEVICE_SCORES
    return result, manifest, report.render_markdown(result, manifest)


def md_table(text: str, first_header: str) -> list:
    """The rows (lists of cells) of the Markdown table whose header starts with ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return [rows[0], *rows[2:]]


def test_markdown_keeps_every_section_in_order(built):
    _, manifest, text = built
    assert text.startswith(f"# edgebuild report: {NASTY_MODEL} → local\n")
    assert "Shipped stage: **vptq** (exit code 10" in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Benchmarks", "## Host and device scores", "## Gate verdicts", "## Search: every trial",
                        "## Not evaluated", "## Path taken"]
    assert text.rstrip().endswith(" → ".join(manifest["fallback_path"]))


def test_markdown_stage_table_has_scores_with_n(built):
    result, _, text = built
    rows = md_table(text, "stage")
    assert rows[0][:4] == ["stage", "method", "bytes", "bits/weight"] and rows[0][-1] == "verdict"
    assert [r[0] for r in rows[1:]] == ["baseline#1", "seedlm#1", "vptq#1", "vptq#2", "hyper#1"]
    hyper = dict(zip(rows[0], rows[5]))
    assert hyper["method"] == "rtn (reference method)" and hyper["verdict"] == "failed"
    piqa = result.runs[4].host["piqa"]
    assert hyper["piqa"] == f"{piqa['score']:.3f} (n=80)"


def test_markdown_benchmark_table_is_the_html_one(built):
    _, manifest, text = built
    rows = md_table(text, "benchmark")
    page = parse(report_html.render(manifest))
    html_rows = table_with(page, "benchmark")
    assert rows[0] == html_rows[0]
    for md_row, html_row in zip(rows[1:], html_rows[1:]):
        assert [c.replace(" ✗", "") for c in md_row] == html_row
    assert rows[1][4].endswith(" ✗")                  # hyper#1 failed arc_easy


def test_markdown_gates_and_device_scores(built):
    _, manifest, text = built
    assert "### vptq#1: failed" in text and "- method `vptq` knobs `{\"vector_len\": 4}`" in text
    assert "- method `rtn` knobs `{\"bits\": 2}` (reference method)" in text
    assert "- vptq facts: `{\"note\": \"<b>bold</b>\", \"relative_error\": 0.09}`" in text
    assert "- critical failure: no retry" in text
    for check in manifest["stages"][4]["gate"]["checks"]:
        assert f"- `{check['name']}` {check['verdict']}: {check['detail']}" in text
    device = md_table(text, "stage | task")
    assert device[1:] == [["seedlm#1", "piqa", "0.750", "0.625 (n=8, smoke)", "0.875", "3.00e-04", "2.00e-05"]]


def test_markdown_from_a_manifest_alone_and_pipes_escaped(built):
    _, manifest, _ = built
    manifest = dict(manifest, model="a|b")
    text = report.render_markdown(None, manifest)
    assert text.startswith("# edgebuild report: a\\|b → local\n") and "| stage | method |" not in text


def test_html_device_scores_section(built):
    _, manifest, _ = built
    page = parse(report_html.render(manifest))
    rows = table_with(page, "host score (same items)")
    assert rows[1] == ["seedlm#1", "piqa", "0.750", "0.625", "8", "0.875", "3.00e-04", "2.00e-05"]


def test_every_section_has_a_template_and_every_template_a_section():
    names = {s.name for s in report_sections.SECTIONS}
    templates = set(environment().list_templates())
    for s in report_sections.SECTIONS:
        assert {f"html/{s.name}.html.j2", f"md/{s.name}.md.j2"} & templates, s.name
    for t in templates:
        if t.startswith(("html/", "md/")) and "macros" not in t:
            assert t.split("/")[1].split(".")[0] in names, t


def test_a_section_is_a_function_and_a_template(built, monkeypatch):
    """What a new section takes: an entry in SECTIONS (a title, a function of the manifest) and a template."""
    from jinja2 import DictLoader, ChoiceLoader
    _, manifest, _ = built
    env = environment()
    monkeypatch.setattr(env, "loader", ChoiceLoader([env.loader, DictLoader(
        {"html/trials.html.j2": "<h2>{{ section.title }}</h2><p>{{ v.count }} trials of {{ m.model }}</p>"})]))
    monkeypatch.setattr(report_sections, "SECTIONS", report_sections.SECTIONS + (
        report_sections.Section("trials", "Search trials", lambda m: {"count": len(m["stages"])}),))
    page = parse(report_html.render(manifest))
    assert f"5 trials of {NASTY_MODEL}" in "".join(page.text)


def test_templates_are_package_data():
    """Every file under build/templates is matched by a package-data pattern of pyproject.toml."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    matched = {p for pattern in data["edgebuild.build"] for p in (REPO / "build").glob(pattern)}
    files = {p for p in TEMPLATES.rglob("*") if p.is_file()}
    assert files and files <= matched, sorted(map(str, files - matched))


def test_boards_of_a_labgrid_group_with_their_requests_and_the_board_lost(built):
    _, manifest, _ = built
    manifest = dict(manifest, stages=[dict(st) for st in manifest["stages"][:2]])
    manifest["stages"][0]["latency"] = dict(manifest["stages"][0]["latency"], board="pi-a", boards={
        "places": ["pi-a", "pi-b"], "items": {"pi-a": 150, "pi-b": 50},
        "lost": {"pi-b": "the agent stopped before replying to 'score' | exit status -9"}})
    manifest["stages"][1]["latency"] = dict(manifest["stages"][1]["latency"], board="pi-a", boards={
        "places": ["pi-a"], "items": {"pi-a": 200}, "lost": {}})
    rows = md_table(report.render_markdown(None, manifest), "stage | board")
    assert rows == [["stage", "board", "requests scored", "timing and memory", "lost"],
                    ["baseline#1", "pi-a", "150", "measured here", ""],
                    ["baseline#1", "pi-b", "50", "", "the agent stopped before replying to 'score' \\| exit status -9"],
                    ["seedlm#1", "pi-a", "200", "measured here", ""]]
    html = table_with(parse(report_html.render(manifest)), "requests scored")
    assert html[1:] == [["baseline#1", "pi-a", "150", "measured here", ""],
                        ["baseline#1", "pi-b", "50", "", "the agent stopped before replying to 'score' | exit status -9"],
                        ["seedlm#1", "pi-a", "200", "measured here", ""]]


def test_no_boards_section_for_one_device(built):
    _, manifest, text = built
    assert "Boards of the group" not in text and "Boards of the group" not in report_html.render(manifest)


def test_the_device_section_names_the_machine_and_says_when_it_is_emulated(built):
    result, manifest, text = built
    assert manifest["device_facts"] is None and "## Device\n" not in text     # no agent reported
    facts = {"arch": "aarch64", "platform": "Linux-6.1-aarch64-with-glibc2.36", "cpu_model": "BCM2835",
             "cores": 4, "ram_total_mb": 3796, "python": "3.11.2", "onnxruntime": "1.32.0", "numpy": None}
    emulated = dict(manifest, device_facts=facts, device_measurement="emulated")
    md = report.render_markdown(result, emulated)
    assert md_table(md, "fact | value")[1:] == [
        ["arch", "aarch64"], ["platform", "Linux-6.1-aarch64-with-glibc2.36"], ["cpu_model", "BCM2835"],
        ["cores", "4"], ["ram_total_mb", "3796"], ["python", "3.11.2"], ["onnxruntime", "1.32.0"]]
    assert "an **emulated** CPU" in md and "decode ms/token (emulated)" in md
    assert "emulated" not in md_table(text, "stage | method")[0][-2]
    html = report_html.render(emulated)
    assert table_with(parse(html), "fact")[1] == ["arch", "aarch64"] and "An emulated CPU" in html
