"""Progress for people and for CI: bars on a terminal, plain step and heartbeat lines elsewhere,
nothing with --quiet; results alone on stdout (``--json`` parses)."""
import io
import json
import os
import subprocess
import sys
import time

import pytest

from edgebuild.core.progress import Progress, amount, duration

from conftest import DATA_DIR  # noqa: E402


def test_lines_start_heartbeat_and_done_with_elapsed_time():
    stream = io.StringIO()
    progress = Progress("lines", stream=stream, heartbeat_s=0.05)
    with progress.step("compress seedlm (seedlm)", total=30, unit="tensors") as update:
        update(12, 30)
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[start] compress seedlm (seedlm)"
    beats = [l for l in lines if l.startswith("[...] ")]
    assert beats and "12/30 tensors, 40%" in beats[0] and "ETA" in beats[0]
    assert lines[-1].startswith("[done] compress seedlm (seedlm) in ") and lines[-1].endswith("s")


def test_a_failing_step_says_so_and_the_heartbeat_names_the_innermost_step():
    stream = io.StringIO()
    progress = Progress("lines", stream=stream, heartbeat_s=0.05)
    with pytest.raises(RuntimeError):
        with progress.step("stage"), progress.step("upload seedlm", unit="bytes") as update:
            update(1_500_000, 4_000_000)
            time.sleep(0.2)
            raise RuntimeError("boom")
    text = stream.getvalue()
    assert "[...] upload seedlm: 1.5/4.0 MB, 38%" in text and "[...] stage:" not in text
    assert "[failed] upload seedlm after " in text and "[failed] stage after " in text


def test_quiet_prints_nothing_and_bars_go_to_the_given_stream():
    quiet, bars = io.StringIO(), io.StringIO()
    for mode, stream in (("quiet", quiet), ("bars", bars)):
        progress = Progress(mode, stream=stream, heartbeat_s=0.05)
        with progress.step("export graph", total=2) as update:
            update(1)
            update(2)
        progress.note("[seedlm] attempt 1")
    assert quiet.getvalue() == ""
    assert "[seedlm] attempt 1" in bars.getvalue()
    assert Progress("auto", stream=io.StringIO()).mode == "lines"     # not a terminal


def test_amounts_and_durations():
    assert amount(3, 12, "requests") == "3/12 requests" and amount(7, None, "items") == "7 items"
    assert amount(2.5e6, 1e7, "bytes") == "2.5/10.0 MB"
    assert duration(4.24) == "4.2s" and duration(185) == "3m05s" and duration(3720) == "1h02m"


def test_library_chatter_goes_to_stderr(capfd):
    from edgebuild.build.cli.output import chatter_to_stderr
    with chatter_to_stderr():
        print("Passed argument batch_size = auto")
        os.write(1, b"from a C library\n")
        subprocess.run(["echo", "from a child process"], check=True)
    print("{}")
    out, err = capfd.readouterr()
    assert out == "{}\n"
    assert "Passed argument" in err and "from a C library" in err and "from a child process" in err


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"benchmark data not found at {DATA_DIR}")
def test_bench_json_outside_a_terminal(tmp_path):
    """stdout not a terminal: step and heartbeat lines on stderr, only JSON (with the
    intervals the table shows) on stdout; --quiet drops the progress lines."""
    config = tmp_path / "c.toml"
    config.write_text("[build]\neudaimonia = false\n")
    env = {**os.environ, "EDGEBUILD_HOME": str(tmp_path / "home"), "EDGEBUILD_HEARTBEAT_S": "0.2"}
    cmd = [sys.executable, "-m", "edgebuild.build.cli", "bench", "--model", "tiny-random", "--profile",
           "smoke", "--config", str(config), "--tasks", "piqa", "--data-dir", str(DATA_DIR),
           "--out", str(tmp_path / "out"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    row = next(r for r in result["benchmarks"] if r["benchmark"] == "piqa")
    lo, hi = row["interval"]
    assert lo <= row["score"] <= hi and row["n"] > 1 and row["confidence"] == 0.95
    err = done.stderr.splitlines()
    assert "[start] baseline: piqa (1/1 benchmarks)" in err
    assert any(l.startswith("[done] baseline: piqa (1/1 benchmarks) in ") for l in err)
    assert any(l.startswith("[...] ") and "elapsed" in l for l in err)

    quiet = subprocess.run([*cmd[:3], "--quiet", *cmd[3:]], capture_output=True, text=True,
                           env=env, stdin=subprocess.DEVNULL)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert json.loads(quiet.stdout)["benchmarks"] == result["benchmarks"]
    assert "[start]" not in quiet.stderr and "[...]" not in quiet.stderr


def test_quiet_and_verbose_together_is_a_usage_error(capsys):
    from edgebuild.build.cli import main
    assert main(["--quiet", "-v", "targets", "list"]) == 2
    assert "--quiet and --verbose" in capsys.readouterr().err
