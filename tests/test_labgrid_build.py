"""A whole build on a labgrid group: every board of the group acquired, each stage deployed and
loaded on all of them, its device benchmark requests shared out between them with scores equal to
one board's, a board lost mid-run named in the manifest and the report, and the places released.

The lab is a real labgrid coordinator and exporter on 127.0.0.1 (``test_labgrid.LocalLab``); each
board is a local agent in a folder of its own."""
from __future__ import annotations

import json
import shutil
import signal

import pytest

from edgebuild.core.errors import DeviceError, ExitCode
from edgebuild.targets.local import LocalTransport

from conftest import DATA_DIR

pytest.importorskip("labgrid", reason="labgrid not installed (pip install edgebuild[lab])")

from edgebuild.targets import labgrid as lab_mod  # noqa: E402  (after the importorskip)
from test_labgrid import lab  # noqa: E402,F401  (the lab fixture: places pi-a, pi-b tagged shelf=one)

CONFIG = """[build]
stages = ["baseline", "rtn"]
tasks = ["arc_easy"]
eudaimonia = false
profile = "quick"
device_profile = "quick"
"""
ADDRESSES = {"127.0.0.2": "pi-a", "127.0.0.3": "pi-b"}     # the lab fixture's NetworkServices


class _Stdin:
    """A board agent's stdin: counts the score requests it is sent, and kills the agent when it
    is sent score command number ``board["die_at"]`` (``board["gone"]``: for good)."""

    def __init__(self, inner, transport, board: dict):
        self.inner, self.transport, self.board = inner, transport, board

    def write(self, line: bytes):
        request = json.loads(line)
        if request["cmd"] == "score":
            self.board["score_calls"] += 1
            if self.board["score_calls"] == self.board.get("die_at"):
                self.transport.proc.send_signal(signal.SIGKILL)
                self.transport.proc.wait()
                self.board["killed"] = True
            else:
                self.board["requests"] += len(request["args"]["requests"])
        return self.inner.write(line)

    def flush(self):
        return self.inner.flush()

    def close(self):
        return self.inner.close()


class _Board(LocalTransport):
    """A lab board: a local agent under ``root`` whose score requests are counted."""

    def __init__(self, root, board: dict):
        super().__init__(root)
        self.board = board

    def open(self):
        stdin, stdout = super().open()
        return _Stdin(stdin, self, self.board), stdout


def _board(tmp, boards: dict):
    """The lab's ``_ssh_transport``: each place's board a local agent under ``tmp/<place>``
    (its counts in ``boards[place]``); a board killed for good cannot be reached again."""
    def transport(target, found):
        place = ADDRESSES[found["address"]]
        board = boards.setdefault(place, {"score_calls": 0, "requests": 0})
        if board.get("gone") and board.get("killed"):
            raise DeviceError(f"cannot reach {place}: connection refused")
        return _Board(tmp / place, board)
    return transport


def _build(tmp, out, target: str, boards: dict) -> int:
    """``edgebuild all`` of tiny-random on ``target``, the lab's boards being local agents."""
    from edgebuild.build.cli import main
    (tmp / "build.toml").write_text(CONFIG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lab_mod, "_ssh_transport", _board(tmp, boards))
        return main(["all", "--model", "tiny-random", "--target", target, "--config", str(tmp / "build.toml"),
                     "--data-dir", str(DATA_DIR), "--out", str(out), "--wandb", "disabled"])


def _stages(out) -> list:
    """The stages of a build's manifest."""
    return json.loads((out / "lab-pi" / "manifest.json").read_text())["stages"]


def _records(out) -> dict:
    """``{stage version on the device: device record}`` of a build, from its step cache (a group's
    records are cached under keys of their own; the version names the stage's content)."""
    records = [json.loads(path.read_text()) for path in (out / "cache" / "device").glob("*/record.json")]
    return {record["version"]: record for record in records}


@pytest.fixture(scope="module")
def one_board(lab, tmp_path_factory):  # noqa: F811  (the fixture imported above)
    """A build measured and scored on place pi-a alone: its out folder, exit code, and the
    requests its board was sent."""
    if not DATA_DIR.is_dir():
        pytest.skip("benchmark data not found")
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("one-board")
    boards: dict = {}
    code = _build(tmp, tmp / "out", "labgrid:pi-a", boards)
    assert list(boards) == ["pi-a"] and boards["pi-a"]["requests"] > 0
    return tmp / "out", code, boards["pi-a"]["requests"]


