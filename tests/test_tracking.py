"""W&B tracking: an offline run read back from its .wandb file, and a wandb that fails never fails a build."""
import json
import logging
import struct
import zlib
from pathlib import Path

import pytest

from edgebuild.build import tracking
from edgebuild.build.package import build_package
from edgebuild.build.plots import final_stages
from edgebuild.build.report_html import write_html_report
from test_report_html import make_build

BLOCK = 32 * 1024


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (a LevelDB-style log: 7-byte header, 32 KiB blocks, CRC32)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc
        buf += payload
        if kind in (1, 4):                        # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: Path) -> dict:
    """History values, summary values, artifacts and config of an offline run."""
    (wandb_file,) = run_dir.glob("run-*.wandb")
    history, summary, artifacts, config = {}, {}, [], {}
    for rec in wandb_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.update({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "artifact":
            artifacts.append((rec.artifact.type, rec.artifact.name, [e.path for e in rec.artifact.manifest.contents]))
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    return {"history": history, "summary": summary, "artifacts": artifacts, "config": config}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """Keep wandb's own folders (settings, artifact staging) inside the test's tmp dir."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("track")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(tmp / "wandb-home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_DIR"):
        mp.delenv(var, raising=False)
    build_dir, manifest = make_build(tmp)
    write_html_report(build_dir, plots=False)
    pkg = build_package(build_dir)
    run_dir = tracking.log_build(build_dir / "manifest.json", package_path=pkg)
    mp.undo()
    return build_dir, manifest, run_dir, read_run(run_dir)


def test_offline_run_lives_under_the_build_dir(logged):
    build_dir, _, run_dir, _ = logged
    assert run_dir.parent == build_dir / "wandb" and run_dir.name.startswith("offline-run-")


def test_every_stage_metric_is_logged_with_its_value(logged):
    _, manifest, _, run = logged
    history, summary = run["history"], run["summary"]
    kinds = {"arc_easy": "core", "piqa": "core", "pubmedqa": "expert"}
    checked = 0
    for st in final_stages(manifest):
        s = st["stage"]
        for task, score in st["scores"].items():
            assert history[f"{s}/{kinds[task]}/{task}"] == pytest.approx(score)
            assert summary[f"{s}/{kinds[task]}/{task}"] == pytest.approx(score)
            ret = st["retention_vs_baseline"][task]
            assert history[f"{s}/retention/{task}"] == pytest.approx(ret)
            assert history[f"{s}/degradation/{task}"] == pytest.approx(1 - ret)
            checked += 1
        assert history[f"{s}/size_mb"] == pytest.approx(st["size_mb"])
        assert history[f"{s}/passed"] == int(st["status"] == "passed")
    assert checked == 4 * 3
    assert "vptq/core/pubmedqa" not in history and "vptq/expert/pubmedqa" in history
    assert "hyper/latency/decode_ms_per_token_p50" not in history          # hyper's device was unreachable
    assert history["vptq/latency/decode_ms_per_token_p50"] == pytest.approx(
        final_stages(manifest)[2]["latency"]["decode_ms_per_token_p50"])


def test_build_level_metrics(logged):
    _, manifest, _, run = logged
    h = run["history"]
    assert h["model_size_mb"] == pytest.approx(manifest["size_mb"])
    assert h["compression_ratio"] == pytest.approx(manifest["compression_ratio"])
    assert h["overall_passed"] is True                   # the shipped stage (vptq) passed
    assert h["num_failed_benchmarks"] == 3               # hyper failed all three benchmarks
    assert h["exit_code"] == 10
    assert run["config"]["target"] == "local" and run["config"]["compression_level"] == "vptq"


def test_table_plot_and_artifacts(logged):
    _, manifest, run_dir, run = logged
    h = run["history"]
    assert h["stage_comparison/_type"] == "table-file"
    (table_file,) = (run_dir / "files").rglob("stage_comparison_*.table.json")
    table = json.loads(table_file.read_text())
    stage_col = table["columns"].index("stage")
    assert [r[stage_col] for r in table["data"]] == [s["stage"] for s in manifest["stages"]]
    assert table["data"][3][table["columns"].index("knobs")] == '{"vector_len": 2}'
    assert h["plots/quality_vs_compression/_type"] == "image-file"
    assert len(list((run_dir / "files").rglob("quality_vs_compression_*.png"))) == 1
    types = {t: paths for t, _, paths in run["artifacts"]}
    assert sorted(types["build-manifest"]) == ["manifest.json", "report.html"]
    (pkg_file,) = types["package"]
    assert pkg_file.startswith("edgebuild-") and pkg_file.endswith("-vptq-local.tar.gz")


def test_edge_of_chaos_and_eudaimonia_metrics_when_measured(tmp_path):
    _, manifest = make_build(tmp_path)
    manifest["edge_of_chaos"] = {"measured": True,
                                 "arc_easy": {"accuracy": 0.75, "band": "edge", "n": 80, "ci": [0.66, 0.84]}}
    manifest["stages"][1]["eudaimonia"] = {"rules": {"honesty": 0.9, "care": 0.6}, "passed": True}
    m = tracking.metrics(manifest)
    assert m["vptq/edge_of_chaos/arc_easy/accuracy"] == 0.75 and m["vptq/edge_of_chaos/arc_easy/n"] == 80
    assert m["vptq/edge_of_chaos/arc_easy/ci/1"] == 0.84
    assert not any(k.endswith("/band") for k in m)
    assert m["seedlm/eudaimonia/rules/honesty"] == 0.9 and m["seedlm/eudaimonia/passed"] == 1
    assert not any("edge_of_chaos" in k for k in tracking.metrics(make_build(tmp_path / "b")[1]))


def test_a_skipped_stage_logs_only_its_status(tmp_path):
    _, manifest = make_build(tmp_path, nasty=False)
    manifest["stages"].append({"stage": "extra", "attempt": 0, "status": "skipped", "bytes": None, "size_mb": 0.0,
                               "scores": {}, "gate": {}, "latency": {"measured": False, "status": "not run"}})
    m = tracking.metrics(manifest)
    assert {k: v for k, v in m.items() if k.startswith("extra/")} == {"extra/passed": 0, "extra/num_failed_checks": 0}
    columns, rows = tracking.stage_table(manifest)
    assert len(rows) == 6 and all(len(r) == len(columns) for r in rows)


def test_a_failing_wandb_never_fails_the_build(tmp_path, wandb_env, monkeypatch, caplog):
    import wandb
    build_dir, _ = make_build(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("wandb service crashed")
    monkeypatch.setattr(wandb, "init", boom)
    with caplog.at_level(logging.WARNING, logger="edgebuild.build.tracking"):
        assert tracking.log_build(build_dir / "manifest.json") is None
    assert "wandb service crashed" in caplog.text


def test_an_error_after_init_still_finishes_the_run(tmp_path, wandb_env, monkeypatch, caplog):
    import wandb
    build_dir, _ = make_build(tmp_path)
    finished = []
    real_init = wandb.init

    def init(*a, **k):
        run = real_init(*a, **k)
        real_finish = run.finish
        monkeypatch.setattr(run, "finish", lambda *x, **y: (finished.append(1), real_finish())[1])
        monkeypatch.setattr(run, "log", lambda *x, **y: (_ for _ in ()).throw(ValueError("bad payload")))
        return run
    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level(logging.WARNING, logger="edgebuild.build.tracking"):
        assert tracking.log_build(build_dir / "manifest.json", plots=False) is None
    assert finished == [1] and "bad payload" in caplog.text


def test_mode_follows_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.resolve_mode() == "online" and tracking.resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    build_dir, _ = make_build(tmp_path)
    assert tracking.log_build(build_dir / "manifest.json") is None
    assert not (build_dir / "wandb").exists()


def test_a_missing_manifest_is_a_warning_not_an_error(tmp_path, wandb_env, caplog):
    with caplog.at_level(logging.WARNING, logger="edgebuild.build.tracking"):
        assert tracking.log_build(tmp_path / "nope" / "manifest.json") is None
    assert "manifest.json" in caplog.text
