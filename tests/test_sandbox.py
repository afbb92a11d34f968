"""The code sandbox: hostile programs are contained and fail; plain ones pass or fail as written."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from edgebuild.bench.codeexec import pass_at_k, pass_at_k_estimate
from edgebuild.bench.sandbox import Limits, isolation, run_program, run_programs

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="only a root parent can run programs as another user; otherwise files the caller "
           "owns stay writable to them")


def _leftovers(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (a limit value unique to one test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"program.py" in cmdline:
            found.append(int(entry.name))
    return found


def _settled(marker: str, seconds: float = 2.0) -> list[int]:
    """``_leftovers`` after giving the kernel a moment to reap killed processes."""
    deadline = time.monotonic() + seconds
    while _leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _leftovers(marker)


def test_sandbox_can_run_programs():
    iso = isolation()
    assert iso.interpreter is not None, iso.note


# ----------------------------------------------------------------------------- ordinary programs


def test_correct_program_passes():
    result = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout.strip() == "ok" and result.seconds > 0


def test_wrong_program_fails():
    result = run_program("def add(a, b):\n    return a * b\n\nassert add(2, 3) == 5\n")
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.stderr


def test_exiting_early_is_a_failure():
    result = run_program("import sys\nsys.exit(0)\nassert False\n")
    assert result.status == "failed" and "SystemExit" in result.stderr


def test_death_by_signal_is_killed():
    result = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert result.status == "killed" and not result.passed


def test_environment_is_stripped_and_home_is_the_work_dir(monkeypatch):
    monkeypatch.setenv("EDGEBUILD_TEST_SECRET", "s3cret")
    result = run_program(
        "import os\n"
        "assert 'EDGEBUILD_TEST_SECRET' not in os.environ\n"
        "assert os.path.expanduser('~') == os.getcwd() == os.environ['TMPDIR']\n"
        "import sys\nassert sys.stdin is None or sys.stdin.read() == ''\n"
        "assert not any('site-packages' in p for p in sys.path)\n")
    assert result.passed, result.stderr


def test_output_is_truncated():
    result = run_program("print('x' * 100000)\nimport sys\nsys.stderr.write('e' * 100000)\n",
                         Limits(output_bytes=1000))
    assert result.passed and len(result.stdout) <= 1000 and len(result.stderr) <= 1000


def test_run_programs_keeps_order():
    sources = [f"assert {i} % 2 == 0\n" for i in range(6)]
    results = run_programs(sources, workers=3)
    assert [r.passed for r in results] == [True, False, True, False, True, False]
    assert run_programs([]) == []


# ----------------------------------------------------------------------------- hostile programs


def test_infinite_loop_times_out_and_is_killed():
    limits = Limits(timeout_s=1.0, memory_mb=263)
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", limits)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 5
    assert not _settled(str(263 * 1024 * 1024))


def test_fork_bomb_is_contained():
    # RLIMIT_NPROC caps the bomb at a handful of processes and the timeout kills its whole
    # process group (and PID namespace): the machine never sees more than `nproc` of them.
    limits = Limits(timeout_s=2.0, nproc=8, memory_mb=257)
    bomb = ("import os, time\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        time.sleep(0.01)\n")
    start = time.monotonic()
    result = run_program(bomb, limits)
    assert result.status in ("timeout", "killed", "failed") and not result.passed
    assert time.monotonic() - start < 8
    assert not _settled(str(257 * 1024 * 1024)), "no bomb process outlives the run"


def test_huge_allocation_fails():
    result = run_program("buffer = bytearray(8 * 1024 ** 3)\nbuffer[-1] = 1\n",
                         Limits(memory_mb=256))
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_cpu_limit_kills_a_busy_program():
    result = run_program("while True:\n    pass\n", Limits(timeout_s=10.0, cpu_s=1))
    assert result.status == "killed" and result.seconds < 8


def test_big_file_is_refused():
    result = run_program("with open('big', 'wb') as fh:\n    fh.write(b'x' * (4 * 1024 * 1024))\n",
                         Limits(file_mb=1))
    assert not result.passed


@needs_root
def test_write_outside_the_sandbox_dir_fails(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    target = tmp_path / "outside.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('escaped')\n")
    assert result.status == "failed" and "PermissionError" in result.stderr
    assert not target.exists()
    # an absolute path in the caller's HOME, and "~" (which is the sandbox's own dir): the
    # program passes only if its file lands in the caller's HOME
    result = run_program(
        "import os\n"
        f"open({str(home / 'a.txt')!r}, 'w').write('escaped')\n")
    assert result.status == "failed" and not (home / "a.txt").exists()
    result = run_program(
        "import os\n"
        "open(os.path.expanduser('~/b.txt'), 'w').write('escaped')\n"
        f"assert os.path.exists({str(home / 'b.txt')!r})\n")
    assert result.status == "failed" and not (home / "b.txt").exists()


def test_program_cannot_reach_the_network():
    if not isolation().network_isolated:
        pytest.skip(f"no network namespace on this machine: {isolation().note}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                             "timeout=2).close()\n")
    assert result.status == "failed" and result.network_isolated
    assert "OSError" in result.stderr or "Error" in result.stderr


# ----------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (10, 0, 1, 0.0), (10, 10, 1, 1.0), (10, 3, 1, 0.3), (10, 3, 10, 1.0), (5, 2, 2, 0.7),
    (20, 2, 10, 1 - 43758 / 184756), (200, 1, 100, 0.5), (1, 1, 1, 1.0),
])
def test_unbiased_pass_at_k(n, c, k, expected):
    assert pass_at_k_estimate(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 10 samples"):
        pass_at_k_estimate(5, 1, 10)
    with pytest.raises(ValueError):
        pass_at_k_estimate(5, 6, 1)


def test_pass_at_k_metric_reads_outcomes():
    outcomes = [{"passed": p} for p in (True, False, False, True, False, False, False, False,
                                        False, False)]
    assert pass_at_k([None], [outcomes], k=[1, 10]) == {"pass@1": pytest.approx(0.2),
                                                       "pass@10": 1.0}
    assert pass_at_k([None], [outcomes[1:3]], k=1) == {"pass@1": 0.0}
