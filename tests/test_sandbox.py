"""The code sandbox: hostile programs are contained and fail; plain ones pass or fail as written."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from edgebuild.bench import sandbox
from edgebuild.bench.codeexec import pass_at_k, pass_at_k_estimate, run_outcomes
from edgebuild.bench.sandbox import Limits, choose, run_program, run_programs
from edgebuild.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def isolated():
    """The isolating backend; skipped (with why) on a machine without one."""
    choice = choose(allow=False)
    if choice.backend is None:
        pytest.skip(choice.reason)
    return choice


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


def test_an_isolating_backend_is_chosen_by_default(isolated):
    assert isolated.backend == "bwrap" and isolated.isolated and isolated.interpreter


# ----------------------------------------------------------------------------- ordinary programs


def test_correct_program_passes(isolated):
    result = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout.strip() == "ok" and result.seconds > 0
    assert result.network_isolated and result.note == "bwrap"


def test_wrong_program_fails(isolated):
    result = run_program("def add(a, b):\n    return a * b\n\nassert add(2, 3) == 5\n")
    assert not result.passed and result.status == "failed"
    assert "AssertionError" in result.stderr


def test_exiting_early_is_a_failure(isolated):
    result = run_program("import sys\nsys.exit(0)\nassert False\n")
    assert result.status == "failed" and "SystemExit" in result.stderr


def test_death_by_signal_is_killed(isolated):
    result = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert result.status == "killed" and not result.passed


def test_the_program_sees_a_private_tmp_as_nobody(isolated, monkeypatch):
    monkeypatch.setenv("EDGEBUILD_TEST_SECRET", "s3cret")
    result = run_program(
        "import os, sys\n"
        "assert 'EDGEBUILD_TEST_SECRET' not in os.environ\n"
        "assert os.path.expanduser('~') == os.getcwd() == os.environ['TMPDIR'] == '/tmp'\n"
        "assert os.getuid() == os.getgid() == 65534\n"
        "assert sorted(os.listdir('/tmp')) == ['program.py']\n"
        "open('mine.txt', 'w').write('x')\n"
        "assert open('/tmp/mine.txt').read() == 'x'\n"
        "assert not any(os.path.exists(p) for p in ('/home', '/root', '/work', '/var'))\n"
        "assert sys.stdin is None or sys.stdin.read() == ''\n"
        "assert not any('site-packages' in p for p in sys.path)\n")
    assert result.passed, result.stderr


def test_output_is_truncated(isolated):
    result = run_program("print('x' * 100000)\nimport sys\nsys.stderr.write('e' * 100000)\n",
                         Limits(output_bytes=1000))
    assert result.passed and len(result.stdout) <= 1000 and len(result.stderr) <= 1000


def test_run_programs_keeps_order(isolated):
    sources = [f"assert {i} % 2 == 0\n" for i in range(6)]
    results = run_programs(sources, workers=3)
    assert [r.passed for r in results] == [True, False, True, False, True, False]
    assert run_programs([]) == []


# ----------------------------------------------------------------------------- hostile programs
#
# Each hostile program passes only if its attack worked; contained, it fails (or is killed or
# times out), the files outside stay as they were, and this process and its bystanders live on.


@pytest.fixture
def outside(tmp_path):
    """Files outside the sandbox: a victim to overwrite, a secret to read (in the test's
    tmp_path and in the caller's home), and a bystander process of another user (nobody when
    we are root, else our own)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    secret = tmp_path / "secret.txt"
    token = secrets.token_hex(8)
    secret.write_text(token)
    home_secret = Path.home() / f".edgebuild-sandbox-test-{secrets.token_hex(8)}"
    home_secret.write_text(token)
    uid = sandbox.NOBODY if os.geteuid() == 0 else None
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True, **user)
    try:
        yield {"victim": victim, "secret": secret, "home_secret": home_secret, "token": token,
               "bystander": bystander, "escape": Path(tempfile.gettempdir()) / f"escaped-{secrets.token_hex(8)}"}
    finally:
        bystander.kill()
        bystander.wait()
        home_secret.unlink()


def _hostile(name: str, o: dict) -> str:
    up = "../" * 16
    return {
        "write absolute path": f"open({str(o['victim'])!r}, 'w').write('pwned')\n",
        "write relative path": f"open({up + str(o['victim'])[1:]!r}, 'w').write('pwned')\n",
        "write relative into host tmp": (      # lands in its own /tmp; the host's stays clean
            f"open({up + str(o['escape'])[1:]!r}, 'w').write('pwned')\n"
            f"assert open({up + str(o['victim'])[1:]!r}).read() == 'original'\n"),
        "write into the home dir": (
            f"import os\nopen({str(Path.home() / o['escape'].name)!r}, 'w').write('pwned')\n"),
        "read a file of the test": f"print(open({str(o['secret'])!r}).read())\n",
        "read a file in the home dir": f"print(open({str(o['home_secret'])!r}).read())\n",
        "read /root": "import os\nprint(os.listdir('/root'))\n",
        "signal the parent": "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\n"
                             "time.sleep(5)\n",
        "signal every process": "import os, signal, time\nos.kill(-1, signal.SIGKILL)\ntime.sleep(5)\n",
        "fill the disk": ("for i in range(1000):\n"
                          "    open(f'f{i}', 'wb').write(b'x' * (8 * 1024 * 1024))\n"),
    }[name]


