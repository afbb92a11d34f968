"""Golden builds: a smoke build's manifest stays the same apart from what is measured anew each run.

Two builds on tiny-random with the ``local`` target: ``golden/default.toml`` (the default config on
two benchmarks: SeedLM fails its gates and its search tries further settings) and
``golden/smoke.toml`` (every stage runs and passes). Their manifests are compared with ``golden/*.json`` after dropping what varies from run to
run: timings, memory readings, search speeds, the device-budget checks built on them, and the
content of each stage's ``runtime.json`` (it records when the stage was encoded).

When a change is meant to alter the manifest, regenerate the files and review the diff:
``EDGEBUILD_UPDATE_GOLDEN=1 pytest tests/test_golden.py``.
"""
import json
import math
import os
from pathlib import Path

import pytest

from conftest import DATA_DIR

HERE = Path(__file__).parent / "golden"
VARYING = {"latency", "seconds", "pairs_per_second", "peak_rss_mb", "rss_mb", "load_s", "score_s", "encode_s",
           "compressed_ahead",     # how many trials a cluster compressed ahead: where the work ran, not what it gave
           "device_facts"}         # the machine the device agent ran on
# runtime.json records when its stage was encoded and how long that took: its bytes and sha256 vary.
VARYING_FILES = ("/runtime/runtime.json",)
BUILDS = {"default": HERE / "default.toml", "all-stages": HERE / "smoke.toml"}


def normalise(obj):
    """``obj`` without the values that are measured anew on every run."""
    if isinstance(obj, dict):
        if str(obj.get("path", "")).endswith(VARYING_FILES):
            return {"path": obj["path"]}
        if obj.get("group") == "device" and "verdict" in obj:
            return {k: normalise(v) for k, v in obj.items() if k not in ("value", "detail")}
        return {k: normalise(v) for k, v in obj.items() if k not in VARYING}
    if isinstance(obj, list):
        return [normalise(v) for v in obj]
    return obj


def assert_same(got, want, path="manifest"):
    if isinstance(want, float) and isinstance(got, (int, float)):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), \
            f"{path}: keys {sorted(set(got) ^ set(want))} differ"
        for key in want:
            assert_same(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_smoke_build_manifest_matches_the_golden_one(name, tmp_path, monkeypatch):
    from edgebuild.build.cli import main

    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path / "home"))
    config = ["--config", str(BUILDS[name])]
    rc = main(["all", "--model", "tiny-random", "--target", "local", "--profile", "smoke", *config,
               "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "out"), "--wandb", "disabled"])
    manifest = normalise(json.loads((tmp_path / "out" / "local" / "manifest.json").read_text()))
    golden = HERE / f"{name}.json"
    if os.environ.get("EDGEBUILD_UPDATE_GOLDEN"):
        golden.write_text(json.dumps({"exit_code": rc, "manifest": manifest}, indent=1, sort_keys=True) + "\n")
    want = json.loads(golden.read_text())
    assert rc == want["exit_code"]
    assert_same(manifest, want["manifest"])
