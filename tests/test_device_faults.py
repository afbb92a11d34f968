"""Device faults after first contact: the agent killed mid-request is reconnected and the request
sent again; a device that stays gone is recorded as lost and the build still completes."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from edgebuild.core.errors import DeviceError, ExitCode
from edgebuild.targets import transports
from edgebuild.targets.client import ConnectionLost
from edgebuild.targets.local import LocalTransport
from edgebuild.targets.session import DeviceSession, RetryPolicy

from conftest import DATA_DIR  # noqa: E402

FAST = RetryPolicy(retries=2, backoff_s=0.05)


class _Watch:
    """The agent's stdin: kills the agent when it is sent the planned request."""

    def __init__(self, inner, transport, plan: dict):
        self.inner, self.transport, self.plan = inner, transport, plan

    def write(self, line: bytes):
        cmd = json.loads(line)["cmd"]
        self.plan["sent"].append(cmd)
        if cmd == self.plan["cmd"]:
            self.plan["seen"] += 1
            if self.plan["seen"] in self.plan["at"]:
                self.transport.proc.send_signal(signal.SIGKILL)
                self.transport.proc.wait()
                self.plan["killed"] += 1
        return self.inner.write(line)

    def flush(self):
        return self.inner.flush()

    def close(self):
        return self.inner.close()


class _Dying(LocalTransport):
    def __init__(self, root, plan):
        super().__init__(root)
        self.plan = plan

    def open(self):
        stdin, stdout = super().open()
        return _Watch(stdin, self, self.plan), stdout


def _plan(cmd: str, at, gone: bool = False) -> dict:
    """Kill the agent at the ``at``-th requests ``cmd``; ``gone``: it never starts again after."""
    return {"cmd": cmd, "at": set(at), "gone": gone, "seen": 0, "killed": 0, "sent": [], "opened": 0}


@pytest.fixture
def dying(monkeypatch, tmp_path):
    """Install a plan: the ``local`` transport becomes a ``_Dying`` one following it."""
    def install(plan):
        def factory(target):
            if plan["gone"] and plan["killed"]:
                raise DeviceError("cannot start the local agent: the device is gone")
            plan["opened"] += 1
            return _Dying(tmp_path / "agent-root", plan)
        monkeypatch.setitem(transports._entries, "local", factory)
        return plan
    return install


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    pytest.importorskip("torch")
    from test_agent import export_tiny_stage
    return export_tiny_stage(tmp_path_factory.getbasetemp())[1]