def _group_build(one_board, tmp_path, boards: dict):
    """The same build on group shelf=one, reusing the one-board build's cache but its device steps."""
    out = tmp_path / "out"
    shutil.copytree(one_board[0], out)
    shutil.rmtree(out / "cache" / "device")
    return out, _build(tmp_path, out, "labgrid:shelf=one", boards)


def test_a_group_build_shares_device_scoring_between_its_boards_and_releases_them(lab, one_board,  # noqa: F811
                                                                                  tmp_path):
    boards: dict = {}
    out, code = _group_build(one_board, tmp_path, boards)
    assert code == one_board[1] and lab.holder("pi-a") is None and lab.holder("pi-b") is None
    stages = _stages(out)
    assert [s["latency"]["boards"]["places"] for s in stages] == [["pi-a", "pi-b"]] * len(stages)
    assert all(s["latency"]["board"] == "pi-a" and s["latency"]["measured"] for s in stages)
    assert not any(s["latency"]["boards"]["lost"] for s in stages)
    items = {b: sum(s["latency"]["boards"]["items"][b] for s in stages) for b in ("pi-a", "pi-b")}
    assert items == {b: boards[b]["requests"] for b in items} and all(items.values())
    assert sum(items.values()) == one_board[2]
    group, one = _records(out), _records(one_board[0])
    assert sorted(group) == sorted(one)
    for key, record in group.items():
        assert record["scores"] == one[key]["scores"] and record["agreement"] == one[key]["agreement"]
    report = (out / "lab-pi" / "report.md").read_text()
    assert "## Boards of the group" in report
    row = f"| {stages[0]['stage']}#1 | pi-b | {stages[0]['latency']['boards']['items']['pi-b']} |  |  |"
    assert row in report


def test_a_board_lost_mid_run_is_named_and_its_requests_scored_by_the_other(lab, one_board,  # noqa: F811
                                                                          tmp_path):
    boards = {"pi-b": {"score_calls": 0, "requests": 0, "die_at": 2}}
    out, code = _group_build(one_board, tmp_path, boards)
    assert code == one_board[1] and lab.holder("pi-a") is None and lab.holder("pi-b") is None
    stages = _stages(out)
    assert boards["pi-b"]["score_calls"] == 2, "pi-b was sent a second batch, and lost with it"
    lost = [s for s in stages if s["latency"]["boards"]["lost"]]
    assert len(lost) == 1 and list(lost[0]["latency"]["boards"]["lost"]) == ["pi-b"]
    why = lost[0]["latency"]["boards"]["lost"]["pi-b"]
    assert why.startswith("the agent stopped before replying to 'score'")
    after = stages[stages.index(lost[0]) + 1:]
    assert all(s["latency"]["boards"]["places"] == ["pi-a"] for s in after)
    items = {b: sum(s["latency"]["boards"]["items"].get(b, 0) for s in stages) for b in ("pi-a", "pi-b")}
    assert items == {b: boards[b]["requests"] for b in items} and sum(items.values()) == one_board[2]
    group, one = _records(out), _records(one_board[0])
    for key, record in group.items():
        assert record["status"] == "ok" and record["scores"] == one[key]["scores"]
    label, scored = f"{lost[0]['stage']}#1", lost[0]["latency"]["boards"]["items"]["pi-b"]
    (row,) = [line for line in (out / "lab-pi" / "report.md").read_text().splitlines()
              if line.startswith(f"| {label} | pi-b |")]
    assert row.startswith(f"| {label} | pi-b | {scored} |  | the agent stopped before replying to 'score'")
    html = (out / "lab-pi" / "report.html").read_text()
    assert "<td>pi-b</td>" in html and "the agent stopped before replying to &#39;score&#39;" in html


def test_a_group_whose_every_board_is_lost_is_a_lost_device(lab, one_board, tmp_path):  # noqa: F811
    boards = {p: {"score_calls": 0, "requests": 0, "die_at": 1, "gone": True} for p in ("pi-a", "pi-b")}
    out, code = _group_build(one_board, tmp_path, boards)
    assert code == ExitCode.DEVICE_INCOMPLETE and lab.holder("pi-a") is None and lab.holder("pi-b") is None
    manifest = json.loads((out / "lab-pi" / "manifest.json").read_text())
    base, rtn = (s["latency"] for s in manifest["stages"])
    assert base["status"] == "lost" and base["after"] == "score"
    assert base["error"].startswith("every board was lost before the requests were scored (pi-")
    assert sorted(base["boards"]["lost"]) == ["pi-a", "pi-b"]
    assert rtn["status"] == "unreachable" and "not reachable again: cannot reach pi-a" in rtn["error"]
    assert manifest["device_checks"].startswith("not run")
    assert not _records(out), "a lost result is never cached"
