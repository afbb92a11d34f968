"""Lab boards through labgrid: selectors, a real coordinator and exporter on 127.0.0.1 (places,
exclusive locks, reservations), release on exit/error/Ctrl-C, and device requests sharded across
boards (here: local agents standing in for the boards; emulated boards: test_labgrid_boards.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgebuild.core.errors import BusyError, DeviceError, TargetError
from edgebuild.targets.client import AgentClient, ConnectionLost, deploy_stage
from edgebuild.targets.local import LocalTransport
from edgebuild.targets.pool import BoardPool, score_sharded

labgrid = pytest.importorskip("labgrid", reason="labgrid not installed (pip install edgebuild[lab])")

from edgebuild.targets import labgrid as lab_mod  # noqa: E402  (after the importorskip)
from edgebuild.targets.labgrid import Lab, LabgridTransport, connect_group, parse_selector  # noqa: E402
from edgebuild.targets.spec import load_target  # noqa: E402


# ------------------------------------------------------------------------ a local lab

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def labgrid_client(address: str, *args: str, user: str | None = None) -> str:
    env = dict(os.environ, **({"LG_USERNAME": user} if user else {}))
    done = subprocess.run([sys.executable, "-m", "labgrid.remote.client", "-x", address, *args],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


class LocalLab:
    """A labgrid coordinator and one exporter of NetworkService resources, on 127.0.0.1."""

    def __init__(self, folder: Path, services: dict, tags: dict):
        self.folder, self.port = folder, free_port()
        self.address = f"127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        self.procs = []
        try:
            self._serve(services, tags)
        except BaseException:
            self.stop()
            raise

    def _serve(self, services: dict, tags: dict) -> None:
        folder = self.folder
        self.procs.append(self._start([sys.executable, "-m", "labgrid.remote.coordinator", "-l",
                                       self.address], "coordinator.log"))
        _wait_port(self.port, self.procs[0])
        config = folder / "exporter.yaml"
        config.write_text("".join(
            f"{name}:\n  NetworkService:\n    address: {a}\n    username: {u}\n    port: {p}\n"
            for name, (a, u, p) in services.items()))
        self.procs.append(self._start([sys.executable, "-m", "labgrid.remote.exporter", "-c",
                                       self.address, "-n", "lab1", "--hostname", "127.0.0.1",
                                       str(config)], "exporter.log"))
        self._wait_resources(len(services))
        for name in services:
            self.client("-p", name, "create")
            self.client("-p", name, "add-match", f"lab1/{name}/NetworkService")
            self.client("-p", name, "set-tags", *(f"{k}={v}" for k, v in tags[name].items()))

    def _start(self, argv, log_name):
        with open(self.folder / log_name, "ab") as out:
            return subprocess.Popen(argv, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def _wait_resources(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.client("resources").count("NetworkService") >= count:
                return
            time.sleep(0.3)
        raise RuntimeError((self.folder / "exporter.log").read_text()[-2000:])

    def client(self, *args, user=None) -> str:
        return labgrid_client(self.address, *args, user=user)

    def holder(self, place: str) -> str | None:
        lab = Lab(self.address)
        try:
            return lab.place(place).acquired
        finally:
            lab.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            proc.wait(timeout=20)


LAB_SPEC = """name = "lab-pi"
description = "A lab board for the tests"
arch = "native"
cores = 2
ram_mb = 4096
storage_mb = 4096
memory_bandwidth_gbps = 4.0

[budgets]
decode_ms_per_token_p95 = 1500.0
prefill_ms = 15000.0
peak_rss_mb = 8192.0
artifact_mb = 2048.0

