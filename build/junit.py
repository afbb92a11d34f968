"""Gate verdicts as JUnit XML, for CI systems that show test reports.

One ``<testsuite>`` per stage attempt (``seedlm#1``), one ``<testcase>`` per gate check. A check
that fails the stage (``fail``, or ``inconclusive`` when the gates count it as a failure) is a
``<failure>`` carrying the check's detail; ``not_run`` and ``uninformative`` checks are
``<skipped>``; a skipped stage is one skipped test case. A final ``build`` suite has one case,
``every stage passed and a compressed stage shipped``, that fails on a fallback, a baseline-only
build or a shipped stage whose device checks did not run.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from edgebuild.core.errors import EXIT_CODE_HELP, ExitCode
from edgebuild.core.files import write_text_atomic

SKIPPED_VERDICTS = ("not_run", "uninformative", "skipped")


def _label(st: dict) -> str:
    return f"{st['stage']}#{st.get('attempt', 0) + 1}"


def _message(check: dict) -> str:
    detail = check.get("detail") or ""
    return f"{check.get('verdict')}: {detail}" if detail else str(check.get("verdict"))


def _is_failure(check: dict, reasons: list) -> bool:
    """A check fails the stage when its verdict is ``fail`` or the gate listed it among its reasons;
    a device check that did not run fails too: the stage is not validated on its target (a device
    check skipped by the user's ``--no-device`` is ``skipped``)."""
    if check.get("verdict") == "fail":
        return True
    if check.get("group") == "device" and check.get("verdict") == "not_run":
        return True
    return any(r == check["name"] or r.startswith(f"{check['name']}: ") for r in reasons)


def check_case(classname: str, check: dict, reasons: list) -> ET.Element:
    """The ``<testcase>`` of one gate check."""
    case = ET.Element("testcase", classname=classname, name=check["name"], time="0")
    if _is_failure(check, reasons):
        fail = ET.SubElement(case, "failure", message=_message(check), type=f"gate.{check.get('group', 'check')}")
        fail.text = _failure_text(check)
    elif check.get("verdict") in SKIPPED_VERDICTS:
        ET.SubElement(case, "skipped", message=_message(check))
    else:
        ET.SubElement(case, "system-out").text = _message(check)
    return case


def _failure_text(check: dict) -> str:
    keys = ("group", "verdict", "value", "threshold", "ci", "detail")
    return "\n".join(f"{k}: {check.get(k)}" for k in keys if check.get(k) is not None)


def stage_suite(st: dict, target: str, measurement: str | None = None) -> ET.Element:
    """The ``<testsuite>`` of one stage attempt."""
    gate = st.get("gate") or {}
    classname = f"edgebuild.{target}.{st['stage']}"
    suite = ET.Element("testsuite", name=_label(st))
    props = ET.SubElement(suite, "properties")
    for key in ("method", "status", "source", "bytes", "bits_per_weight"):
        if st.get(key) is not None:
            ET.SubElement(props, "property", name=key, value=str(st[key]))
    if measurement:
        ET.SubElement(props, "property", name="device_measurement", value=measurement)
    checks = gate.get("checks", [])
    for check in checks:
        suite.append(check_case(classname, check, gate.get("reasons", [])))
    if not checks:
        case = ET.SubElement(suite, "testcase", classname=classname, name="gates", time="0")
        ET.SubElement(case, "skipped", message=st.get("note") or f"stage {st.get('status')}: no gate checks ran")
    return _count(suite)


def build_suite(manifest: dict) -> ET.Element:
    """The one-case suite that fails unless every stage passed and a compressed stage shipped."""
    suite = ET.Element("testsuite", name="build")
    case = ET.SubElement(suite, "testcase", classname=f"edgebuild.{manifest.get('target')}",
                         name="every stage passed and a compressed stage shipped", time="0")
    code = manifest.get("exit_code")
    text = f"shipped {manifest.get('compression_level')}; exit code {code}"
    if code not in (None, 0):
        try:
            meaning = EXIT_CODE_HELP[ExitCode(code)]
        except ValueError:
            meaning = "unknown exit code"
        ET.SubElement(case, "failure", message=f"{text} ({meaning})", type="build.fallback").text = \
            " → ".join(manifest.get("fallback_path") or [])
    else:
        ET.SubElement(case, "system-out").text = text
    return _count(suite)


def _count(suite: ET.Element) -> ET.Element:
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("errors", "0")
    suite.set("skipped", str(sum(1 for c in cases if c.find("skipped") is not None)))
    suite.set("time", "0")
    return suite


def junit_tree(manifest: dict, final_only: bool = False) -> ET.Element:
    """The ``<testsuites>`` element of a build; ``final_only`` keeps only each stage's last attempt."""
    stages = manifest.get("stages", [])
    if final_only:
        stages = list({st["stage"]: st for st in stages}.values())
    root = ET.Element("testsuites", name=f"edgebuild {manifest.get('model')} → {manifest.get('target')}")
    for st in stages:
        root.append(stage_suite(st, str(manifest.get("target")), manifest.get("device_measurement")))
    root.append(build_suite(manifest))
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(sum(int(s.get(key)) for s in root.findall("testsuite"))))
    return root


def junit_xml(manifest: dict, final_only: bool = False) -> str:
    """The JUnit XML document of a build, as text."""
    root = junit_tree(manifest, final_only)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(manifest: dict, path: Path, final_only: bool = False) -> Path:
    """Write the JUnit XML of a build to ``path`` atomically; return the path."""
    return write_text_atomic(path, junit_xml(manifest, final_only))
