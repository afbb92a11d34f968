"""The Ray executor: benchmark shards of a stage as Ray tasks on a local Ray instance with two
workers, recording the same results and manifest (apart from timings) as the local executor; a
missing ``ray`` package or an unreachable cluster is a one-line error naming the fix."""
import json
import sys
import time

import pytest

from edgebuild.build.cli import main
from edgebuild.core.errors import ConfigError, ExitCode, HostError
from edgebuild.core.executors import LocalExecutor, make

from conftest import DATA_DIR  # noqa: E402
from test_golden import assert_same, normalise  # noqa: E402


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _square(x, offset):
    return x * x + offset


def test_local_executor_runs_in_order_and_reports_progress():
    seen = []
    assert LocalExecutor().map(_square, [(1, 0), (2, 1), (3, 2)], progress=lambda d, t: seen.append((d, t))) \
        == [1, 5, 11]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ConfigError):
        make("local", "10.0.0.1:6379")
    with pytest.raises(ConfigError, match="did you mean 'ray'"):
        make("rey")


def test_missing_ray_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(HostError) as err:
        make("ray")
    assert "edgebuild[ray]" in err.value.one_line() and err.value.exit_code == ExitCode.HOST


def test_unreachable_ray_address_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("ray")
    started = time.monotonic()
    code = main(["bench", "--model", "tiny-random", "--tasks", "piqa", "--profile", "smoke", "--executor", "ray",
                 "--ray-address", "127.0.0.1:9", "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == ExitCode.HOST and len(err) == 1, err
    assert "127.0.0.1:9" in err[0] and "ray start --head" in err[0]
    assert time.monotonic() - started < 60


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_a_task_error_is_the_error_the_local_run_raises(local_ray, tmp_path):
    from edgebuild.core.data import check_data_dir
    from edgebuild.core.errors import DataError
    calls = [(tmp_path / "missing",)]
    with pytest.raises(DataError) as local:
        make("local").map(check_data_dir, calls)
    with pytest.raises(DataError) as remote:
        make("ray").map(check_data_dir, calls)
    assert remote.value.one_line() == local.value.one_line()
    assert remote.value.exit_code == ExitCode.DATA


def _build(tmp_path, name, *extra):
    config = tmp_path / "c.toml"
    config.write_text("[build]\nstages = ['baseline', 'rtn']\ntasks = ['arc_easy', 'piqa']\neudaimonia = false\n")
    out = tmp_path / name
    code = main(["all", "--model", "tiny-random", "--profile", "smoke", "--config", str(config), "--no-device",
                 "--wandb", "disabled", "--data-dir", str(DATA_DIR), "--out", str(out), *extra])
    assert code in (ExitCode.OK, ExitCode.FALLBACK, ExitCode.BASELINE_ONLY)
    return json.loads((out / "local" / "manifest.json").read_text())


@pytest.mark.slow                    # two smoke builds and a Ray start: minutes on two cores
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_ray_shards_give_the_local_manifest(tmp_path, local_ray, capsys):
    started = time.monotonic()
    local = _build(tmp_path, "local")
    local_s = time.monotonic() - started
    remote = _build(tmp_path, "ray", "--executor", "ray")
    ray_s = time.monotonic() - started - local_s
    err = capsys.readouterr().err
    assert "2 benchmarks as shards" in err          # the host step ran as Ray tasks
    assert_same(normalise(remote), normalise(local))
    assert remote["stages"][0]["scores"] and remote["torch_device"] == "cpu"
    print(f"local {local_s:.1f}s, ray {ray_s:.1f}s")


def _targets_build(tmp_path, name, *extra):
    config = tmp_path / "b.toml"
    config.write_text("[build]\nstages = ['baseline']\ntasks = ['piqa']\neudaimonia = false\n")
    out = tmp_path / name
    code = main(["all", "--model", "tiny-random", "--target", "local,rpi5", "--profile", "smoke", "--config",
                 str(config), "--no-device", "--wandb", "disabled", "--data-dir", str(DATA_DIR), "--out", str(out),
                 *extra])
    assert code in (ExitCode.OK, ExitCode.BASELINE_ONLY)
    return {t: json.loads((out / t / "manifest.json").read_text()) for t in ("local", "rpi5")}


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_builds_of_several_targets_as_ray_tasks(tmp_path, local_ray, capsys):
    started = time.monotonic()
    local = _targets_build(tmp_path, "local")
    local_s = time.monotonic() - started
    remote = _targets_build(tmp_path, "ray", "--executor", "ray")
    ray_s = time.monotonic() - started - local_s
    assert "[start] build 2 targets" in capsys.readouterr().err
    assert_same(normalise(remote), normalise(local))
    assert remote["rpi5"]["target"] == "rpi5" and remote["local"]["target"] == "local"
    print(f"two targets: local {local_s:.1f}s, ray {ray_s:.1f}s")