[connection]
transport = "ssh"
host = "unused.invalid"
user = "tester"
known_hosts = "known_hosts"
connect_timeout_s = 2.0
retries = 0
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / "targets").mkdir()
    (home / "targets" / "lab-pi.toml").write_text(LAB_SPEC)
    (home / "targets" / "known_hosts").write_text("")
    # Addresses in 127.0.0.0/8 with nothing listening: connection refused at once.
    services = {"pi-a": ("127.0.0.2", "pi", 1), "pi-b": ("127.0.0.3", "pi", 1),
                "pi-c": ("127.0.0.4", "root", 1)}
    tags = {"pi-a": {"target": "lab-pi", "shelf": "one", "room": "r1"},
            "pi-b": {"target": "lab-pi", "shelf": "one", "room": "r1"},
            "pi-c": {"target": "rpi5", "room": "r1"}}
    running = LocalLab(tmp_path_factory.mktemp("lab"), services, tags)
    old = {k: os.environ.get(k) for k in ("EDGEBUILD_HOME", "LG_COORDINATOR")}
    os.environ.update(EDGEBUILD_HOME=str(home), LG_COORDINATOR=running.address)
    yield running
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    running.stop()


# ------------------------------------------------------------------------ selectors

def test_selectors_name_a_place_or_tags():
    assert parse_selector("pi4-a").place == "pi4-a"
    spec = parse_selector("target=rpi4,shelf=2")
    assert spec.tags == {"target": "rpi4", "shelf": "2"} and spec.place is None
    with pytest.raises(TargetError, match="'target=' is not TAG=VALUE"):
        parse_selector("target=")
    with pytest.raises(TargetError, match="labgrid: needs a place name"):
        load_target("labgrid:")


def test_a_labgrid_table_needs_the_labgrid_transport_and_one_selector():
    from edgebuild.targets.spec import parse_target
    text = LAB_SPEC
    with pytest.raises(TargetError, match="key 'labgrid' must go together with connection.transport = 'labgrid'"):
        parse_target(text + '\n[labgrid]\nplace = "pi-a"\n')
    labgrid_text = text.replace('transport = "ssh"', 'transport = "labgrid"')
    target = parse_target(labgrid_text + '\n[labgrid]\nplace = "pi-a"\ncoordinator = "lab:20408"\n')
    assert target.labgrid.place == "pi-a" and target.labgrid.resource == "NetworkService"
    with pytest.raises(TargetError, match="key 'labgrid.place' must be set, or 'tags' instead"):
        parse_target(labgrid_text + '\n[labgrid]\nplace = "pi-a"\ntags = { target = "x" }\n')
    with pytest.raises(TargetError, match="key 'labgrid.tags.target' must be a string, got 4"):
        parse_target(labgrid_text + '\n[labgrid]\ntags = { target = 4 }\n')


# ------------------------------------------------------------------------ places

def test_a_place_becomes_its_tagged_spec_reached_through_labgrid(lab):
    target = load_target("labgrid:pi-a")
    assert target.name == "lab-pi" and target.connection.transport == "labgrid"
    assert target.labgrid.place == "pi-a" and target.labgrid.coordinator == lab.address
    group = load_target("labgrid:shelf=one")
    assert group.labgrid.tags == {"shelf": "one"} and group.name == "lab-pi"
    with pytest.raises(TargetError, match="has no place 'pi-z' \\(places: pi-a, pi-b, pi-c\\)"):
        load_target("labgrid:pi-z")
    with pytest.raises(TargetError, match="are different boards \\(lab-pi, rpi5\\); add target="):
        load_target("labgrid:room=r1")
    with pytest.raises(TargetError, match="no labgrid place at 127.0.0.1:\\d+ carries the tags of "
                                          "labgrid:target=rpi5,shelf=one"):
        load_target("labgrid:target=rpi5,shelf=one")
    assert load_target("labgrid:pi-c").name == "rpi5"


def test_the_transport_acquires_reads_the_address_and_releases(lab):
    transport = LabgridTransport(load_target("labgrid:pi-b"))
    with pytest.raises(DeviceError, match=r"cannot reach pi@\[127.0.0.3\]:1 after 1 attempt"):
        transport.run(["true"])
    assert transport.place == "pi-b"
    transport.close()
    assert lab.holder("pi-b") is None, "released after an error"


def test_a_place_held_by_someone_else_is_busy_with_its_holder(lab, capsys):
    from edgebuild.build.cli import main
    lab.client("-p", "pi-a", "acquire", user="alice")
    try:
        with pytest.raises(BusyError) as err:
            LabgridTransport(load_target("labgrid:pi-a")).open()
        holder = lab.holder("pi-a")
        assert holder.endswith("/alice")
        assert str(err.value) == (f"labgrid place pi-a is already acquired by {holder}; wait for "
                                  f"it to be released (labgrid-client -p pi-a release, by {holder})")
        assert main(["device", "check", "--target", "labgrid:pi-a"]) == 14
        assert capsys.readouterr().err == f"error: {err.value}\n"
    finally:
        lab.client("-p", "pi-a", "release", user="alice")