HOSTILE = ("write absolute path", "write relative path", "write relative into host tmp",
           "write into the home dir", "read a file of the test", "read a file in the home dir",
           "read /root", "signal the parent", "signal every process", "fill the disk")


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_is_contained(isolated, outside, name):
    result = run_program(_hostile(name, outside), Limits(timeout_s=8.0))
    assert not result.passed and result.status in ("failed", "killed"), (result.status, result.stderr)
    assert outside["victim"].read_text() == "original"
    assert not outside["escape"].exists() and not (Path.home() / outside["escape"].name).exists()
    assert outside["token"] not in result.stdout + result.stderr
    assert outside["bystander"].poll() is None, "a process outside the sandbox was killed"
    assert result.seconds < 8


def test_infinite_loop_times_out_and_is_killed(isolated):
    limits = Limits(timeout_s=1.0, memory_mb=263)
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", limits)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 5
    assert not _settled(str(263 * 1024 * 1024))


def test_fork_bomb_is_contained(isolated, outside):
    # RLIMIT_NPROC caps the bomb at a handful of processes and the timeout kills its whole
    # PID namespace: the machine never sees more than `nproc` of them.
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
    assert outside["bystander"].poll() is None


def test_memory_bomb_fails(isolated):
    result = run_program("buffer = bytearray(8 * 1024 ** 3)\nbuffer[-1] = 1\n", Limits(memory_mb=256))
    assert result.status == "failed" and "MemoryError" in result.stderr
    growing = run_program("chunks = []\nwhile True:\n    chunks.append(b'x' * 2 ** 24)\n",
                          Limits(memory_mb=256))
    assert growing.status == "failed" and "MemoryError" in growing.stderr


def test_cpu_limit_kills_a_busy_program(isolated):
    result = run_program("while True:\n    pass\n", Limits(timeout_s=10.0, cpu_s=1))
    assert result.status == "killed" and result.seconds < 8


def test_big_file_is_refused(isolated):
    result = run_program("with open('big', 'wb') as fh:\n    fh.write(b'x' * (4 * 1024 * 1024))\n",
                         Limits(file_mb=1))
    assert not result.passed


def test_program_cannot_reach_the_network(isolated):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                             "timeout=2).close()\n")
        with pytest.raises(socket.timeout):
            server.accept()
    assert result.status == "failed" and result.network_isolated
    assert "ConnectionRefusedError" in result.stderr or "OSError" in result.stderr


# ----------------------------------------------------------------------------- as a non-root user

_AS_USER = """\
import json, sys
sys.path.insert(0, sys.argv[1])
from edgebuild.bench.sandbox import choose, run_program
victim = sys.argv[2]
choice = choose(allow=False)
checks = {
    "uid": "import os\\nassert os.getuid() == 65534\\nopen('/tmp/x', 'w').write('ok')\\n",
    "write": f"open({victim!r}, 'w').write('pwned')\\n",
    "kill": "import os, signal, time\\nos.kill(-1, signal.SIGKILL)\\ntime.sleep(3)\\n",
}
print(json.dumps({"backend": choice.backend, "reason": choice.reason,
                  **{k: run_program(v).status for k, v in checks.items()}}))
"""


def _as_nobody(command: list[str]) -> list[str]:
    return ["setpriv", "--reuid", str(sandbox.NOBODY), "--regid", str(sandbox.NOBODY),
            "--clear-groups", "--", *command]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to become uid 65534) and setpriv")
def test_the_sandbox_works_for_a_non_root_caller(isolated):
    """edgebuild run by an ordinary user (uid 65534 here, with the system's python3 and the
    source tree on its path): bubblewrap maps it to nobody inside, and a file that user owns
    outside the sandbox stays out of the program's reach."""
    python = shutil.which("python3", path=sandbox.SAFE_PATH)
    tree = Path(tempfile.mkdtemp(prefix="edgebuild-nonroot-"))
    try:
        tree.chmod(0o755)
        (tree / "edgebuild").mkdir(mode=0o755)
        for package in ("bench", "core"):
            (tree / "edgebuild" / package).symlink_to(REPO / package)
        victim = tree / "victim.txt"
        victim.write_text("original")
        os.chown(victim, sandbox.NOBODY, sandbox.NOBODY)
        bystander = subprocess.Popen(_as_nobody(["sleep", "60"]))
        try:
            done = subprocess.run(_as_nobody([python, "-B", "-c", _AS_USER, str(tree), str(victim)]),
                                  capture_output=True, text=True, timeout=120, cwd="/")
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout)
            assert bystander.poll() is None
        finally:
            bystander.kill()
            bystander.wait()
        assert report == {"backend": "bwrap", "reason": "", "uid": "passed", "write": "failed",
                          "kill": "killed"}, report
        assert victim.read_text() == "original"
    finally:
        shutil.rmtree(tree)


