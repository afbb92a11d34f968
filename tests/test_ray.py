"""The Ray executor: benchmark shards of a stage and a stage's next search trials as Ray tasks on a
local Ray instance with two workers, recording the same results and manifest (apart from timings)
as the local executor; a missing ``ray`` package or an unreachable cluster is a one-line error
naming the fix."""
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


def _note(seen, word):
    seen.append(word)
    return word


def test_a_local_call_runs_when_its_result_is_asked_for_after_the_calls_it_waits_for(tmp_path):
    from edgebuild.core.data import check_data_dir
    from edgebuild.core.errors import DataError
    seen, executor = [], LocalExecutor()
    first = executor.submit(_note, (seen, "first"))
    second = executor.submit(_note, (seen, "second"), after=[first])
    assert seen == [] and executor.capacity() == 1
    assert second.result() == "second" and first.result() == "first" and seen == ["first", "second"]
    failed = executor.submit(check_data_dir, (tmp_path / "missing",))
    with pytest.raises(DataError):
        executor.submit(_note, (seen, "after a failure"), after=[failed]).result()
    assert seen == ["first", "second"]


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_a_trial_packed_as_a_task_lands_under_the_builds_key_or_not_at_all(tmp_path):
    from edgebuild.bench.quality import TextSets
    from edgebuild.build import ladder
    from edgebuild.build.config import load_config
    from edgebuild.compress.pack_task import pack_job, run_pack
    from edgebuild.compress.step import PackStep
    from edgebuild.core import accel, models
    from edgebuild.core.cache import StepCache
    from edgebuild.core.steps import BuildContext
    cfg = load_config(None, device=False)
    ctx = BuildContext(config=cfg, ref=models.resolve("tiny-random"), target=None, data_dir=None, out=tmp_path,
                       cache=StepCache(tmp_path / "cache"), progress=None, torch_device=accel.TorchDevice("cpu"),
                       texts=TextSets(DATA_DIR, cfg.calibration_texts, cfg.seed))
    run = ladder.trial_run("seedlm", cfg.stage_config("seedlm"), 0, None, {"knobs": {}, "fallback_layers": None})
    key = PackStep().key(ctx, run)
    with pytest.raises(HostError, match="another cache key"):
        run_pack(pack_job(ctx, run, "a key of another edgebuild"))
    assert not ctx.cache.has("pack", key) and not (tmp_path / "cache" / "pack").exists()
    assert run_pack(pack_job(ctx, run, key)) == key and ctx.cache.get("pack", key) is not None


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


def test_a_ray_call_starts_once_the_calls_it_waits_for_are_done(local_ray, tmp_path):
    import os
    import subprocess
    from edgebuild.core.data import check_data_dir
    from edgebuild.core.errors import DataError
    executor = make("ray")                       # tasks run stdlib functions: the workers import no test
    assert executor.capacity() == 2
    first = executor.submit(subprocess.run, (["sh", "-c", f"sleep 1 && touch {tmp_path / 'first'}"],))
    second = executor.submit(os.path.exists, (str(tmp_path / "first"),), after=[first])
    assert second.result() is True and first.result().returncode == 0
    failed = executor.submit(check_data_dir, (tmp_path / "missing",))
    with pytest.raises(DataError):
        executor.submit(subprocess.run, (["touch", str(tmp_path / "third")],), after=[failed]).result()
    assert not (tmp_path / "third").exists()


SEARCH = """[build]
stages = ["baseline", "rtn"]
tasks = ["piqa"]
eudaimonia = false
max_trials = 4

[stage.rtn]
fallback_layers = [1]

[gates]
kl_max = { rtn = 1e-9 }
"""


def _search_build(tmp_path, out, *extra):
    """A build whose rtn stage fails its KL gate at every trial: four trials, two of them fallbacks."""
    config = tmp_path / "search.toml"
    config.write_text(SEARCH)
    code = main(["all", "--model", "tiny-random", "--profile", "smoke", "--config", str(config), "--no-device",
                 "--wandb", "disabled", "--data-dir", str(DATA_DIR), "--out", str(out), *extra])
    assert code == ExitCode.BASELINE_ONLY
    return json.loads((out / "local" / "manifest.json").read_text())


def _trial_packs(out) -> dict:
    """``{cache entry: sha256 of its packed weights}`` of the rtn trials."""
    entries = (out / "cache" / "pack").iterdir()
    records = {e: json.loads((e / "record.json").read_text()) for e in entries if not e.name.startswith(".")}
    return {e.name: r["sha256"] for e, r in records.items() if r["method"] == "rtn"}


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_search_trials_compressed_as_ray_tasks_give_the_local_manifest(tmp_path, local_ray, capsys):
    from edgebuild.core.cache import remove_tree
    out = tmp_path / "out"
    local = _search_build(tmp_path, out)
    local_err, packs = capsys.readouterr().err, _trial_packs(out)
    assert len(packs) == 4 and local_err.count("[done] compress rtn (rtn)") == 2
    for name in packs:                   # every other step of the build stays cached: only the
        remove_tree(out / "cache" / "pack" / name)          # trials' compression runs again
    remote = _search_build(tmp_path, out, "--executor", "ray")
    shown = capsys.readouterr()
    assert _trial_packs(out) == packs                       # the same bytes, compressed by the tasks
    assert "[done] compress rtn" not in shown.err and shown.err.count("[done] rtn: attempt") == 4
    assert "compressed 4 trial(s) ahead as tasks" in shown.out
    assert "4 trial(s) compressed ahead as tasks on the cluster, 4 of them used" in \
        (out / "local" / "report.md").read_text()
    assert local["compressed_ahead"] == {} and remote["compressed_ahead"] == {"rtn": {"compressed": 4, "used": 4}}
    assert remote["fallback_path"] == local["fallback_path"] and len(remote["search"]["rtn"]) == 4
    assert_same(normalise(remote), normalise(local))


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
