"""JUnit XML: one test case per gate check, failures with messages, skipped for checks that did not run."""
import xml.etree.ElementTree as ET

import pytest

from edgebuild.build.junit import junit_xml, write_junit
from test_report_html import NASTY_MODEL, make_build


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("junit")
    build_dir, manifest = make_build(tmp)
    path = write_junit(manifest, tmp / "reports" / "gates.xml")
    return manifest, ET.parse(path).getroot()


def _suite(root, name):
    return next(s for s in root.findall("testsuite") if s.get("name") == name)


def test_one_case_per_check_for_every_stage_attempt(build):
    manifest, root = build
    assert root.tag == "testsuites" and NASTY_MODEL in root.get("name")
    suites = [s.get("name") for s in root.findall("testsuite")]
    assert suites == ["baseline#1", "seedlm#1", "vptq#1", "vptq#2", "hyper#1", "build"]
    for st, suite in zip(manifest["stages"], root.findall("testsuite")):
        names = [c.get("name") for c in suite.findall("testcase")]
        assert names == [c["name"] for c in st["gate"]["checks"]]
        assert all(c.get("classname") == f"edgebuild.local.{st['stage']}" for c in suite.findall("testcase"))
        assert int(suite.get("tests")) == len(names)


def test_failures_carry_the_check_detail(build):
    manifest, root = build
    hyper = _suite(root, "hyper#1")
    failed = {c.get("name"): c.find("failure") for c in hyper.findall("testcase") if c.find("failure") is not None}
    checks = manifest["stages"][4]["gate"]["checks"]
    expected = {c["name"] for c in checks if c["verdict"] == "fail"
                or (c["group"] == "device" and c["verdict"] == "not_run")}   # its device was not reached
    assert set(failed) == expected and "critical/core_floor/arc_easy" in failed
    assert failed["device/decode_ms_per_token_p95"].get("message") == "not_run: device unreachable"
    msg = failed["critical/core_floor/arc_easy"].get("message")
    assert msg.startswith("fail: ") and "of baseline (floor 0.80)" in msg
    assert failed["kl"].get("type") == "gate.kl" and "threshold: 1.0" in failed["kl"].text
    assert int(hyper.get("failures")) == len(expected)


def test_device_checks_that_did_not_run_fail_and_inapplicable_ones_are_skipped(build):
    _, root = build
    hyper = {c.get("name"): c for c in _suite(root, "hyper#1").findall("testcase")}
    assert hyper["device/decode_ms_per_token_p95"].find("failure") is not None   # not validated on the target
    assert hyper["device/artifact_mb"].find("failure") is None and hyper["device/artifact_mb"].find("skipped") is None
    vptq2 = {c.get("name"): c for c in _suite(root, "vptq#2").findall("testcase")}
    skipped = vptq2["device/agreement"].find("skipped")                # reached, but scored no benchmarks
    assert skipped is not None and "scored no benchmarks" in skipped.get("message")


def test_passing_stage_has_no_failures_and_totals_add_up(build):
    _, root = build
    vptq2 = _suite(root, "vptq#2")
    assert vptq2.get("failures") == "0" and all(c.find("failure") is None for c in vptq2.findall("testcase"))
    for key in ("tests", "failures", "skipped"):
        assert int(root.get(key)) == sum(int(s.get(key)) for s in root.findall("testsuite"))


def test_fallback_fails_the_build_case(build):
    _, root = build
    (case,) = _suite(root, "build").findall("testcase")
    failure = case.find("failure")
    assert failure is not None and "exit code 10" in failure.get("message") and "fallback" in failure.get("message")
    assert "hyper#1:failed" in failure.text


def test_inconclusive_counts_as_a_failure_only_when_the_gate_says_so():
    check = {"name": "core/piqa", "group": "core", "verdict": "inconclusive", "value": 0.9, "threshold": 0.95,
             "ci": [0.8, 1.0], "detail": "interval reaches the threshold"}
    stage = {"stage": "seedlm", "attempt": 0, "status": "failed", "gate": {"checks": [check], "reasons": []}}
    manifest = {"model": "m", "target": "t", "exit_code": 0, "compression_level": "seedlm", "stages": [stage]}
    case = ET.fromstring(junit_xml(manifest)).find("testsuite/testcase")
    assert case.find("failure") is None and "inconclusive" in case.find("system-out").text
    stage["gate"]["reasons"] = ["core/piqa: interval reaches the threshold"]
    case = ET.fromstring(junit_xml(manifest)).find("testsuite/testcase")
    assert case.find("failure").get("message") == "inconclusive: interval reaches the threshold"


def test_skipped_stage_and_final_only(tmp_path):
    _, manifest = make_build(tmp_path, nasty=False)
    manifest["stages"].append({"stage": "extra", "attempt": 0, "status": "skipped", "gate": {},
                               "note": "its source stage did not pass"})
    root = ET.fromstring(junit_xml(manifest, final_only=True))
    assert [s.get("name") for s in root.findall("testsuite")] == ["baseline#1", "seedlm#1", "vptq#2", "hyper#1",
                                                                 "extra#1", "build"]
    skipped = _suite(root, "extra#1").find("testcase/skipped")
    assert skipped.get("message") == "its source stage did not pass"


def test_emulated_timings_are_labelled_in_manifest_junit_and_report(tmp_path):
    from edgebuild.build import report_html
    build_dir, manifest = make_build(tmp_path)
    assert manifest["device_measurement"] == "measured"
    manifest["device_measurement"] = "emulated"
    root = ET.fromstring(junit_xml(manifest))
    props = {p.get("name"): p.get("value") for p in _suite(root, "seedlm#1").find("properties")}
    assert props["device_measurement"] == "emulated"
    page = report_html.render(manifest)
    assert "latency budgets are not measurable under emulation and gate nothing" in page
    assert "Measured on target" not in page