# ----------------------------------------------------------------------------- no isolation


@pytest.fixture
def no_bwrap(monkeypatch):
    """This machine as one without bubblewrap (the probe cache emptied before and after)."""
    from edgebuild.bench.sandbox_backends import Bubblewrap
    sandbox.probe.cache_clear()
    monkeypatch.setattr(Bubblewrap, "missing", lambda self: "bwrap is not installed")
    yield
    sandbox.probe.cache_clear()
    sandbox.allow_unsandboxed(False)


def test_without_isolation_code_needs_the_explicit_opt_in(no_bwrap):
    reason = sandbox.unavailable_reason()
    assert "bwrap is not installed" in reason and "--allow-unsandboxed-code" in reason
    assert "bubblewrap" in reason
    result = run_program("print('hi')\n")
    assert result.status == "error" and not result.passed and reason in result.stderr
    with pytest.raises(ConfigError, match="allow-unsandboxed-code"):
        run_outcomes([["print('hi')\n"]])


def test_the_opt_in_runs_the_plain_subprocess_and_says_so(no_bwrap):
    sandbox.allow_unsandboxed(True)
    assert sandbox.unavailable_reason() is None
    result = run_program("print('hi')\n")
    assert result.passed and result.stdout == "hi\n" and not result.network_isolated
    assert result.note.startswith("unsandboxed (--allow-unsandboxed-code): bwrap: bwrap is not installed")
    [[outcome]] = run_outcomes([["assert 1 + 1 == 2\n"]])
    assert outcome["passed"] and "unsandboxed" in outcome["note"]


def test_code_benchmarks_are_listed_unavailable_with_the_reason(no_bwrap):
    from edgebuild.bench.suite import plan
    data = Path(os.environ.get("EDGEBUILD_DATA_DIR", "/work/shared/data"))
    if not (data / "humaneval").is_dir():
        pytest.skip(f"no benchmark data in {data}")
    suite = plan(["code"], data)
    for name in ("humaneval", "humaneval_pass10", "mbpp"):
        assert name not in suite.tasks and "--allow-unsandboxed-code" in suite.unavailable[name]
    opted = plan(["code"], data, allow_unsandboxed=True)
    assert {"humaneval", "mbpp"} <= set(opted.tasks)


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


# ----------------------------------------------------------------------------- uids of their own


@pytest.fixture
def nobody_crowd():
    """Twelve processes of ``nobody``, more than a run's ``RLIMIT_NPROC``, as on a machine
    whose daemons run as that user."""
    crowd = [subprocess.Popen(["sleep", "60"], user=sandbox.NOBODY, group=sandbox.NOBODY,
                              extra_groups=[]) for _ in range(12)]
    yield crowd
    for proc in crowd:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs get uids of their own only then)")
def test_other_processes_of_nobody_do_not_count_against_a_run(no_bwrap, nobody_crowd):
    sandbox.allow_unsandboxed(True)
    result = run_program("import os\npid = os.fork()\nos._exit(0) if pid == 0 else os.waitpid(pid, 0)\n",
                         Limits(nproc=8))
    assert result.passed, result.stderr
    assert all(proc.poll() is None for proc in nobody_crowd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs get uids of their own only then)")
def test_a_process_that_leaves_the_group_is_killed_with_the_run(no_bwrap):
    sandbox.allow_unsandboxed(True)
    marker = str(259 * 1024 * 1024)
    escapee = ("import os, time\n"
               "if os.fork() == 0:\n"
               "    os.setsid()\n"
               "    time.sleep(60)\n")
    result = run_program(escapee, Limits(memory_mb=259))
    assert result.passed, result.stderr
    assert not _settled(marker), "the process that left the group outlived the run"


def test_zombies_of_a_run_do_not_hold_up_its_end(monkeypatch):
    """A run's exited processes may wait seconds for init to reap them; the clean-up kills what
    still runs and does not wait for that."""
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while sandbox._running(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert not sandbox._running(zombie.pid) and sandbox._running(sleeper.pid)
        monkeypatch.setattr(sandbox, "_processes", lambda: [(zombie.pid, 4242), (sleeper.pid, 4242)])
        start = time.monotonic()
        sandbox._kill_uid(4242, seconds=5.0)
        assert time.monotonic() - start < 2.0
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        zombie.wait()
        sleeper.wait()
