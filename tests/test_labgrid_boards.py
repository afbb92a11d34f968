"""A labgrid lab of two emulated Raspberry Pi 4 boards: a local coordinator and exporter, both
boards provisioned through their places, device requests sharded across them (scores equal to one
board's), and a board lost mid-run whose requests are re-run on the other.

Needs root, qemu-user-static, debootstrap and labgrid (``make test-emulated``).
"""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest

from edgebuild.build.cli import main
from edgebuild.targets import emulate
from edgebuild.targets.spec import load_target

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-aarch64-static") is None
                       or shutil.which("debootstrap") is None,
                       reason="emulated boards need root, qemu-user-static and debootstrap"),
]
pytest.importorskip("labgrid", reason="labgrid not installed (pip install edgebuild[lab])")

from edgebuild.targets.labgrid import connect_group  # noqa: E402
from test_labgrid import LocalLab  # noqa: E402

BOARDS = {"pi-a": "rpi4-emu-lab-a", "pi-b": "rpi4-emu-lab-b"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lab")
    with contextlib.ExitStack() as stack:
        runs = {place: stack.enter_context(emulate.running("rpi4", name))
                for place, name in BOARDS.items()}
        known_hosts = folder / "known_hosts"
        known_hosts.write_text("".join(emulate.BoardFiles(emulate.edgebuild_home(), n).known_hosts
                                       .read_text() for n in BOARDS.values()))
        services = {place: (run.address, "pi", 22) for place, run in runs.items()}
        tags = {place: {"target": BOARDS["pi-a"], "shelf": "emu"} for place in BOARDS}
        running = LocalLab(folder, services, tags)
        stack.callback(running.stop)
        env = {"LG_COORDINATOR": running.address, "EDGEBUILD_LAB_KNOWN_HOSTS": str(known_hosts)}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        stack.callback(lambda: [os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                                for k, v in old.items()])
        for place in BOARDS:
            assert main(["device", "setup", "--target", f"labgrid:{place}"]) == 0
        yield running, runs


def _requests(count: int, contexts: int = 24) -> list:
    import numpy as np
    rng = np.random.default_rng(11)
    ctx = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(3, 20, contexts)]
    return [(ctx[i % contexts], rng.integers(0, 256, 1 + i % 3).tolist()) for i in range(count)]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    pytest.importorskip("torch")
    from test_agent import export_tiny_stage
    return export_tiny_stage(tmp_path_factory.getbasetemp())[1]


def test_two_boards_share_the_requests_and_score_as_one(lab, stage):
    running, _runs = lab
    requests = _requests(400)
    with connect_group(load_target("labgrid:shelf=emu")) as pool:
        assert pool.boards == ["pi-a", "pi-b"]
        assert running.holder("pi-a") and running.holder("pi-b")
        pool.deploy("raw", "v1", stage)
        pool.load("raw", "v1", threads=1)
        sharded = pool.score(requests)
        items = dict(pool.last.items)
        one = pool.clients["pi-a"].score(requests)
        info = pool.info()
    print(f"\nitems per board: {items}; merged == one board: {sharded == one}")
    assert sharded == one
    assert items["pi-a"] > 0 and items["pi-b"] > 0 and sum(items.values()) == 400
    assert {i["arch"] for i in info["boards"].values()} == {"aarch64"}
    assert running.holder("pi-a") is None and running.holder("pi-b") is None


BUILD = """[build]
stages = ["baseline", "rtn"]
tasks = ["arc_easy"]
eudaimonia = false
profile = "quick"
device_profile = "quick"
"""


def _build(tmp_path, target: str):
    """``edgebuild all`` of tiny-random on ``target``: exit code and manifest."""
    import json
    from conftest import DATA_DIR
    config = tmp_path / "build.toml"
    config.write_text(BUILD)
    out = tmp_path / target.replace(":", "-").replace("=", "-")
    code = main(["all", "--model", "tiny-random", "--target", target, "--config", str(config),
                 "--data-dir", str(DATA_DIR), "--out", str(out), "--wandb", "disabled"])
    return code, json.loads(next(out.glob("*/manifest.json")).read_text())


def test_a_build_on_the_two_boards_scores_as_one_board(lab, tmp_path):
    """Before the test that stops board b."""
    running, _runs = lab
    one_code, one = _build(tmp_path, "labgrid:pi-a")
    code, group = _build(tmp_path, "labgrid:shelf=emu")
    items = [s["latency"]["boards"]["items"] for s in group["stages"]]
    print(f"\nrequests per board, per stage: {items}")
    assert code == one_code and group["device_facts"]["arch"] == "aarch64"
    assert [s["device_scores"] for s in group["stages"]] == [s["device_scores"] for s in one["stages"]]
    assert all(s["latency"]["boards"]["places"] == ["pi-a", "pi-b"] for s in group["stages"])
    assert all(n > 0 for stage in items for n in stage.values())
    assert running.holder("pi-a") is None and running.holder("pi-b") is None


def test_a_board_lost_mid_run_is_named_and_its_requests_rerun(lab, stage):
    running, runs = lab
    requests = _requests(400)
    stopped = []

    def lose_b(done, total):
        """After the first batch: stop board b (its sshd, agent and network vanish)."""
        if not stopped:
            stopped.append(emulate.stop(BOARDS["pi-b"]))

    with connect_group(load_target("labgrid:shelf=emu")) as pool:
        pool.deploy("raw", "v1", stage)
        pool.load("raw", "v1", threads=1)
        one = pool.clients["pi-a"].score(requests)
        sharded = pool.score(requests, progress=lose_b)
        items, lost = dict(pool.last.items), dict(pool.lost)
    print(f"\nitems per board: {items}; lost: {lost}")
    assert stopped == [True]
    assert sharded == one
    assert list(lost) == ["pi-b"] and sum(items.values()) == 400 and items["pi-a"] > items["pi-b"]
    assert running.holder("pi-b") is None