def _requests(n=200):
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 256, 6).tolist() for _ in range(n // 4)]
    return [(contexts[i // 4], rng.integers(0, 256, 2).tolist()) for i in range(n)]


def _session(tmp_path):
    from edgebuild.targets import load_target
    session = DeviceSession(load_target("local"), policy=FAST)
    assert session.connect() is not None
    return session


def _deploy(session, stage):
    from edgebuild.targets.client import deploy_stage
    session.attempt("upload", lambda c: deploy_stage(c, session.transport, "raw", "v1", stage))
    session.attempt("load", lambda c: c.load("raw", "v1", threads=1))


def test_an_agent_killed_mid_score_is_reconnected_and_only_unanswered_batches_are_sent_again(
        dying, stage, tmp_path, caplog):
    requests = _requests()
    plan = dying(_plan("score", at=[]))
    session = _session(tmp_path)
    _deploy(session, stage)
    clean = session.client.score(requests)
    batches = plan["seen"]
    assert batches >= 3
    plan.update(at={batches + 2}, sent=[])                 # the second batch of the next run dies
    with caplog.at_level(logging.WARNING):
        again = session.attempt("score", lambda c: c.score(requests))
    session.close()
    assert again == clean and plan["killed"] == 1 and session.reconnects == 1
    assert plan["sent"].count("score") == batches + 1, "answered batches are not sent again"
    assert plan["sent"][2:4] == ["hello", "load"], "the new agent is greeted and loads the stage again"
    (line,) = [r.getMessage() for r in caplog.records if "reconnecting" in r.getMessage()]
    assert "lost during score" in line and "the agent stopped before replying to 'score'" in line


def test_a_timing_is_repeated_after_the_agent_dies_during_it(dying, stage, tmp_path):
    plan = dying(_plan("time", at=[1]))
    session = _session(tmp_path)
    _deploy(session, stage)
    timing = session.attempt("time", lambda c: c.time(prompt_len=4, decode_tokens=2, warmup=0, repeats=2))
    session.close()
    assert len(timing["prefill_ms"]) == 2 and plan["killed"] == 1 and plan["seen"] == 2


def test_a_device_that_stays_gone_is_lost_once_then_probed_once_per_stage(dying, stage, tmp_path):
    plan = dying(_plan("load", at=[1], gone=True))
    session = _session(tmp_path)
    with pytest.raises(ConnectionLost):
        _deploy(session, stage)
    assert session.lost["after"] == "load" and session.client is None
    assert "the agent stopped before replying to 'load'" in session.lost["error"]
    opened = plan["opened"]
    assert session.connect() is None                        # the next stage: one quick attempt
    assert session.state.startswith("lost during load") and "not reachable again" in session.state
    plan["gone"] = False                                    # the device comes back
    assert session.connect() is not None and session.lost is None and plan["opened"] == opened + 1
    session.close()


def test_an_upload_lost_with_the_agent_is_done_again_after_the_reconnect(dying, stage, tmp_path):
    plan = dying(_plan("stage", at=[1]))
    session = _session(tmp_path)
    _deploy(session, stage)
    info = session.client.info()
    session.close()
    assert plan["killed"] == 1 and plan["sent"].count("stage") == 2
    assert info["stages"] and session.reconnects == 1


# --- a whole build --------------------------------------------------------------------------------

CONFIG = """[build]
stages = ["baseline", "rtn"]
tasks = ["arc_easy"]
eudaimonia = false
profile = "smoke"
device_profile = "smoke"
"""


def _spec(tmp_path) -> Path:
    from edgebuild.targets.spec import load_target
    text = load_target("local").source.read_text()
    path = tmp_path / "faulty.toml"
    path.write_text(text.replace('name = "local"', 'name = "faulty"')
                    + "retries = 2\nbackoff_s = 0.05\n")
    return path


@pytest.fixture(scope="module")
def lost_build(tmp_path_factory):
    """A build whose agent dies at the baseline's first score request and never comes back."""
    if not DATA_DIR.is_dir():
        pytest.skip("benchmark data not found")
    pytest.importorskip("torch")
    from edgebuild.build.cli import main
    tmp = tmp_path_factory.mktemp("lost")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEBUILD_HOME", str(tmp / "home"))
    plan = _plan("score", at=[1], gone=True)
    mp.setitem(transports._entries, "local", lambda target: _gone_or(plan, tmp))
    (tmp / "build.toml").write_text(CONFIG)
    try:
        code = main(["all", "--model", "tiny-random", "--target", str(_spec(tmp)), "--config", str(tmp / "build.toml"),
                     "--data-dir", str(DATA_DIR), "--out", str(tmp / "out"), "--wandb", "disabled", "--json"])
    finally:
        mp.undo()
    return code, tmp, plan


def _gone_or(plan, tmp):
    if plan["gone"] and plan["killed"]:
        raise DeviceError("cannot start the local agent: the device is gone")
    return _Dying(tmp / "agent-root", plan)


def test_a_build_whose_device_dies_mid_score_completes_with_its_records_and_exits_13(lost_build, capfd):
    code, tmp, plan = lost_build
    assert code == ExitCode.DEVICE_INCOMPLETE and plan["killed"] == 1
    manifest = json.loads((tmp / "out" / "faulty" / "manifest.json").read_text())
    assert (tmp / "out" / "faulty" / "report.md").is_file()
    base, rtn = manifest["stages"][0], manifest["stages"][-1]
    assert base["latency"]["status"] == "lost" and rtn["latency"]["status"] == "unreachable"
    assert "lost during score" in rtn["latency"]["error"] and "not reachable again" in rtn["latency"]["error"]
    assert manifest["device_checks"].startswith("not run")
    assert not list((tmp / "out" / "cache" / "device").glob("*/_done.json")), "a lost result is never cached"


def test_the_lost_record_keeps_what_was_measured(lost_build):
    from edgebuild.build.pipeline import BuildRequest  # noqa: F401  (the records above come from it)
    code, tmp, plan = lost_build
    manifest = json.loads((tmp / "out" / "faulty" / "manifest.json").read_text())
    checks = {c["name"]: c for c in manifest["stages"][0]["gate"]["checks"] if c["group"] == "device"}
    measured = {n: c for n, c in checks.items() if n != "device/artifact_mb"}   # artifact_mb needs no device
    assert measured and all(c["verdict"] == "not_run" for c in measured.values())
    assert all(c["detail"] == "device lost during score" for c in measured.values()), measured
    partial = manifest["stages"][0]["latency"]
    assert partial["status"] == "lost" and partial.get("after") == "score"


def test_the_next_build_with_the_device_back_measures_every_stage(lost_build, monkeypatch, tmp_path):
    from edgebuild.build.cli import main
    code, tmp, _ = lost_build
    shutil.copytree(tmp / "out", tmp_path / "out")
    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp / "home"))
    plan = _plan("score", at=[2])                   # dies once, comes back
    monkeypatch.setitem(transports._entries, "local", lambda target: _gone_or(plan, tmp_path))
    code = main(["all", "--model", "tiny-random", "--target", str(_spec(tmp)), "--config", str(tmp / "build.toml"),
                 "--data-dir", str(DATA_DIR), "--out", str(tmp_path / "out"), "--wandb", "disabled"])
    assert code in (ExitCode.OK, ExitCode.FALLBACK, ExitCode.BASELINE_ONLY) and plan["killed"] == 1
    manifest = json.loads((tmp_path / "out" / "faulty" / "manifest.json").read_text())
    assert all(s["latency"]["measured"] for s in manifest["stages"])
    assert os.path.isfile(tmp_path / "out" / "faulty" / "report.md")