def test_ctrl_c_while_connecting_releases_the_place(lab, monkeypatch):
    class Interrupted:
        progress = None

        def open(self):
            raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(lab_mod, "_ssh_transport", lambda target, found: Interrupted())
    transport = LabgridTransport(load_target("labgrid:pi-a"))
    with pytest.raises(KeyboardInterrupt):
        try:
            AgentClient(transport)
        finally:
            transport.close()
    assert lab.holder("pi-a") is None


def test_a_group_is_allocated_by_reservations_and_busy_when_all_are_held(lab, monkeypatch):
    target = load_target("labgrid:shelf=one")
    lab.client("-p", "pi-a", "acquire", user="bob")
    try:
        seen = []
        monkeypatch.setattr(lab_mod, "_ssh_transport",
                            lambda t, found: seen.append(found) or LocalTransport(lab.folder / "x"))
        transport = LabgridTransport(target)
        assert transport.device_root() and transport.place == "pi-b"
        assert seen == [{"address": "127.0.0.3", "username": "pi", "port": 1}]
        with pytest.raises(BusyError, match=r"every labgrid place tagged shelf=one is already acquired "
                                            r"\(pi-a by \S+/bob, pi-b by \S+/root\)"):
            LabgridTransport(target).device_root()
        transport.close()
        assert lab.holder("pi-b") is None
    finally:
        lab.client("-p", "pi-a", "release", user="bob")


# ------------------------------------------------------------------------ sharding

def _requests(count: int, seed: int = 3) -> list:
    import numpy as np
    rng = np.random.default_rng(seed)
    contexts = [rng.integers(0, 256, n).tolist() for n in (3, 9, 17, 5)]
    return [(contexts[i % 4], rng.integers(0, 256, 1 + i % 3).tolist()) for i in range(count)]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    pytest.importorskip("torch")
    from test_agent import export_tiny_stage
    return export_tiny_stage(tmp_path_factory.getbasetemp())[1]


def _local_client(root: Path, stage: dict) -> AgentClient:
    transport = LocalTransport(root)
    client = AgentClient(transport, timeout_s=120)
    client.hello("lab-pi")
    deploy_stage(client, transport, "raw", "v1", stage)
    client.load("raw", "v1", threads=1)
    return client


def test_sharded_scores_equal_one_boards(stage, tmp_path):
    requests = _requests(150)
    clients = {name: _local_client(tmp_path / name, stage) for name in ("a", "b", "c")}
    try:
        one = clients["a"].score(requests)
        sharded = score_sharded(requests, clients)
    finally:
        for client in clients.values():
            client.close()
    assert sharded.results == one
    assert sum(sharded.items.values()) == 150 and sharded.lost == {}


class _Failing:
    """A board that answers ``good`` score requests, then is lost."""

    def __init__(self, inner, good: int):
        self.inner, self.good = inner, good

    def score(self, requests, **kwargs):
        if self.good <= 0:
            raise ConnectionLost("the agent stopped before replying to 'score' (exit status -9)")
        self.good -= 1
        return self.inner.score(requests, **kwargs)


