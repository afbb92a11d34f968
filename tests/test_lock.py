"""One writer per output directory: the lock, its waiting and --no-wait, and the CLI around it."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from edgebuild.build.cli import main
from edgebuild.core.errors import BusyError, ExitCode
from edgebuild.core.lock import LOCK_NAME, OutputLock


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_HOME", str(tmp_path / "home"))


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = OutputLock(tmp_path / "out", "edgebuild all --target local")
    with first.hold():
        info = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["what"] == "edgebuild all --target local"
        with pytest.raises(BusyError, match=rf"in use by another edgebuild \(pid {os.getpid()}, started .*: "
                                            r"edgebuild all --target local\)") as err:
            OutputLock(tmp_path / "out").acquire(wait=False)
        assert err.value.exit_code == ExitCode.BUSY
    with OutputLock(tmp_path / "out").hold(wait=False):      # free again once released
        pass


def test_a_waiter_says_for_whom_once_and_goes_on_when_the_holder_lets_go(tmp_path):
    holder = OutputLock(tmp_path, "first")
    holder.acquire()
    said = []
    threading.Timer(1.0, holder.release).start()
    start = time.monotonic()
    with OutputLock(tmp_path, "second").hold(on_wait=said.append):
        assert time.monotonic() - start >= 0.9
        assert json.loads((tmp_path / LOCK_NAME).read_text())["what"] == "second"
    assert len(said) == 1 and said[0].startswith(f"waiting for the build holding {tmp_path} (pid {os.getpid()}")


def test_the_kernel_releases_the_lock_of_a_killed_holder(tmp_path):
    code = ("import sys, time; from edgebuild.core.lock import OutputLock; "
            f"OutputLock({str(tmp_path)!r}, 'doomed').acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=rf"pid {proc.pid}, .*doomed"):
            OutputLock(tmp_path).acquire(wait=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with OutputLock(tmp_path).hold(wait=False):
        pass


def _held(out):
    lock = OutputLock(out, "edgebuild all --target local")
    lock.acquire()
    return lock


def test_a_build_with_no_wait_on_a_held_out_exits_busy_in_one_line(tmp_path, capsys):
    lock = _held(tmp_path / "out")
    try:
        code = main(["all", "--model", "tiny-random", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                     "--no-wait", "--wandb", "disabled"])
    finally:
        lock.release()
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.BUSY and len(err.splitlines()) == 1
    assert err.startswith(f"error: output directory {tmp_path / 'out'} is in use by another edgebuild (pid {os.getpid()}")


def test_a_build_waits_for_the_holder_and_says_so(tmp_path, capsys):
    lock = _held(tmp_path / "out")
    threading.Timer(1.0, lock.release).start()
    code = main(["all", "--model", "tiny-random", "--data-dir", str(tmp_path / "no-data"),
                 "--out", str(tmp_path / "out"), "--wandb", "disabled"])
    err = capsys.readouterr().err
    assert f"waiting for the build holding {tmp_path / 'out'} (pid {os.getpid()}" in err
    assert code == ExitCode.DATA            # then it ran: into the missing data dir


def test_cache_commands_take_the_lock_too(tmp_path, capsys):
    (tmp_path / "out" / "cache").mkdir(parents=True)
    lock = _held(tmp_path / "out")
    try:
        code = main(["cache", "prune", "--out", str(tmp_path / "out"), "--max-size", "1G", "--no-wait"])
    finally:
        lock.release()
    assert code == ExitCode.BUSY and "in use by another edgebuild" in capsys.readouterr().err