class _Late:
    """A board that starts its first request late (so the other board takes the first batches)."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def score(self, requests, **kwargs):
        time.sleep(self.delay_s)
        self.delay_s = 0.0
        return self.inner.score(requests, **kwargs)


def test_a_board_lost_mid_run_has_its_requests_rerun_on_the_others(stage, tmp_path):
    requests = _requests(300)
    a, b = _local_client(tmp_path / "a", stage), _local_client(tmp_path / "b", stage)
    try:
        one = a.score(requests)
        sharded = score_sharded(requests, {"a": _Late(a, 3.0), "b": _Failing(b, good=1)})
        with pytest.raises(DeviceError, match="every board was lost .*b: the agent stopped"):
            score_sharded(requests, {"b": _Failing(b, good=0)})
    finally:
        a.close()
        b.close()
    assert sharded.results == one
    assert sharded.lost == {"b": "the agent stopped before replying to 'score' (exit status -9)"}
    # four contexts, 75 requests each: four batches of one context; b scored one, then was lost
    assert sharded.items == {"a": 225, "b": 75}


class _Gone:
    """A board whose agent is gone: every request is a lost connection."""

    def __getattr__(self, name):
        def lost(*args, **kwargs):
            raise ConnectionLost(f"the agent stopped before replying to {name!r}")
        return lost


def test_a_pool_times_on_the_first_board_still_there_and_raises_what_an_agent_refuses(stage, tmp_path):
    a = _local_client(tmp_path / "a", stage)
    idle = AgentClient(LocalTransport(tmp_path / "idle"), timeout_s=120)      # nothing loaded
    pool = BoardPool({"gone": _Gone(), "a": a, "idle": idle}, {"a": a.transport, "idle": idle.transport})
    try:
        assert pool.time(prompt_len=4, decode_tokens=2, warmup=0, repeats=1)["board"] == "a"
        assert pool.lost == {"gone": "the agent stopped before replying to 'time'"}
        with pytest.raises(DeviceError, match="agent refused 'stage'.*budget"):
            pool.deploy("raw", "v2", stage, budget_bytes=1000)
        with pytest.raises(DeviceError, match="agent refused 'score'") as err:
            pool.score(_requests(150))
        assert not isinstance(err.value, ConnectionLost) and pool.boards == ["a", "idle"]
        with pytest.raises(ConnectionLost, match=r"every board was lost during load \(gone: "):
            BoardPool({"gone": _Gone()}, {}).load("raw", "v1")
    finally:
        pool.close()


def test_a_build_opens_a_pool_session_for_a_group_and_a_device_session_for_one_place(lab):
    from edgebuild.targets.pool_session import PoolSession
    from edgebuild.targets.session import DeviceSession, device_session
    assert isinstance(device_session(load_target("labgrid:shelf=one")), PoolSession)
    for name in ("labgrid:pi-a", "local"):
        session = device_session(load_target(name))
        assert type(session) is DeviceSession


def test_a_group_pool_shards_over_the_places_and_releases_them(lab, stage, monkeypatch, tmp_path):
    roots = {"127.0.0.2": tmp_path / "a", "127.0.0.3": tmp_path / "b"}
    monkeypatch.setattr(lab_mod, "_ssh_transport", lambda t, found: LocalTransport(roots[found["address"]]))
    requests = _requests(100)
    with connect_group(load_target("labgrid:shelf=one")) as pool:
        assert isinstance(pool, BoardPool) and pool.boards == ["pi-a", "pi-b"]
        assert {lab.holder("pi-a"), lab.holder("pi-b")} == {lab.holder("pi-a")} != {None}
        pool.deploy("raw", "v1", stage)
        pool.load("raw", "v1", threads=1)
        scores = pool.score(requests)
        assert set(pool.info()["boards"]) == {"pi-a", "pi-b"}
        assert pool.time(prompt_len=4, decode_tokens=2, warmup=0, repeats=1)["board"] == "pi-a"
    assert lab.holder("pi-a") is None and lab.holder("pi-b") is None
    single = _local_client(tmp_path / "single", stage)
    try:
        assert scores == single.score(requests)
    finally:
        single.close()
    assert sum(pool.last.items.values()) == 100


def test_each_place_of_a_group_is_its_own_target(lab):
    from edgebuild.targets.labgrid import each_place
    places = each_place(load_target("labgrid:shelf=one"))
    assert [(t.name, t.labgrid.place, t.labgrid.tags) for t in places] == [
        ("lab-pi", "pi-a", None), ("lab-pi", "pi-b", None)]
    single = load_target("labgrid:pi-c")
    assert each_place(single) == [single]


def test_a_group_and_one_board_do_not_share_device_records(lab):
    from edgebuild.targets.labgrid import board_group
    group, single = load_target("labgrid:shelf=one"), load_target("labgrid:pi-a")
    assert board_group(group) == [[("shelf", "one")]] and board_group(single) == []
    assert board_group(load_target("local")) == []
